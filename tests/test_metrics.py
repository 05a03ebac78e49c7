"""Image metrics (L1, PSNR, SSIM) and landmark-based editing metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpe.landmarks import FACE_TEMPLATE_3D, project_template, rotation_matrix
from dpe.metrics import (
    expression_distance,
    expression_transfer_metrics,
    l1_error,
    pose_distance,
    pose_transfer_metrics,
    psnr,
    ssim,
)


def _images(seed: int, shape=(2, 3, 40, 48)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@settings(max_examples=30, deadline=None)
@given(offset=st.floats(0.01, 1.0), seed=st.integers(0, 1000))
def test_psnr_and_l1_of_a_constant_offset(offset: float, seed: int) -> None:
    images = _images(seed)
    shifted = images + offset
    np.testing.assert_allclose(l1_error(shifted, images).numpy(), offset, rtol=1e-4)
    np.testing.assert_allclose(psnr(shifted, images).numpy(), 10 * np.log10(4.0 / offset**2), rtol=1e-4)


def test_identical_images_give_perfect_scores() -> None:
    images = _images(0)
    assert torch.all(l1_error(images, images) == 0)
    assert torch.all(torch.isinf(psnr(images, images)))
    np.testing.assert_allclose(ssim(images, images).numpy(), 1.0, atol=1e-6)


def test_ssim_matches_scikit_image() -> None:
    from skimage.metrics import structural_similarity

    clean = _images(1)
    noisy = (clean + 0.3 * _images(2)).clamp(-1, 1)
    ours = ssim(noisy, clean).numpy()
    for i in range(len(clean)):
        reference = structural_similarity(
            noisy[i].numpy(), clean[i].numpy(), data_range=2.0, channel_axis=0,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        )
        np.testing.assert_allclose(ours[i], reference, atol=1e-5)


def test_ssim_falls_as_noise_grows_and_is_symmetric() -> None:
    clean, noise = _images(3), _images(4)
    scores = [ssim(clean + level * noise, clean).mean().item() for level in (0.05, 0.2, 0.5, 1.0)]
    assert scores == sorted(scores, reverse=True)
    np.testing.assert_allclose(ssim(clean, clean + noise).numpy(), ssim(clean + noise, clean).numpy(), rtol=1e-5)


def test_image_metrics_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        psnr(_images(0), _images(0, (2, 3, 40, 40)))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(_images(0, (1, 3, 8, 8)), _images(1, (1, 3, 8, 8)))


# --- landmark metrics ------------------------------------------------------------------

SMILE = np.zeros((68, 3))
SMILE[[48, 60], 0] = -0.08  # mouth corners move out and up
SMILE[[54, 64], 0] = 0.08
SMILE[[48, 54, 60, 64], 1] = -0.05


def _face(pose: np.ndarray, deformation: np.ndarray | float = 0.0) -> np.ndarray:
    rot = rotation_matrix(pose[0], pose[1], pose[2])
    return pose[5] * (FACE_TEMPLATE_3D + deformation) @ rot[:2].T + pose[3:5]


SOURCE_POSE = np.array([0.1, -0.05, 0.02, 128.0, 120.0, 60.0])
DRIVER_POSE = np.array([-0.3, 0.2, -0.1, 100.0, 140.0, 75.0])


def test_perfect_expression_transfer_has_no_drift_and_no_expression_gap() -> None:
    source, driver = _face(SOURCE_POSE), _face(DRIVER_POSE, SMILE)
    perfect = _face(SOURCE_POSE, SMILE)
    scores = expression_transfer_metrics(source, driver, perfect)
    assert all(abs(value) < 1e-9 for value in scores.values()), scores

    # Copying the driver's face wholesale keeps the expression but drifts the pose.
    copied = expression_transfer_metrics(source, driver, driver)
    assert copied["aed"] < 1e-9
    expected_angle = np.degrees(np.abs(DRIVER_POSE[:3] - SOURCE_POSE[:3])).mean()
    np.testing.assert_allclose(copied["pose_drift_angle_deg"], expected_angle, rtol=1e-6)
    np.testing.assert_allclose(copied["pose_drift_log_scale"], np.log(75.0 / 60.0), rtol=1e-6)


def test_pose_transfer_scores_expression_drift_and_pose_gap() -> None:
    source, driver = _face(SOURCE_POSE, SMILE), _face(DRIVER_POSE)
    perfect = _face(DRIVER_POSE, SMILE)
    scores = pose_transfer_metrics(source, driver, perfect)
    assert all(abs(value) < 1e-9 for value in scores.values()), scores

    lost_smile = pose_transfer_metrics(source, driver, driver)
    # The smile moves four points by hypot(0.08, 0.05) face units: the mean over 68 points.
    expected = 4 * np.hypot(0.08, 0.05) / 68
    np.testing.assert_allclose(lost_smile["expression_drift"], expected, rtol=1e-6)
    assert lost_smile["apd_angle_deg"] < 1e-9


@settings(max_examples=50, deadline=None)
@given(
    yaw=st.floats(-1.0, 1.0), pitch=st.floats(-0.6, 0.6), roll=st.floats(-1.0, 1.0),
    scale=st.floats(20, 200), seed=st.integers(0, 2**16),
)
def test_distances_are_symmetric_and_zero_on_self(yaw, pitch, roll, scale, seed) -> None:
    rng = np.random.default_rng(seed)
    a = project_template(np.array([yaw, pitch, roll, 0.0, 0.0, scale])) + rng.normal(0, 0.02 * scale, (68, 2))
    b = project_template(np.array([-yaw, pitch, roll, 10.0, 5.0, scale])) + rng.normal(0, 0.02 * scale, (68, 2))
    for field_ab, field_ba, field_aa in zip(pose_distance(a, b), pose_distance(b, a), pose_distance(a, a)):
        np.testing.assert_allclose(field_ab, field_ba, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(field_aa, 0.0, atol=1e-9)
    np.testing.assert_allclose(expression_distance(a, b), expression_distance(b, a), rtol=1e-9)
    assert expression_distance(a, a) < 1e-9
