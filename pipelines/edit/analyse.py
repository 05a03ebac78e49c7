"""The analysis stage: one streaming pass over a source video finds and tracks its face, then the
video is split into chunks that carry everything the later stages need.

Per video: probe (`video.probe`), decode every frame once with its pts while the face
tracker (`media.tracking`: sparse detection, landmark tracking, re-detection when the box jumps,
as after a scene cut) follows every face, then choose which face to edit at each moment and frame
it (`media.framing`, the official framing by default). Only per-frame numbers are kept (pts, 68
landmarks: about 0.6 KB a frame), never frames; a frame is converted to RGB whole only where the
detector runs; elsewhere the landmark model reads the luma around each face, with no colour conversion
(`FaceDetector.landmarks_in`, `DecodedFrame.grey_region`). Frames are seen as a viewer sees them
(`media.pictures.View`: square pixels, upright, the first field of interlaced frames unless
--deinterlace off). When no face is found upright, sampled frames are searched turned a quarter,
three quarters and half a turn (a camera held sideways whose rotation tag was lost); the turn that
shows faces is kept in the chunks' `VideoInfo.turn`, so every later stage works on the face
upright and the edit goes back into the frame as it was. A file is complete when its last
presented frame reaches the stream's stated end (`video.check_complete`), not when it decodes as
many frames as its index lists (an edit list lists frames it does not show).

Which face: at most one face is edited in any frame. With `face='largest'` the most prominent
track (frames covered x face size) is taken first, then, for frames it does not cover (before a
cut, after it), the next most prominent track that does not overlap it in time, and so on. With
`face='X,Y'` tracks are ranked by their distance to that point of the frame instead, and tracks
farther than a quarter of the frame diagonal from it are never taken.

The driver is analysed the same way (a video: its face per frame, frames without one borrow the
nearest box; an image: its largest face), once per worker process and driver file.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np

from pipelines.edit.chunks import ChunkWork, DriverSlice, JobWork, timed, timed_iter
from pipelines.edit.job_table import is_image
from pipelines.edit.settings import EditSettings, parse_face
from pipelines.edit.stage_io import local_input, read_image
from pipelines.errors import (
    DAMAGED_VIDEO,
    MISSING_VIDEO,
    NO_DRIVING_FACE,
    NO_FACE,
    NOT_A_VIDEO,
    RecordedFailure,
    VideoError,
)
from pipelines.media.faces import FaceDetector
from pipelines.media.framing import framed_boxes
from pipelines.media.tracking import FaceTrack, FaceTracker
from pipelines.media.video import VideoInfo, check_complete, decode, probe
from pipelines.storage import OutputStore

LOG = logging.getLogger(__name__)

POINT_REACH = 0.25
"""With face='X,Y', only tracks whose median centre lies within this fraction of the frame diagonal count."""

TURNS = (90, 270, 180)
"""Quarter turns (counter-clockwise) tried when no face is found upright: sideways first, as a camera held
sideways is the common case."""

TURN_SAMPLES = 12
"""Frames (evenly spaced) the detector searches in each turned orientation."""


@dataclass
class FaceFrames:
    """The chosen face per frame of a video: landmarks (NaN where none) and crop boxes (NaN where none)."""

    pts: np.ndarray
    landmarks: np.ndarray
    boxes: np.ndarray
    tracks_found: int
    turn: int = 0
    """The counter-clockwise turn (degrees) in which the face was found upright (`VideoInfo.turn`)."""

    @property
    def present(self) -> np.ndarray:
        return ~np.isnan(self.boxes[:, 0])


@dataclass
class DriverPlan:
    """An analysed driver: its frame count, crop box and pts per frame (an image has one frame)."""

    path: str
    is_image: bool
    boxes: np.ndarray
    pts: np.ndarray

    @property
    def frame_count(self) -> int:
        return len(self.boxes)


def track_video(info: VideoInfo, detector: FaceDetector, settings: EditSettings,
                timings: dict[str, float]) -> tuple[np.ndarray, list[FaceTrack]]:
    """Decode every frame once, tracking faces; return the frames' pts and every face track.

    Raises `damaged_video` when decoding fails or ends before the stream's stated end (a truncated file).
    """
    tracker = FaceTracker(detector, settings.tracking)
    pts: list[int] = []
    last_duration = 0
    for frame in timed_iter(decode(info), timings, "decode_s"):
        with timed(timings, "track_s"):
            tracker.update(frame)
        pts.append(frame.pts)
        last_duration = frame.duration
    if not pts:
        raise VideoError(DAMAGED_VIDEO, f"{info.path}: no frame could be decoded")
    check_complete(info, len(pts), pts[-1], last_duration)
    return np.asarray(pts, dtype=np.int64), tracker.tracks


def upright_turn(info: VideoInfo, frame_count: int, detector: FaceDetector, settings: EditSettings,
                 timings: dict[str, float]) -> int:
    """The quarter turn (`TURNS`) in which the detector finds the most faces large enough to edit on
    sampled frames; 0 when it finds none in any."""
    wanted = set(np.linspace(0, frame_count - 1, min(TURN_SAMPLES, frame_count)).round().astype(int).tolist())
    found = dict.fromkeys(TURNS, 0)
    for frame in timed_iter(decode(info), timings, "decode_s"):
        if frame.index not in wanted:
            continue
        with timed(timings, "track_s"):
            for turn in TURNS:
                image = np.ascontiguousarray(np.rot90(frame.image, turn // 90))
                found[turn] += sum(1 for face in detector.detect(image)
                                   if min(face.box[2] - face.box[0], face.box[3] - face.box[1]) >= settings.min_face_px)
    best = max(TURNS, key=lambda turn: found[turn])
    return best if found[best] else 0


def _prominence(track: FaceTrack) -> float:
    return len(track.landmarks) * track.face_size()


def choose_faces(tracks: list[FaceTrack], frame_count: int, frame_size: tuple[int, int], face: str,
                 settings: EditSettings) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(T, 68, 2) landmarks of the face edited in each frame (NaN where none) and the chosen tracks' spans."""
    min_frames = min(settings.min_track_frames, frame_count)
    usable = [t for t in tracks if len(t.landmarks) >= min_frames and t.face_size() >= settings.min_face_px]
    point = parse_face(face)
    if point is None:
        ranked = sorted(usable, key=_prominence, reverse=True)
    else:
        width, height = frame_size
        target = np.array([point[0] * width, point[1] * height])
        diagonal = float(np.hypot(width, height))
        distances = {id(t): float(np.linalg.norm(np.median((t.landmark_boxes()[:, :2] + t.landmark_boxes()[:, 2:]) / 2,
                                                           axis=0) - target)) / diagonal for t in usable}
        ranked = sorted((t for t in usable if distances[id(t)] <= POINT_REACH), key=lambda t: distances[id(t)])
    landmarks = np.full((frame_count, 68, 2), np.nan, np.float32)
    spans: list[tuple[int, int]] = []
    for track in ranked:
        if any(track.start < end and start < track.end for start, end in spans):
            continue
        landmarks[track.start:track.end] = np.stack(track.landmarks)
        spans.append((track.start, track.end))
    return landmarks, sorted(spans)


