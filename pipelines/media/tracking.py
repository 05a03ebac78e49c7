"""Face tracks over a clip: sparse detection, per-frame landmark tracking, track choice, stable crop boxes.

Running a detector on every frame is the expensive part of dataset preparation, so the detector
runs every `detect_stride` frames and between detections each face is followed by its landmarks:
the face's last detector box is moved and scaled with the rigid landmarks (eyes and nose, which
expressions barely move) from that detection to frame t, and given to the landmark model for frame
t+1 - so the model always gets the kind of box its detector gives, and an open mouth cannot shrink
the box frame after frame. When that box jumps (low IoU with the previous frame's), the next frame
is detected again. Detections join tracks by IoU.

One track per clip is kept: the one matching the metadata box when there is one, else the
dominant face; several comparable faces without a metadata box reject the clip, because the
identity label would be ambiguous. The crop box follows the rigid landmarks too (framed like the
track's median landmark extent), smoothed with a centred moving average on centre and size so
crops do not jitter, enlarged around the face and square.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipelines.errors import (
    MULTIPLE_FACES,
    NO_FACE,
    TRACK_TOO_SHORT,
    ClipRejected,
)
from pipelines.media.faces import ArrayPicture, Box, FaceDetector, Picture


@dataclass(frozen=True)
class TrackingConfig:
    """Knobs of detection, tracking, track choice and the faces kept (frames of the output rate); how
    the crop frames the face is `pipelines.media.framing.Framing`."""

    detect_stride: int = 25
    """Run the detector every this many frames (1 = every frame). On the sample, landmarks tracked
    between detections every 25 frames agree with landmarks on per-frame detections to 0.6 px mean."""
    redetect_below_iou: float = 0.7
    """Detect again on the next frame when the tracked box overlaps the previous one less than this."""
    match_iou: float = 0.3
    """A detection continues a track when it overlaps the track's current box at least this much."""
    max_missed_detections: int = 1
    """A track survives this many consecutive detector misses (followed by landmarks meanwhile)."""
    min_track_fraction: float = 0.8
    """The chosen track must cover at least this fraction of the clip's frames."""
    min_face_px: float = 64.0
    """Median landmark extent, in source pixels, below which a face is too small to crop."""
    max_outside_fraction: float = 0.2
    """Largest fraction of a crop box that may lie outside the frame (padded) in any frame."""
    comparable_faces_ratio: float = 0.6
    """Without a metadata box, a second face this prominent (coverage x size for tracks, size for single
    detections) makes the clip ambiguous."""
    crowded_fraction: float = 0.25
    """Several comparable faces detected together in at least this fraction of the detector calls
    make the clip ambiguous, however their tracks break up."""
    face_policy: str = "only"
    """Which face to keep when several are present and no metadata box picks one: "only" (reject the
    clip as multiple_faces), "largest", or "center" (nearest the frame centre)."""
    meta_match_distance: float = 0.5
    """A track matches a metadata box when their centres are closer than this fraction of the box size."""


@dataclass
class FaceTrack:
    """One face followed over consecutive frames: per-frame landmarks and the box they span."""

    start: int
    landmarks: list[np.ndarray] = field(default_factory=list)
    last_detected: int = -1
    missed: int = 0
    anchor: tuple[Box, np.ndarray, float] | None = None
    """The last detector box with the rigid landmarks' centre and spread in that frame."""

    @property
    def end(self) -> int:
        """One past the last frame of the track."""
        return self.start + len(self.landmarks)

    def landmark_boxes(self) -> np.ndarray:
        """(T, 4) bounding boxes of the per-frame landmarks."""
        points = np.stack(self.landmarks)
        return np.concatenate([points.min(axis=1), points.max(axis=1)], axis=1)

    def face_size(self) -> float:
        """Median landmark extent (the larger side), in pixels."""
        boxes = self.landmark_boxes()
        return float(np.median(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])))


def iou(a: Box | np.ndarray, b: Box | np.ndarray) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes (0 when either is empty)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def associate(track_boxes: list[Box], detections: list[Box], min_iou: float) -> list[tuple[int, int]]:
    """Greedy one-to-one matching of tracks to detections, highest IoU first, pairs above `min_iou`."""
    pairs = sorted(((iou(t, d), ti, di) for ti, t in enumerate(track_boxes) for di, d in enumerate(detections)),
                   reverse=True)
    used_tracks: set[int] = set()
    used_detections: set[int] = set()
    matches = []
    for overlap, ti, di in pairs:
        if overlap < min_iou:
            break
        if ti in used_tracks or di in used_detections:
            continue
        used_tracks.add(ti)
        used_detections.add(di)
        matches.append((ti, di))
    return matches


