"""Tracking logic on synthetic faces: IoU association, detection schedule, track choice, smoothing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.errors import (
    FACE_LEAVES_FRAME,
    FACE_TOO_SMALL,
    MULTIPLE_FACES,
    NO_FACE,
    TRACK_TOO_SHORT,
    ClipRejected,
)
from pipelines.media.faces import Face, FaceDetector
from pipelines.media.framing import Framing, checked_boxes, framing_of, outside_fraction
from pipelines.media.tracking import (
    FaceTrack,
    FaceTracker,
    TrackingConfig,
    associate,
    iou,
    jitter,
    select_track,
    smooth,
)

# A unit face: 68 points spread over a square of side 1 centred at the origin.
_UNIT = np.random.default_rng(1).uniform(-0.5, 0.5, (68, 2))
_UNIT[0], _UNIT[1] = (-0.5, -0.5), (0.5, 0.5)


def face_points(cx: float, cy: float, size: float) -> np.ndarray:
    return (_UNIT * size + (cx, cy)).astype(np.float32)


class ScriptedDetector(FaceDetector):
    """Faces move along scripted paths; frames carry their index in pixel (0, 0).

    `detect` returns every scripted face present (a box slightly larger than its landmarks);
    `landmarks` returns the true points of the scripted face nearest the given box.
    """

    name = "scripted"

    def __init__(self, paths, hidden=()):
        self.paths = paths  # list of functions: frame index -> (cx, cy, size) or None
        self.hidden = set(hidden)  # frame indices where detection misses everything
        self.detect_frames: list[int] = []

    def _faces(self, index):
        return [p(index) for p in self.paths if p(index) is not None]

    def detect(self, frame):
        index = int(frame[0, 0, 0])
        self.detect_frames.append(index)
        if index in self.hidden:
            return []
        return [Face((cx - 0.55 * s, cy - 0.5 * s, cx + 0.55 * s, cy + 0.6 * s), 1.0)
                for cx, cy, s in self._faces(index)]

    def landmarks(self, frame, box):
        index = int(frame[0, 0, 0])
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        cx, cy, s = min(self._faces(index) or [(centre[0], centre[1], box[2] - box[0])],
                        key=lambda f: (f[0] - centre[0]) ** 2 + (f[1] - centre[1]) ** 2)
        return face_points(cx, cy, s)


def run_tracker(detector, frames: int, config: TrackingConfig) -> FaceTracker:
    tracker = FaceTracker(detector, config)
    for index in range(frames):
        tracker.update(np.full((4, 4, 3), index, np.uint8))
    return tracker


def test_iou_of_known_boxes():
    assert iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


box_strategy = st.tuples(st.floats(0, 100), st.floats(0, 100), st.floats(1, 50), st.floats(1, 50)).map(
    lambda b: (b[0], b[1], b[0] + b[2], b[1] + b[3]))


@given(a=box_strategy, b=box_strategy)
def test_iou_is_symmetric_bounded_and_one_on_itself(a, b):
    assert iou(a, b) == pytest.approx(iou(b, a))
    assert 0.0 <= iou(a, b) <= 1.0
    assert iou(a, a) == pytest.approx(1.0)


def test_associate_prefers_the_best_overlap_and_leaves_strangers_unmatched():
    tracks = [(0, 0, 10, 10), (20, 0, 30, 10)]
    detections = [(21, 0, 31, 10), (1, 0, 11, 10), (100, 100, 110, 110)]
    assert sorted(associate(tracks, detections, 0.3)) == [(0, 1), (1, 0)]
    assert associate(tracks, [(9, 9, 19, 19)], 0.3) == []


def test_detector_runs_only_every_stride_frames_on_a_steady_face():
    detector = ScriptedDetector([lambda t: (50 + 0.5 * t, 50, 40)])
    tracker = run_tracker(detector, 50, TrackingConfig(detect_stride=10))
    assert detector.detect_frames == [0, 10, 20, 30, 40]
    assert len(tracker.tracks) == 1 and len(tracker.tracks[0].landmarks) == 50
    np.testing.assert_allclose(tracker.tracks[0].landmarks[37], face_points(50 + 18.5, 50, 40), atol=1e-4)


def test_a_jump_in_the_landmarks_triggers_an_early_detection():
    detector = ScriptedDetector([lambda t: (50 if t < 13 else 80, 50, 40)])
    run_tracker(detector, 30, TrackingConfig(detect_stride=10))
    assert 14 in detector.detect_frames


def test_an_opening_mouth_does_not_shrink_or_move_the_tracked_box():
    class MouthOpening(ScriptedDetector):
        def __init__(self):
            super().__init__([lambda t: (100, 100, 60)])
            self.boxes = []

        def landmarks(self, frame, box):
            self.boxes.append(box)
            points = super().landmarks(frame, box)
            index = int(frame[0, 0, 0])
            points[48:68, 1] += 2.0 * index  # mouth drops, jaw and eyes stay
            return points

    detector = MouthOpening()
    run_tracker(detector, 20, TrackingConfig(detect_stride=20))
    np.testing.assert_allclose(np.array(detector.boxes), np.array(detector.boxes[:1] * 20), atol=1e-6)


def test_one_missed_detection_is_bridged_but_a_vanished_face_ends_its_track():
    detector = ScriptedDetector([lambda t: (50, 50, 40) if t < 25 else None], hidden={10})
    tracker = run_tracker(detector, 50, TrackingConfig(detect_stride=5, max_missed_detections=1))
    assert len(tracker.tracks) == 1
    assert len(tracker.tracks[0].landmarks) == 21  # frames 0..20: frames after the last detection are dropped


def test_two_faces_make_two_tracks():
    detector = ScriptedDetector([lambda t: (40, 50, 30), lambda t: (140, 50, 30)])
    tracker = run_tracker(detector, 20, TrackingConfig(detect_stride=5))
    assert len(tracker.tracks) == 2
    assert {round(float(t.landmarks[-1][:, 0].mean())) for t in tracker.tracks} == {
        round(float(face_points(40, 50, 30)[:, 0].mean())), round(float(face_points(140, 50, 30)[:, 0].mean()))}


def make_track(cx, cy, size, frames, start=0):
    return FaceTrack(start=start, landmarks=[face_points(cx, cy, size) for _ in range(frames)])


def test_select_track_without_faces_is_no_face():
    with pytest.raises(ClipRejected) as caught:
        select_track([], 50, [], TrackingConfig())
    assert caught.value.failure_class == NO_FACE


def test_two_comparable_faces_without_metadata_are_ambiguous():
    tracks = [make_track(50, 50, 40, 50), make_track(150, 50, 38, 50)]
    with pytest.raises(ClipRejected) as caught:
        select_track(tracks, 50, [], TrackingConfig())
    assert caught.value.failure_class == MULTIPLE_FACES


def test_a_small_background_face_does_not_make_the_clip_ambiguous():
    main, background = make_track(50, 50, 60, 50), make_track(150, 50, 15, 50)
    assert select_track([background, main], 50, [], TrackingConfig()).track is main


def test_metadata_box_picks_its_face_and_rejects_when_nothing_is_there():
    left, right = make_track(50, 50, 40, 50), make_track(150, 50, 40, 50)
    chosen = select_track([left, right], 50, [(10, (125.0, 25.0, 175.0, 75.0))], TrackingConfig())
    assert chosen.track is right and chosen.choice == "the face at the metadata box"
    with pytest.raises(ClipRejected) as caught:
        select_track([left, right], 50, [(10, (300.0, 300.0, 350.0, 350.0))], TrackingConfig())
    assert caught.value.failure_class == NO_FACE


def _detections(tracks, calls):
    """What the detector saw at each call: the box of every track alive at that frame."""
    return [[tuple(t.landmark_boxes()[frame - t.start]) for t in tracks if t.start <= frame < t.end]
            for frame in calls]


def test_a_second_face_whose_track_broke_into_pieces_still_makes_the_clip_ambiguous():
    main = make_track(50, 50, 40, 50)
    pieces = [make_track(150, 50, 38, 8, start=start) for start in range(0, 50, 10)]  # each short and weak
    calls = list(range(0, 50, 5))
    with pytest.raises(ClipRejected) as caught:
        select_track([main, *pieces], 50, [], TrackingConfig(), _detections([main, *pieces], calls))
    assert caught.value.failure_class == MULTIPLE_FACES and "--face" in caught.value.message
    assert select_track([main, *pieces], 50, [], TrackingConfig(), _detections([main], calls)).track is main


@pytest.mark.parametrize("policy, expected", [("largest", 1), ("center", 0)])
def test_a_face_policy_picks_one_of_several_faces_and_says_which(policy, expected):
    tracks = [make_track(100, 60, 40, 50), make_track(170, 60, 44, 50)]  # frame 200 wide: the first is central
    chosen = select_track(tracks, 50, [], TrackingConfig(face_policy=policy), _detections(tracks, range(0, 50, 5)),
                          (200, 120))
    assert chosen.track is tracks[expected]
    assert chosen.faces_seen == 2 and f"--face {policy}" in chosen.choice


def test_a_track_covering_too_little_of_the_clip_is_too_short():
    with pytest.raises(ClipRejected) as caught:
        select_track([make_track(50, 50, 40, 20)], 50, [], TrackingConfig(min_track_fraction=0.8))
    assert caught.value.failure_class == TRACK_TOO_SHORT


def _boxes(track, frame_size=(400, 400), min_face_px=10.0, framing=Framing(face_fraction=0.5, centre_x=0.5,
                                                                           centre_y=0.5)):
    return checked_boxes(np.stack(track.landmarks), frame_size, framing, min_face_px, 0.2, track.start)


def test_crop_boxes_are_square_and_frame_the_face_as_asked():
    boxes = _boxes(make_track(100, 100, 50, 10))
    assert boxes.shape == (10, 4) and boxes.dtype == np.float32
    extent = np.ptp(face_points(100, 100, 50), axis=0).max()
    np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], extent / 0.5, rtol=1e-5)
    np.testing.assert_allclose(boxes[:, 3] - boxes[:, 1], extent / 0.5, rtol=1e-5)
    official = _boxes(make_track(100, 100, 50, 10), framing=Framing())
    landmarks = np.stack(make_track(100, 100, 50, 10).landmarks)
    assert framing_of(landmarks, official) == pytest.approx((0.52, 0.49, 0.62), abs=1e-3)


def test_small_faces_and_faces_at_the_border_are_rejected():
    with pytest.raises(ClipRejected) as caught:
        _boxes(make_track(100, 100, 20, 10), min_face_px=32)
    assert caught.value.failure_class == FACE_TOO_SMALL and "--min-face-px" in caught.value.message
    with pytest.raises(ClipRejected) as caught:
        _boxes(make_track(10, 100, 50, 10), min_face_px=32)
    assert caught.value.failure_class == FACE_LEAVES_FRAME


def test_outside_fraction_of_known_boxes():
    boxes = np.array([[0, 0, 10, 10], [-5, 0, 5, 10], [-10, -10, 0, 0]], dtype=float)
    np.testing.assert_allclose(outside_fraction(boxes, 100, 100), [0.0, 0.5, 1.0])


@given(slope=st.floats(-5, 5), offset=st.floats(-100, 100), count=st.integers(2, 60), window=st.integers(1, 25))
def test_smoothing_keeps_uniform_motion_exactly(slope, offset, count, window):
    line = offset + slope * np.arange(count, dtype=float)
    np.testing.assert_allclose(smooth(line, window), line, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), noise=st.floats(0.5, 5.0), speed=st.floats(-3, 3),
       count=st.integers(40, 200))
def test_smoothing_reduces_the_jitter_of_noisy_tracks(seed, noise, speed, count):
    rng = np.random.default_rng(seed)
    t = np.arange(count, dtype=float)
    centres = np.stack([100 + speed * t, 80 + 10 * np.sin(t / 25)], axis=1) + rng.normal(0, noise, (count, 2))
    sizes = np.full(count, 60.0)
    raw = np.concatenate([centres - sizes[:, None] / 2, centres + sizes[:, None] / 2], axis=1)
    smoothed_centres = smooth(centres, 9)
    smoothed = np.concatenate([smoothed_centres - 30, smoothed_centres + 30], axis=1)
    assert jitter(smoothed) < 0.25 * jitter(raw)


def test_jitter_is_zero_for_steady_and_uniformly_moving_boxes():
    t = np.arange(20, dtype=float)[:, None]
    moving = np.concatenate([t * 2, t, t * 2 + 50, t + 50], axis=1)
    assert jitter(moving) == pytest.approx(0.0, abs=1e-12)