def analyse_source(info: VideoInfo, detector: FaceDetector, face: str, settings: EditSettings,
                   timings: dict[str, float]) -> FaceFrames:
    """Track the video's faces and frame the chosen one, upright or (when none is found upright) in
    the quarter turn that shows faces; raises `no_face` when there is none to edit."""
    pts, tracks = track_video(info, detector, settings, timings)
    landmarks, spans = _chosen(tracks, len(pts), info, face, settings, timings)
    turn = 0
    if not spans:
        turn = upright_turn(info, len(pts), detector, settings, timings)
        if turn:
            info = replace(info, turn=turn)
            pts, tracks = track_video(info, detector, settings, timings)
            landmarks, spans = _chosen(tracks, len(pts), info, face, settings, timings)
    if not spans:
        sizes = ", ".join(f"{t.face_size():.0f}px x {len(t.landmarks)} frames" for t in tracks[:3])
        detail = f"faces seen but too small or brief ({sizes}; minimum {settings.min_face_px:.0f}px, " \
                 f"{settings.min_track_frames} frames)" if tracks else \
            f"detector {detector.name}, upright and turned a quarter, half and three quarters"
        raise RecordedFailure(NO_FACE, f"no face to edit in {len(pts)} frames ({detail}); nothing was written")
    with timed(timings, "track_s"):
        boxes = np.full((len(pts), 4), np.nan, np.float32)
        for start, end in spans:
            boxes[start:end] = framed_boxes(landmarks[start:end], settings.framing)
    return FaceFrames(pts=pts, landmarks=landmarks, boxes=boxes, tracks_found=len(tracks), turn=turn)


