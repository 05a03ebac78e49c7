"""One clip from video file to training sample: face track, stable 256x256 crops, per-frame annotations.

Two streaming passes over the clip's span, so memory holds one frame (plus 68 points per frame),
never the video: the analysis pass detects and tracks faces and keeps landmarks; once the track
is chosen and its crop boxes smoothed (which needs the whole track), the crop pass decodes the
span again, crops each frame and pipes it straight into the encoder. Decoding twice costs less
than keeping frames: decode runs at thousands of small frames per second.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from dpe.landmarks import split_pose_expression
from pipelines.dataset.schema import ClipSample, Provenance, SampleMeta, safe_key
from pipelines.errors import CLIP_TOO_SHORT, CORRUPT_VIDEO, ClipRejected, RecordedFailure
from pipelines.media.crop import crop_frame, landmarks_to_crop
from pipelines.media.faces import Box, FaceDetector
from pipelines.media.framing import checked_boxes
from pipelines.media.tracking import FaceTracker, select_track
from pipelines.media.video import VideoInfo, encode_mp4_bytes, probe, read_frames
from pipelines.prepare.requests import MetaBox
from pipelines.prepare.settings import SampleFormat


@dataclass
class ProcessedClip:
    """A prepared clip (`ClipSample`, the dataset's one description of a clip) and what making it
    cost: seconds per stage (`timings`: probe_s, analyse_s for decode, detection and landmarks,
    select_s, encode_s for the crop pass and encoding, annotate_s, total_s) and detector calls."""

    sample: ClipSample
    timings: dict[str, float] = field(default_factory=dict)
    detector_calls: int = 0


def process_clip(video_path: str | os.PathLike, start_s: float | None, end_s: float | None,
                 meta_boxes: Sequence[MetaBox], detector: FaceDetector, provenance: Provenance,
                 sample_format: SampleFormat | None = None, *, info: VideoInfo | None = None,
                 offset_s: float = 0.0, label: str | None = None) -> ProcessedClip:
    """Prepare the span [start_s, end_s) of a video file (None: from the start / to the end).

    `meta_boxes` are the metadata face boxes (times in seconds of this file) that pick the face
    when several are present; `provenance` says where the clip comes from (it goes into the
    sample's json); `offset_s` is where this file starts in the source video (a downloaded
    section), so the sample records its span in the source's own time. `info` skips probing when
    several clips share one file. Raises `ClipRejected` with a failure class and a message that
    starts with `label` (default: the file and span).
    """
    sample_format = sample_format or SampleFormat()
    config, fps, size = sample_format.tracking, sample_format.fps, sample_format.crop_size
    label = label or f"{video_path} [{_fmt(start_s)}-{_fmt(end_s)} s]"
    timings: dict[str, float] = {}
    try:
        with _timed(timings, "probe_s"):
            info = info or probe(video_path)
        start = 0.0 if start_s is None else float(start_s)
        end = info.duration_s if end_s is None else float(end_s)
        with _timed(timings, "analyse_s"):
            tracker = FaceTracker(detector, config)
            frame_count = 0
            for frame in read_frames(video_path, start, end, fps=fps, info=info):
                tracker.update(frame)
                frame_count += 1
        with _timed(timings, "select_s"):
            wanted = _meta_frames(meta_boxes, start, end, info, fps)
            selection = select_track(tracker.tracks, frame_count, wanted, config, tracker.detections,
                                     (info.width, info.height))
            track = selection.track
            if len(track.landmarks) < sample_format.min_clip_frames:
                raise ClipRejected(CLIP_TOO_SHORT, f"{len(track.landmarks)} frames with the face, fewer than the "
                                                   f"minimum of {sample_format.min_clip_frames} (--min-clip-frames)")
            boxes = checked_boxes(np.stack(track.landmarks), (info.width, info.height), sample_format.framing,
                                  config.min_face_px, config.max_outside_fraction, track.start)
            landmarks = np.stack([landmarks_to_crop(points, box, size) for points, box in zip(track.landmarks, boxes)])
        with _timed(timings, "encode_s"):
            crops = _crops(read_frames(video_path, start, end, fps=fps, info=info), track.start, boxes, size)
            mp4 = encode_mp4_bytes(crops, fps=fps, crf=sample_format.crf, preset=sample_format.preset)
        with _timed(timings, "annotate_s"):
            pose, expression = split_pose_expression(landmarks)
    except RecordedFailure as error:  # the file's own (cache) path means nothing to a user: the label names the clip
        raise ClipRejected(error.failure_class, f"{label}: {error.message.removeprefix(f'{video_path}: ')}") from error
    timings["total_s"] = sum(timings.values())
    float_boxes = boxes.astype(np.float64)
    first = offset_s + start
    meta = SampleMeta.build(
        provenance, span=(first + track.start / fps, first + track.end / fps), fps=fps, frames=len(boxes),
        crop_size=size, source_size=(info.width, info.height), detector=detector.name,
        track_box={"mean": float_boxes.mean(axis=0).tolist(), "min": float_boxes.min(axis=0).tolist(),
                   "max": float_boxes.max(axis=0).tolist()},
        faces_seen=selection.faces_seen, face_choice=selection.choice)
    sample = ClipSample(key=safe_key(provenance.clip_id), mp4=mp4, boxes=boxes.astype(np.float32),
                        landmarks=landmarks.astype(np.float32), pose=np.asarray(pose, dtype=np.float32),
                        expression=np.asarray(expression, dtype=np.float32), meta=meta)
    return ProcessedClip(sample.validate(), timings, tracker.detector_calls)


def _crops(frames: Iterator[np.ndarray], first: int, boxes: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Crops of the track's frames, taken from the second decoding of the span."""
    produced = 0
    for index, frame in enumerate(frames):
        if first <= index < first + len(boxes):
            yield crop_frame(frame, boxes[index - first], size)
            produced += 1
    if produced != len(boxes):
        raise ClipRejected(CORRUPT_VIDEO, f"the second decoding gave {produced} of {len(boxes)} frames")


def _meta_frames(meta_boxes: Sequence[MetaBox], start: float, end: float, info: VideoInfo,
                 fps: float) -> list[tuple[int, Box]]:
    """Metadata boxes as (output frame index, pixel box); those inside the span, else all of them."""
    inside = [b for b in meta_boxes if start <= b.t <= end] or list(meta_boxes)
    return [(round((b.t - start) * fps), b.to_pixels(info.width, info.height)) for b in inside]


class _timed:
    """Adds the seconds spent in a `with` block to `timings[key]`."""

    def __init__(self, timings: dict[str, float], key: str) -> None:
        self.timings, self.key = timings, key

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *exc_info) -> None:
        self.timings[self.key] = self.timings.get(self.key, 0.0) + time.perf_counter() - self.started


def _fmt(value: float | None) -> str:
    return "?" if value is None else f"{value:.3f}"
