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
from pipelines.prepare.requests import CROP_SIZE, OUTPUT_FPS, MetaBox
from pipelines.media.crop import crop_frame, landmarks_to_crop
from pipelines.errors import CORRUPT_VIDEO, ClipRejected, PreparationError
from pipelines.media.faces import Box, FaceDetector
from pipelines.media.tracking import FaceTracker, TrackingConfig, crop_boxes, select_track
from pipelines.media.video import VideoInfo, encode_mp4_bytes, probe, read_frames


@dataclass
class ProcessedClip:
    """A prepared clip: the encoded crops and float32 per-frame annotations.

    `boxes` (T, 4) are crop boxes in source pixels; `landmarks` (T, 68, 2) are in crop pixels;
    `pose` (T, 6) is yaw, pitch, roll, tx, ty, scale and `expression` (T, 68, 2) the landmarks with
    the pose removed. `start_s`/`end_s` is the span the frames cover (the face track's part of the
    requested span), in seconds of the source video.
    """

    mp4_bytes: bytes
    frames: int
    boxes: np.ndarray
    landmarks: np.ndarray
    pose: np.ndarray
    expression: np.ndarray
    detector: str
    start_s: float
    end_s: float
    source_size: tuple[int, int]
    fps: float = OUTPUT_FPS
    detector_calls: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage: probe_s, analyse_s (decode, detect, landmarks), select_s, crop_encode_s,
    annotate_s, total_s."""


def process_clip(video_path: str | os.PathLike, start_s: float | None, end_s: float | None,
                 meta_boxes: Sequence[MetaBox], detector: FaceDetector, config: TrackingConfig | None = None,
                 *, crf: int = 18, preset: str = "medium", info: VideoInfo | None = None) -> ProcessedClip:
    """Prepare the span [start_s, end_s) of a video (None: from the start / to the end).

    `meta_boxes` are the metadata face boxes (times in seconds of this video file) that pick the
    face when several are present. `info` skips probing when several clips share one file.
    Raises `ClipRejected` with a failure class naming the cause.
    """
    config = config or TrackingConfig()
    label = f"{video_path} [{_fmt(start_s)}-{_fmt(end_s)} s]"
    timings: dict[str, float] = {}
    try:
        with _timed(timings, "probe_s"):
            info = info or probe(video_path)
        start = 0.0 if start_s is None else float(start_s)
        end = info.duration_s if end_s is None else float(end_s)
        with _timed(timings, "analyse_s"):
            tracker = FaceTracker(detector, config)
            frame_count = 0
            for frame in read_frames(video_path, start, end, fps=OUTPUT_FPS, info=info):
                tracker.update(frame)
                frame_count += 1
        with _timed(timings, "select_s"):
            wanted = _meta_frames(meta_boxes, start, end, info)
            track = select_track(tracker.tracks, frame_count, wanted, config)
            boxes = crop_boxes(track, (info.width, info.height), config)
            landmarks = np.stack([landmarks_to_crop(points, box) for points, box in zip(track.landmarks, boxes)])
        with _timed(timings, "crop_encode_s"):
            crops = _crops(read_frames(video_path, start, end, fps=OUTPUT_FPS, info=info), track.start, boxes)
            mp4 = encode_mp4_bytes(crops, fps=OUTPUT_FPS, crf=crf, preset=preset)
        with _timed(timings, "annotate_s"):
            pose, expression = split_pose_expression(landmarks)
    except PreparationError as error:
        raise ClipRejected(error.failure_class, f"{label}: {error.message}") from error
    timings["total_s"] = sum(timings.values())
    return ProcessedClip(
        mp4_bytes=mp4, frames=len(boxes), boxes=boxes, landmarks=landmarks.astype(np.float32),
        pose=np.asarray(pose, dtype=np.float32), expression=np.asarray(expression, dtype=np.float32),
        detector=detector.name, start_s=start + track.start / OUTPUT_FPS, end_s=start + track.end / OUTPUT_FPS,
        source_size=(info.width, info.height), detector_calls=tracker.detector_calls, timings=timings)


def _crops(frames: Iterator[np.ndarray], first: int, boxes: np.ndarray) -> Iterator[np.ndarray]:
    """Crops of the track's frames, taken from the second decoding of the span."""
    produced = 0
    for index, frame in enumerate(frames):
        if first <= index < first + len(boxes):
            yield crop_frame(frame, boxes[index - first], CROP_SIZE)
            produced += 1
    if produced != len(boxes):
        raise ClipRejected(CORRUPT_VIDEO, f"the second decoding gave {produced} of {len(boxes)} frames")


def _meta_frames(meta_boxes: Sequence[MetaBox], start: float, end: float, info: VideoInfo) -> list[tuple[int, Box]]:
    """Metadata boxes as (output frame index, pixel box); those inside the span, else all of them."""
    inside = [b for b in meta_boxes if start <= b.t <= end] or list(meta_boxes)
    return [(round((b.t - start) * OUTPUT_FPS), b.to_pixels(info.width, info.height)) for b in inside]


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