def _chosen(tracks: list[FaceTrack], count: int, info: VideoInfo, face: str, settings: EditSettings,
            timings: dict[str, float]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    with timed(timings, "track_s"):
        return choose_faces(tracks, count, info.view.shown_size, face, settings)


_DRIVERS: OrderedDict[tuple, DriverPlan] = OrderedDict()
_DRIVER_CACHE_SIZE = 8


def analyse_driver(driving: str, detector: FaceDetector, settings: EditSettings,
                   timings: dict[str, float]) -> DriverPlan:
    """The driver's crop box per frame (cached per worker process); raises `no_driving_face`."""
    path = local_input(driving, settings.workdir)
    if not path.is_file():
        raise VideoError(MISSING_VIDEO, f"driving {driving}: no such file")
    stat = path.stat()
    cache_key = (str(path), stat.st_size, stat.st_mtime_ns, detector.name, settings.tracking, settings.framing)
    if cache_key in _DRIVERS:
        _DRIVERS.move_to_end(cache_key)
        return _DRIVERS[cache_key]
    if is_image(driving):
        with timed(timings, "track_s"):
            image = read_image(path)
            faces = detector.detect(image)
            if not faces:
                raise RecordedFailure(NO_DRIVING_FACE, f"driving image {driving}: no face found")
            largest = max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
            points = detector.landmarks(image, largest.box)
            boxes = framed_boxes(points[None], settings.framing)
        plan = DriverPlan(str(path), True, boxes, np.zeros(1, np.int64))
    else:
        try:
            info = probe(path, damaged=NOT_A_VIDEO)
        except RecordedFailure as error:
            raise type(error)(error.failure_class, f"driving {error.message}") from None
        pts, tracks = track_video(info, detector, settings, timings)
        with timed(timings, "track_s"):
            landmarks, spans = choose_faces(tracks, len(pts), info.view.shown_size, "largest", settings)
            if not spans:
                raise RecordedFailure(NO_DRIVING_FACE, f"driving video {driving}: no face in {len(pts)} frames")
            boxes = np.full((len(pts), 4), np.nan, np.float32)
            for start, end in spans:
                boxes[start:end] = framed_boxes(landmarks[start:end], settings.framing)
            boxes = _fill_nearest(boxes)
        plan = DriverPlan(str(path), False, boxes, pts)
    _DRIVERS[cache_key] = plan
    while len(_DRIVERS) > _DRIVER_CACHE_SIZE:
        _DRIVERS.popitem(last=False)
    return plan


def _fill_nearest(boxes: np.ndarray) -> np.ndarray:
    """Rows that are NaN take the nearest row that is not (the driver's face held over its gaps)."""
    present = np.flatnonzero(~np.isnan(boxes[:, 0]))
    positions = np.arange(len(boxes))
    nearest = present[np.clip(np.searchsorted(present, positions), 0, len(present) - 1)]
    before = present[np.clip(np.searchsorted(present, positions) - 1, 0, len(present) - 1)]
    choose = np.where(np.abs(before - positions) <= np.abs(nearest - positions), before, nearest)
    return boxes[choose]


def driving_indices(frame_count: int, driver_frames: int, policy: str, is_image: bool) -> np.ndarray:
    """Which driver frame drives each source frame (-1: none, the frame passes through).

    Frame i drives frame i (the official semantics); past the driver's end `policy` decides:
    hold its last frame, loop from its start, or stop (-1).
    """
    index = np.arange(frame_count)
    if is_image:
        return np.zeros(frame_count, np.int64)
    if policy == "hold":
        return np.minimum(index, driver_frames - 1)
    if policy == "loop":
        return index % driver_frames
    if policy == "stop":
        return np.where(index < driver_frames, index, -1)
    raise ValueError(f"unknown driving policy {policy!r}")


def edit_weights(edited: np.ndarray, fade_frames: int) -> np.ndarray:
    """Per-frame edit weight: 1 inside runs of edited frames, ramping over `fade_frames` where a run
    starts or ends mid-video (a face found or lost, the driver stopping), 0 outside runs."""
    weights = np.zeros(len(edited), np.float32)
    count = len(edited)
    start = None
    for index in range(count + 1):
        inside = index < count and bool(edited[index])
        if inside and start is None:
            start = index
        elif not inside and start is not None:
            run = np.arange(start, index)
            ramp = np.ones(len(run), np.float32)
            if fade_frames > 0 and start > 0:
                ramp = np.minimum(ramp, (run - start + 1) / (fade_frames + 1))
            if fade_frames > 0 and index < count:
                ramp = np.minimum(ramp, (index - run) / (fade_frames + 1))
            weights[start:index] = ramp
            start = None
    return weights


def segment_path(work: JobWork, chunk: int) -> str:
    """Where a chunk's encoded segment is kept until the job's video is joined (inside the output store)."""
    return f".segments/{work.job.key}-{work.digest[:8]}/{chunk:05d}.mp4"


def analyse_job(work: JobWork, settings: EditSettings, detector: FaceDetector, store: OutputStore) -> list[ChunkWork]:
    """Analyse one job and split it into chunks; a failure gives a single failed `ChunkWork`."""
    timings: dict[str, float] = {}
    started = time.time()
    job = work.job
    try:
        with timed(timings, "probe_s"):
            info = probe(local_input(job.source, settings.workdir), damaged=NOT_A_VIDEO)
            info = replace(info, one_field=settings.deinterlace == "auto")
        driver = analyse_driver(job.driving, detector, settings, timings)
        faces = analyse_source(info, detector, job.face, settings, timings)
        info = replace(info, turn=faces.turn)
    except RecordedFailure as error:
        failed = ChunkWork(work, index=-1, total=0, timings=timings, started_at=started)
        failed.visited()
        return [failed.fail(error.failure_class, f"{job.source}: {error.message}")]
    count = len(faces.pts)
    index = driving_indices(count, driver.frame_count, job.driving_policy, driver.is_image)
    edited = faces.present & (index >= 0)
    weights = edit_weights(edited, settings.fade_frames)
    index = np.where(weights > 0, index, -1)
    motion = job.resolved_motion()
    reference = None
    if motion == "relative" and edited.any():
        if driver.is_image:
            first = int(np.flatnonzero(weights > 0)[0])
            reference = ("source", first, int(faces.pts[first]), faces.boxes[first].copy())
        else:
            reference = ("driving", 0, int(driver.pts[0]), driver.boxes[0].copy())
    size = settings.chunk_frames
    chunks = (count + size - 1) // size
    result = []
    for number, start in enumerate(range(0, count, size)):
        stop = min(start + size, count)
        used = np.unique(index[start:stop][index[start:stop] >= 0])
        local_index = np.full(stop - start, -1, np.int64)
        chosen = index[start:stop] >= 0
        local_index[chosen] = np.searchsorted(used, index[start:stop][chosen])
        chunk = ChunkWork(
            work, index=number, total=chunks, info=info, start=start, pts=faces.pts[start:stop].copy(),
            weights=weights[start:stop].copy(), boxes=faces.boxes[start:stop].copy(),
            landmarks=faces.landmarks[start:stop].copy(), driving_index=local_index,
            driver=DriverSlice(driver.is_image, used, driver.boxes[used].copy(), driver.pts[used].copy()),
            motion=motion, reference=reference, segment=segment_path(work, number),
            frames_edited=int(chosen.sum()), started_at=started, timings=dict(timings) if number == 0 else {})
        chunk.reused = store.exists(chunk.segment)
        chunk.visited()
        result.append(chunk)
    LOG.info("%s: %d frames, %d faces tracked, %d frames to edit, %d chunk(s)%s", job.source, count,
             faces.tracks_found, int(edited.sum()), chunks,
             f" ({sum(c.reused for c in result)} already encoded)" if any(c.reused for c in result) else "")
    return result
