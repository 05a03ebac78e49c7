"""pipelines.media.framing: crop boxes that put the face where the official model saw faces in training."""

from __future__ import annotations

import numpy as np
import pytest

from dpe.landmarks import project_template
from pipelines.media.framing import Framing, framed_boxes, framing_of
from pipelines.media.tracking import jitter


def track(frames: int = 60, seed: int = 0, noise: float = 0.0, mouth_open: bool = False) -> np.ndarray:
    """(T, 68, 2) landmarks of a face drifting right and growing, optionally with landmark noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames)
    poses = np.stack([np.zeros(frames), np.zeros(frames), np.zeros(frames), 300 + 2.0 * t, 200 + 0.5 * t,
                      90 + 0.3 * t], axis=1)
    points = project_template(poses)
    if mouth_open:
        points[:, 48:68, 1] += 25 * (t % 2)[:, None]  # the mouth opens every other frame
    return points + rng.normal(0, noise, points.shape)


@pytest.mark.parametrize("framing", [Framing(), Framing(face_fraction=0.6, centre_x=0.5, centre_y=0.55)])
def test_boxes_place_the_face_as_configured(framing):
    points = track()
    boxes = framed_boxes(points, framing)
    assert boxes.shape == (60, 4) and boxes.dtype == np.float32
    assert np.allclose(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])  # square
    fraction, centre_x, centre_y = framing_of(points, boxes)
    assert fraction == pytest.approx(framing.face_fraction, abs=0.01)
    assert centre_x == pytest.approx(framing.centre_x, abs=0.01)
    assert centre_y == pytest.approx(framing.centre_y, abs=0.01)


def test_the_default_is_the_official_framing():
    assert (Framing().face_fraction, Framing().centre_x, Framing().centre_y) == (0.52, 0.49, 0.62)


def test_boxes_follow_the_head_not_the_mouth():
    still, talking = framed_boxes(track()), framed_boxes(track(mouth_open=True))
    sides = talking[:, 2] - talking[:, 0]
    assert np.abs(talking - still).max() / sides.mean() < 0.02


def test_smoothing_steadies_noisy_landmarks():
    noisy = track(noise=2.0)
    raw = framed_boxes(noisy, Framing(smoothing_window=1, size_smoothing_window=1))
    smooth = framed_boxes(noisy)
    assert jitter(smooth) < 0.5 * jitter(raw)


def test_a_single_frame_gets_a_box():
    boxes = framed_boxes(track(frames=1))
    assert boxes.shape == (1, 4) and np.isfinite(boxes).all()


def test_bad_framing_values_are_refused():
    with pytest.raises(ValueError, match="face_fraction"):
        Framing(face_fraction=0.0)
    with pytest.raises(ValueError, match="inside the crop"):
        Framing(centre_y=1.2)
