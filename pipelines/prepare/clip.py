"""One clip from video file to training sample: face track, stable 256x256 crops, per-frame annotations.

The span is decoded as a stream, so memory never holds the video: the analysis pass detects and
tracks faces, keeps landmarks and, around every face it tracks, the part of the frame a crop box
can reach (`FaceRegions`). Once the track is chosen and its crop boxes smoothed (which needs the
whole track), the crops are cut from those parts and piped straight into the encoder. A clip whose
face parts outgrow the memory budget, or whose smoothed box reaches past them, decodes its span a
second time instead: the same crops either way, one decode when it fits. Frames are seen as a
viewer sees them (`media.video`: the source's colour matrix and range, square pixels, upright, the
first field of interlaced frames), and the crops are encoded BT.709 and tagged with the source's
primaries and transfer, so a decoded crop has the source's colours whatever its matrix.
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
from pipelines.media.crop import crop_frame, crop_pixels, landmarks_to_crop, pixel_box
from pipelines.media.faces import Box, FaceDetector
from pipelines.media.framing import checked_boxes, landmark_boxes
from pipelines.media.tracking import FaceTracker, select_track
from pipelines.media.video import VideoInfo, encode_mp4_bytes, probe, read_frames
from pipelines.prepare.requests import MetaBox
from pipelines.prepare.settings import SampleFormat

FACE_REGION_BUDGET_BYTES = 256 * 2**20
"""Memory one clip may hold of the frames' face parts to skip its second decode: a 4 s 360p clip with a
120 px face keeps about 40 MB, 8 s at 720p with a 200 px face about 220 MB; 10 s at 1080p with a 300 px
face would need about 620 MB and decodes twice."""

REGION_SLACK = 1.3
"""Face parts reach this much farther than the framing's crop edge: the smoothed, median-calibrated box
of a frame differs from that frame's own landmark box by a few percent."""


@dataclass
class ProcessedClip:
    """A prepared clip (`ClipSample`, the dataset's one description of a clip) and what making it
    cost: seconds per stage (`timings`: probe_s, analyse_s for decode, detection and landmarks,
    select_s, encode_s for the crops and encoding, annotate_s, total_s), detector calls, and how
    many times the span was decoded (1, or 2 when the face parts did not fit)."""

    sample: ClipSample
    timings: dict[str, float] = field(default_factory=dict)
    detector_calls: int = 0
    decodes: int = 1


class FaceRegions:
    """The part of each analysed frame that a crop box can reach, so the crop pass needs no second decode.

    Per frame, the rectangle (clipped to the frame) around every tracked face that reaches `reach`
    landmark box sides from its centre. Crops cut from it equal crops of the whole frame whenever the
    box's part inside the frame lies inside the rectangle (`crop_pixels`); `crops` checks that.
    Past `budget_bytes` the parts are dropped and `crops` gives None: the caller decodes again.
    """

    def __init__(self, reach: float, budget_bytes: int) -> None:
        self.reach, self.budget_bytes = reach, budget_bytes
        self.parts: list[tuple[int, int, np.ndarray] | None] = []
        self.nbytes = 0
        self.overflowed = False

    def keep(self, frame: np.ndarray, faces: Sequence[np.ndarray]) -> None:
        """Keep the face parts of the next frame; `faces` are the (68, 2) landmarks tracked in it."""
        if self.overflowed:
            return
        if not faces:
            self.parts.append(None)
            return
        extents = landmark_boxes(np.stack(faces))
        centres = (extents[:, :2] + extents[:, 2:]) / 2
        reach = self.reach * np.maximum(extents[:, 2] - extents[:, 0], extents[:, 3] - extents[:, 1]) + 2.0
        height, width = frame.shape[:2]
        x0 = max(0, int(np.floor((centres[:, 0] - reach).min())))
        y0 = max(0, int(np.floor((centres[:, 1] - reach).min())))
        x1 = min(width, int(np.ceil((centres[:, 0] + reach).max())))
        y1 = min(height, int(np.ceil((centres[:, 1] + reach).max())))
        part = frame[y0:max(y0, y1), x0:max(x0, x1)].copy()
        self.nbytes += part.nbytes
        if self.nbytes > self.budget_bytes:
            self.overflowed, self.parts, self.nbytes = True, [], 0
            return
        self.parts.append((x0, y0, part))

    def crops(self, first: int, boxes: np.ndarray, size: int,
              frame_size: tuple[int, int]) -> Iterator[np.ndarray] | None:
        """Crops of frames first, first+1, ... cut from the kept parts; None when some box reaches past them."""
        if self.overflowed or first + len(boxes) > len(self.parts):
            return None
        width, height = frame_size
        placed = []
        for part, box in zip(self.parts[first:first + len(boxes)], boxes):
            if part is None:
                return None
            x0, y0, side = pixel_box(box)
            px, py, pixels = part
            inside_x, inside_y = (max(0, x0), min(width, x0 + side)), (max(0, y0), min(height, y0 + side))
            if not (px <= inside_x[0] < inside_x[1] <= px + pixels.shape[1]
                    and py <= inside_y[0] < inside_y[1] <= py + pixels.shape[0]):
                return None
            placed.append((pixels, x0 - px, y0 - py, side))
        return (crop_pixels(pixels, x, y, side, size) for pixels, x, y, side in placed)