class FaceTracker:
    """Feed frames in order with `update`; `tracks` then holds every face track of the clip."""

    def __init__(self, detector: FaceDetector, config: TrackingConfig) -> None:
        self.detector = detector
        self.config = config
        self.tracks: list[FaceTrack] = []
        self._active: list[FaceTrack] = []
        self._frame = 0
        self._detect_next = True
        self.detector_calls = 0
        self.detections: list[list[Box]] = []
        """The face boxes of every detector call, so a choice can consider every face ever seen."""

    def update(self, frame: np.ndarray | Picture) -> None:
        """Follow every active face into this frame, detecting when due or when tracking got unsure. A
        `Picture` (a decoded frame) is converted to RGB whole only where the detector runs, at the size it
        looks at (`FaceDetector.detect_in`); elsewhere the landmark model reads only each face's surroundings
        (`FaceDetector.landmarks_in`)."""
        picture = ArrayPicture(frame) if isinstance(frame, np.ndarray) else frame
        index = self._frame
        due = index % self.config.detect_stride == 0
        boxes = {id(track): self._propagated_box(track, track.landmarks[-1]) for track in self._active}
        detected: dict[int, Box] = {}
        if due or self._detect_next:
            detected = self._detect(picture, index, boxes)
        self._detect_next = False
        for track in list(self._active):
            box = detected.get(id(track), boxes.get(id(track)))
            points = self.detector.landmarks_in(picture, box)
            if id(track) in detected:
                track.anchor = (box, *rigid_frame(points))
            elif iou(self._propagated_box(track, points), box) < self.config.redetect_below_iou:
                self._detect_next = True
            track.landmarks.append(points)
        self._frame += 1

    def current_landmarks(self) -> list[np.ndarray]:
        """The landmarks of every face followed into the last frame given to `update`."""
        return [track.landmarks[-1] for track in self._active]

    def _detect(self, picture: Picture, index: int, boxes: dict[int, Box]) -> dict[int, Box]:
        self.detector_calls += 1
        faces = self.detector.detect_in(picture)
        detections = [face.box for face in faces]
        self.detections.append(detections)
        matches = associate([boxes[id(t)] for t in self._active], detections, self.config.match_iou)
        matched = {ti: di for ti, di in matches}
        result: dict[int, Box] = {}
        for ti, track in enumerate(list(self._active)):
            if ti in matched:
                track.missed = 0
                track.last_detected = index
                result[id(track)] = detections[matched[ti]]
            else:
                track.missed += 1
                if track.missed > self.config.max_missed_detections:
                    self._end(track)
        taken = set(matched.values())
        for di, box in enumerate(detections):
            if di not in taken:
                track = FaceTrack(start=index, last_detected=index)
                self.tracks.append(track)
                self._active.append(track)
                result[id(track)] = box
        return result

    def _end(self, track: FaceTrack) -> None:
        """Stop a lost track, dropping frames followed since its last detection (they may have drifted)."""
        self._active.remove(track)
        del track.landmarks[track.last_detected + 1 - track.start:]

    @staticmethod
    def _propagated_box(track: FaceTrack, points: np.ndarray) -> Box:
        """The track's last detector box, moved and scaled like the rigid landmarks since that detection."""
        (x0, y0, x1, y1), anchor_centre, anchor_spread = track.anchor
        centre, spread = rigid_frame(points)
        scale = spread / anchor_spread
        ax, ay = anchor_centre
        cx, cy = centre
        return (cx + (x0 - ax) * scale, cy + (y0 - ay) * scale, cx + (x1 - ax) * scale, cy + (y1 - ay) * scale)


RIGID_POINTS = slice(27, 48)
"""iBUG 68 indices of the nose (27-35) and eyes (36-47): they move with the head, hardly with expression."""


