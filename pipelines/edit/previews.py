"""Previews a person looks at: a side-by-side video (source | driving | result) and a contact sheet.

The video is H.264 yuv420p with the index at the front and AAC audio (the source's first audio
stream, re-encoded: the preview must play in browsers whatever the source's codec), limited to the
first `preview_seconds`. The contact sheet is a PNG: rows source / driving / result, columns
evenly spaced edited frames. Both stream through the three videos once, frame by frame.
"""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from pipelines.edit.job_table import EditJob
from pipelines.edit.settings import EditSettings
from pipelines.edit.stage_io import read_image
from pipelines.errors import NOT_A_VIDEO
from pipelines.media.video import VideoInfo, VideoWriter, decode, probe, rgb_colour

LABELS = ("source", "driving", "result")
SHEET_HEIGHT = 160


def _fit(image: np.ndarray, height: int) -> np.ndarray:
    """Scale to `height` keeping the aspect ratio (decoded images have square pixels), with an even width."""
    h, w = image.shape[:2]
    width = max(2, int(round(w * height / h / 2)) * 2)
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
    info = probe(path, damaged=NOT_A_VIDEO)
    last = None
    while True:
        for frame in decode(info):
            last = frame.image
            yield last
        if policy == "loop":
            continue
        while True:
            yield last if policy == "hold" else None


def write_previews(job: EditJob, info: VideoInfo, driving_path: Path, result_path: Path, video_target: Path,
                   sheet_target: Path, settings: EditSettings, sheet_frames: list[int]) -> int:
    """Write the side-by-side video and the contact sheet; returns the number of preview frames.

    `sheet_frames` are the frame indices the sheet shows (those past the preview's end are skipped).
    """
    height = settings.preview_height
    start_time = float(info.start_pts * info.time_base)
    limit = start_time + settings.preview_seconds
    info = replace(info, turn=0)  # as players show it
    result_info = probe(result_path, damaged=NOT_A_VIDEO)
    drivers = driving_frames(driving_path, job.driving_is_image, job.driving_policy)
    wanted = set(sheet_frames)
    thumbs: list[list[np.ndarray]] = []
    writer = None
    blank = None
    try:
        for source, result in zip(decode(info), decode(result_info)):
            if float(source.pts * info.time_base) > limit and writer is not None:
                break
            driving = next(drivers)
            panels = [_fit(source.image, height), None, _fit(result.image, height)]
            if driving is not None:
                panels[1] = _fit(driving, height)
                blank = np.zeros_like(panels[1])
            panels[1] = panels[1] if panels[1] is not None else blank
            if source.index in wanted:
                thumbs.append([_fit(p, SHEET_HEIGHT) for p in panels])
            row = np.concatenate([_label(p.copy(), text) for p, text in zip(panels, LABELS)], axis=1)
            if writer is None:
                writer = VideoWriter(video_target, row.shape[1], row.shape[0], time_base=info.time_base,
                                     rate=info.average_rate or Fraction(25), crf=23, preset="veryfast", b_frames=False,
                                     colour=rgb_colour(info.colour), muxer_options={"movflags": "+faststart"},
                                     audio_from=info if info.audio_streams else None,
                                     audio_seconds=limit - start_time)
            writer.write(np.ascontiguousarray(row), source.pts - info.start_pts)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    _write_sheet(thumbs, sheet_target)
    return 0 if writer is None else writer.frames


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
