"""Previews a person looks at: a side-by-side video (source | driving | result) and a contact sheet.

The video is H.264 yuv420p with the index at the front and AAC audio (the source's first audio
stream, re-encoded: the preview must play in browsers whatever the source's codec), limited to the
first `preview_seconds`. The contact sheet is a PNG: rows source / driving / result, columns
evenly spaced edited frames. Both stream through the three videos once, frame by frame.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import av
import cv2
import numpy as np

from pipelines.edit.analyse import read_image
from pipelines.edit.jobs import EditJob
from pipelines.edit.settings import EditSettings
from pipelines.media.stream import StreamInfo, decode, open_info

LABELS = ("source", "driving", "result")
SHEET_HEIGHT = 160


def _fit(image: np.ndarray, height: int, pixel_aspect: float = 1.0) -> np.ndarray:
    """Scale to `height` keeping the displayed aspect ratio (pixels `pixel_aspect` times wider than high),
    with an even width."""
    h, w = image.shape[:2]
    width = max(2, int(round(w * pixel_aspect * height / h / 2)) * 2)
    interpolation = cv2.INTER_AREA if h > height else cv2.INTER_CUBIC
    return cv2.resize(image, (width, height), interpolation=interpolation)


def _label(image: np.ndarray, text: str) -> np.ndarray:
    scale = image.shape[0] / 400
    thickness = max(1, int(round(scale * 2)))
    position = (int(8 * scale) + 2, int(24 * scale) + 6)
    cv2.putText(image, text, position, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(image, text, position, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return image


def driving_frames(path: Path, is_image: bool, policy: str) -> Iterator[np.ndarray | None]:
    """The driving frame for source frame 0, 1, 2, ... under the job's policy (None: the edit stopped)."""
    if is_image:
        image = read_image(path)
        while True:
            yield image
    info = open_info(path)
    last = None
    while True:
        for frame in decode(info):
            last = frame.image
            yield last
        if policy == "loop":
            continue
        while True:
            yield last if policy == "hold" else None


def _pixel_aspect(info: StreamInfo) -> float:
    """Width of a pixel relative to its height as shown (sample aspect ratio; swapped when rotated)."""
    ratio = float(info.sample_aspect_ratio or 1)
    return 1.0 / ratio if info.rotation % 180 else ratio


class _AudioTrack:
    """The source's first audio stream re-encoded to AAC, written in step with the video frames."""

    def __init__(self, container: av.container.OutputContainer, info: StreamInfo, limit_s: float) -> None:
        self._source = av.open(info.path, "r")
        source = self._source.streams.audio[0]
        rate = source.rate or 48000
        layout = source.layout.name if source.layout.nb_channels <= 2 else "stereo"
        self._container = container
        self._stream = container.add_stream("aac", rate=rate, layout=layout)
        self._resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        self._start = float(info.start_pts * info.time_base)
        self._limit = limit_s
        self._frames = self._source.decode(source)
        self._next = next(self._frames, None)

    def write_until(self, seconds: float) -> None:
        """Encode source audio up to `seconds` after the video's start (and never past the limit)."""
        while self._next is not None and (self._next.time or 0.0) - self._start <= min(seconds, self._limit):
            frame, self._next = self._next, next(self._frames, None)
            frame.pts = None
            for resampled in self._resampler.resample(frame):
                self._container.mux(self._stream.encode(resampled))

    def finish(self) -> None:
        self.write_until(self._limit)
        for resampled in self._resampler.resample(None):
            self._container.mux(self._stream.encode(resampled))
        self._container.mux(self._stream.encode(None))
        self._source.close()


def write_previews(job: EditJob, info: StreamInfo, driving_path: Path, result_path: Path, video_target: Path,
                   sheet_target: Path, settings: EditSettings, sheet_frames: list[int]) -> int:
    """Write the side-by-side video and the contact sheet; returns the number of preview frames.

    `sheet_frames` are the frame indices the sheet shows (those past the preview's end are skipped).
    """
    height = settings.preview_height
    start_time = float(info.start_pts * info.time_base)
    limit = start_time + settings.preview_seconds
    result_info = open_info(result_path)
    drivers = driving_frames(driving_path, job.driving_is_image, job.driving_policy)
    aspect = _pixel_aspect(info)
    driving_aspect = 1.0 if job.driving_is_image else _pixel_aspect(open_info(driving_path))
    wanted = set(sheet_frames)
    thumbs: list[list[np.ndarray]] = []
    container = av.open(str(video_target), "w", format="mp4", options={"movflags": "+faststart"})
    try:
        audio = _AudioTrack(container, info, limit - start_time) if info.audio_streams else None
        stream = None
        blank = None
        written = 0
        for source, result in zip(decode(info), decode(result_info)):
            if float(source.pts * info.time_base) > limit and written:
                break
            driving = next(drivers)
            panels = [_fit(source.image, height, aspect), None, _fit(result.image, height, aspect)]
            if driving is not None:
                panels[1] = _fit(driving, height, driving_aspect)
                blank = np.zeros_like(panels[1])
            panels[1] = panels[1] if panels[1] is not None else blank
            if source.index in wanted:
                thumbs.append([_fit(p, SHEET_HEIGHT) for p in panels])
            row = np.concatenate([_label(p.copy(), text) for p, text in zip(panels, LABELS)], axis=1)
            if stream is None:
                stream = container.add_stream("libx264", rate=info.average_rate or 25)
                stream.width, stream.height = row.shape[1], row.shape[0]
                stream.pix_fmt = "yuv420p"
                stream.time_base = info.time_base
                stream.codec_context.time_base = info.time_base
                stream.options = {"crf": "23", "preset": "veryfast", "bf": "0"}
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(row), format="rgb24")
            frame.pts = source.pts - info.start_pts
            frame.time_base = info.time_base
            container.mux(stream.encode(frame))
            written += 1
            if audio is not None:
                audio.write_until(float(frame.pts * info.time_base))
        if stream is not None:
            container.mux(stream.encode(None))
        if audio is not None:
            audio.finish()
    finally:
        container.close()
    _write_sheet(thumbs, sheet_target)
    return written


def _write_sheet(thumbs: list[list[np.ndarray]], target: Path) -> None:
    """Rows source / driving / result, one column per chosen frame, labels in the first column."""
    if not thumbs:
        thumbs = [[np.zeros((SHEET_HEIGHT, SHEET_HEIGHT, 3), np.uint8)] * 3]
    rows = []
    for row, text in enumerate(LABELS):
        cells = [column[row] for column in thumbs]
        cells[0] = _label(cells[0].copy(), text)
        width = max(cell.shape[1] for cell in cells)
        padded = [np.pad(cell, ((0, 0), (0, width - cell.shape[1]), (0, 0))) for cell in cells]
        rows.append(np.concatenate(padded, axis=1))
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
    ok, data = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"{target}: PNG encoding failed")
    target.write_bytes(data.tobytes())