def rigid_frame(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre and RMS spread of the rigid landmarks: the face's position and scale, blind to the mouth."""
    rigid = np.asarray(points, dtype=np.float64)[..., RIGID_POINTS, :]
    centre = rigid.mean(axis=-2)
    spread = np.sqrt(((rigid - centre[..., None, :]) ** 2).sum(axis=-1).mean(axis=-1))
    return centre, np.maximum(spread, 1e-6)


FACE_POLICIES = ("only", "largest", "center")


@dataclass(frozen=True)
class Selection:
    """The track to crop, how many comparable faces were seen together, and why this one."""

    track: FaceTrack
    faces_seen: int
    choice: str


def comparable_faces(detections: list[list[Box]], ratio: float) -> list[int]:
    """Per detector call, how many faces are at least `ratio` times the size of its largest face."""
    counts = []
    for boxes in detections:
        sides = [max(b[2] - b[0], b[3] - b[1]) for b in boxes]
        counts.append(sum(side >= ratio * max(sides) for side in sides) if sides else 0)
    return counts


def select_track(tracks: list[FaceTrack], frame_count: int, meta_boxes: list[tuple[int, Box]],
                 config: TrackingConfig, detections: list[list[Box]] | None = None,
                 frame_size: tuple[int, int] | None = None) -> Selection:
    """The one track to crop: nearest the metadata boxes (frame index, pixel box) if given, else the
    only face, else the one `config.face_policy` picks. Every face seen counts, including those
    whose tracks broke into pieces (`detections`, every detector call's boxes).
    Raises `ClipRejected` (no_face, multiple_faces, track_too_short)."""
    tracks = [t for t in tracks if t.landmarks]
    if not tracks:
        raise ClipRejected(NO_FACE, f"no face detected in {frame_count} frames")
    counts = comparable_faces(detections or [], config.comparable_faces_ratio)
    faces_seen = max(counts, default=1)
    crowded = sum(count >= 2 for count in counts)
    prominence = sorted(((len(t.landmarks) / frame_count * t.face_size(), i) for i, t in enumerate(tracks)),
                        reverse=True)
    if meta_boxes:
        distances = [(_meta_distance(t, meta_boxes), i) for i, t in enumerate(tracks)]
        distance, best = min(distances)
        if distance > config.meta_match_distance:
            raise ClipRejected(NO_FACE, f"none of {len(tracks)} face tracks lies at the metadata box "
                                        f"(nearest centre {distance:.2f} box sizes away)")
        chosen, choice = tracks[best], "the face at the metadata box"
    else:
        chosen = tracks[prominence[0][1]]
        rivals = [p for p, i in prominence[1:] if p >= config.comparable_faces_ratio * prominence[0][0]
                  and _overlap_in_time(tracks[i], chosen)]
        several = bool(rivals) or (bool(counts) and crowded >= max(1.0, config.crowded_fraction * len(counts)))
        if not several:
            choice = "the only face"
        elif config.face_policy == "only":
            raise ClipRejected(MULTIPLE_FACES, f"{max(faces_seen, len(rivals) + 1)} comparable faces (seen together in "
                                               f"{crowded} of {len(counts)} detections) and no metadata box to pick "
                                               "one; give the clip's face box, or --face largest|center")
        else:
            chosen = _by_policy(tracks, config, frame_count, frame_size)
            choice = f"the {config.face_policy} of {max(faces_seen, 2)} faces (--face {config.face_policy})"
    coverage = len(chosen.landmarks) / frame_count
    if coverage < config.min_track_fraction:
        raise ClipRejected(TRACK_TOO_SHORT, f"the face is tracked in {len(chosen.landmarks)} of {frame_count} "
                                            f"frames ({coverage:.0%} < {config.min_track_fraction:.0%})")
    return Selection(chosen, faces_seen, choice)


def _by_policy(tracks: list[FaceTrack], config: TrackingConfig, frame_count: int,
               frame_size: tuple[int, int] | None) -> FaceTrack:
    """The track `config.face_policy` picks among those long enough to keep (all of them if none is)."""
    if config.face_policy not in FACE_POLICIES[1:]:
        raise ValueError(f"face_policy must be one of {FACE_POLICIES}, got {config.face_policy!r}")
    long_enough = [t for t in tracks if len(t.landmarks) / frame_count >= config.min_track_fraction] or tracks
    if config.face_policy == "largest":
        return max(long_enough, key=lambda t: t.face_size())
    if frame_size is None:
        raise ValueError("face_policy 'center' needs the frame size")
    centre = np.array(frame_size, dtype=np.float64) / 2

    def distance(track: FaceTrack) -> float:
        boxes = track.landmark_boxes()
        return float(np.linalg.norm(((boxes[:, :2] + boxes[:, 2:]) / 2).mean(axis=0) - centre))

    return min(long_enough, key=distance)


def _overlap_in_time(a: FaceTrack, b: FaceTrack) -> bool:
    return a.start < b.end and b.start < a.end


def _meta_distance(track: FaceTrack, meta_boxes: list[tuple[int, Box]]) -> float:
    """Median distance between track and metadata box centres, in metadata box sizes (nearest frame)."""
    boxes = track.landmark_boxes()
    distances = []
    for frame, meta in meta_boxes:
        local = int(np.clip(frame - track.start, 0, len(boxes) - 1))
        x0, y0, x1, y1 = boxes[local]
        centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
        meta_centre = np.array([(meta[0] + meta[2]) / 2, (meta[1] + meta[3]) / 2])
        meta_size = max(meta[2] - meta[0], meta[3] - meta[1], 1e-6)
        distances.append(float(np.linalg.norm(centre - meta_centre) / meta_size))
    return float(np.median(distances))


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average along axis 0; the window shrinks symmetrically at the ends (no lag, no padding bias)."""
    values = np.asarray(values, dtype=np.float64)
    count = len(values)
    half = max(0, window // 2)
    if half == 0 or count < 2:
        return values.copy()
    cumulative = np.concatenate([np.zeros((1,) + values.shape[1:]), np.cumsum(values, axis=0)])
    index = np.arange(count)
    reach = np.minimum(np.minimum(index, count - 1 - index), half)
    total = cumulative[index + reach + 1] - cumulative[index - reach]
    return total / (2 * reach + 1).reshape((-1,) + (1,) * (values.ndim - 1))


def jitter(boxes: np.ndarray) -> float:
    """Median frame-to-frame shake of box centres: |second difference| over box size (0 = steady or uniform motion)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    if len(boxes) < 3:
        return 0.0
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    sizes = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    second = np.linalg.norm(centres[2:] - 2 * centres[1:-1] + centres[:-2], axis=1)
    return float(np.median(second / sizes[1:-1]))