def process_clip(video_path: str | os.PathLike, start_s: float | None, end_s: float | None,
                 meta_boxes: Sequence[MetaBox], detector: FaceDetector, provenance: Provenance,
                 sample_format: SampleFormat | None = None, *, info: VideoInfo | None = None,
                 offset_s: float = 0.0, label: str | None = None,
                 region_budget_bytes: int = FACE_REGION_BUDGET_BYTES) -> ProcessedClip:
    """Prepare the span [start_s, end_s) of a video file (None: from the start / to the end).

    `meta_boxes` are the metadata face boxes (times in seconds of this file) that pick the face
    when several are present; `provenance` says where the clip comes from (it goes into the
    sample's json); `offset_s` is where this file starts in the source video (a downloaded
    section), so the sample records its span in the source's own time. `info` skips probing when
    several clips share one file; `region_budget_bytes` bounds the frame parts kept to skip a second
    decode (0: always decode twice). Raises `ClipRejected` with a failure class and a message that
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
            regions = FaceRegions(REGION_SLACK * sample_format.framing.reach, region_budget_bytes)
            frame_count = 0
            for frame in read_frames(video_path, start, end, fps=fps, info=info):
                tracker.update(frame)
                regions.keep(frame, tracker.current_landmarks())
                frame_count += 1
        with _timed(timings, "select_s"):
            wanted = _meta_frames(meta_boxes, start, end, info, fps)
            selection = select_track(tracker.tracks, frame_count, wanted, config, tracker.detections,
                                     info.display_size)
            track = selection.track
            if len(track.landmarks) < sample_format.min_clip_frames:
                raise ClipRejected(CLIP_TOO_SHORT, f"{len(track.landmarks)} frames with the face, fewer than the "
                                                   f"minimum of {sample_format.min_clip_frames} (--min-clip-frames)")
            boxes = checked_boxes(np.stack(track.landmarks), info.display_size, sample_format.framing,
                                  config.min_face_px, config.max_outside_fraction, track.start)
            landmarks = np.stack([landmarks_to_crop(points, box, size) for points, box in zip(track.landmarks, boxes)])
        with _timed(timings, "encode_s"):
            crops = regions.crops(track.start, boxes, size, info.display_size)
            decodes = 1 if crops is not None else 2
            if crops is None:
                regions = None  # free the kept parts before decoding again
                crops = _crops(read_frames(video_path, start, end, fps=fps, info=info), track.start, boxes, size)
            mp4 = encode_mp4_bytes(crops, fps=fps, crf=sample_format.crf, preset=sample_format.preset,
                                   colour=info.colour, keyframe_interval=sample_format.keyframe_interval)
        with _timed(timings, "annotate_s"):
            pose, expression = split_pose_expression(landmarks)
    except RecordedFailure as error:  # the file's own (cache) path means nothing to a user: the label names the clip
        raise ClipRejected(error.failure_class, f"{label}: {error.message.removeprefix(f'{video_path}: ')}") from error
    timings["total_s"] = sum(timings.values())
    float_boxes = boxes.astype(np.float64)
    first = offset_s + start
    meta = SampleMeta.build(
        provenance, span=(first + track.start / fps, first + track.end / fps), fps=fps, frames=len(boxes),
        crop_size=size, source_size=info.display_size, detector=detector.name,
        track_box={"mean": float_boxes.mean(axis=0).tolist(), "min": float_boxes.min(axis=0).tolist(),
                   "max": float_boxes.max(axis=0).tolist()},
        faces_seen=selection.faces_seen, face_choice=selection.choice)
    sample = ClipSample(key=safe_key(provenance.clip_id), mp4=mp4, boxes=boxes.astype(np.float32),
                        landmarks=landmarks.astype(np.float32), pose=np.asarray(pose, dtype=np.float32),
                        expression=np.asarray(expression, dtype=np.float32), meta=meta)
    return ProcessedClip(sample.validate(), timings, tracker.detector_calls, decodes)


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
    return [(round((b.t - start) * fps), b.to_pixels(*info.display_size)) for b in inside]


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
