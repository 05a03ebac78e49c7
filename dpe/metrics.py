"""Evaluation metrics for self-reconstruction and for pose/expression editing.

Image metrics (torch, images ``(B, 3, H, W)`` in [-1, 1], one value per sample): L1,
PSNR and SSIM with an 11x11 gaussian window (sigma 1.5, Wang et al. 2004; valid
region only, the same as scikit-image with ``gaussian_weights=True,
use_sample_covariance=False``).

Editing metrics (numpy) work on 68-point landmarks that the caller detected on the
source, the driver and the edited output, and use the split of ``dpe.landmarks``:

* pose distance: mean absolute yaw/pitch/roll difference in degrees, head shift in face
  units (outer eye-corner distances) and ``|log|`` of the scale ratio;
* expression distance: mean point distance between canonical-frame expression residuals,
  in face units.

Expression transfer (source pose kept) reports **pose drift** (output vs source) and an
AED-like expression distance to the driver; pose transfer (source expression kept)
reports **expression drift** (output vs source) and an APD-like pose distance to the
driver. All are lower-is-better.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .landmarks import split_pose_expression
from .losses import l1_distance

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
_K1, _K2 = 0.01, 0.03


def l1_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per sample, ``(B,)``."""
    _check_images(output, target)
    return l1_distance(output, target)


def psnr(output: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per sample (``inf`` for identical images)."""
    _check_images(output, target)
    mse = (output.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(channels: int, device: torch.device) -> torch.Tensor:
    coords = torch.arange(SSIM_WINDOW, dtype=torch.float32, device=device) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return torch.outer(g, g).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW)


def ssim(output: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Structural similarity per sample, averaged over channels and valid positions."""
    _check_images(output, target)
    if min(output.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(output.shape[-2:])}")
    x, y = output.float(), target.float()
    channels = x.shape[1]
    window = _gaussian_window(channels, x.device)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


def _check_images(output: torch.Tensor, target: torch.Tensor) -> None:
    if output.shape != target.shape or output.dim() != 4:
        raise ValueError(
            f"expected two image batches of the same shape (B, C, H, W), got {tuple(output.shape)} and {tuple(target.shape)}"
        )


class PoseDistance(NamedTuple):
    """Per-frame rigid pose difference between two landmark sets."""

    angle_deg: np.ndarray  # mean |delta yaw, pitch, roll| in degrees
    translation: np.ndarray  # head shift in face units (outer eye-corner distances)
    log_scale: np.ndarray  # |log(scale_a / scale_b)|


def pose_distance(landmarks_a: np.ndarray, landmarks_b: np.ndarray) -> PoseDistance:
    """Rigid pose difference of landmarks ``(..., 68, 2)``, per frame."""
    pose_a, _ = split_pose_expression(landmarks_a)
    pose_b, _ = split_pose_expression(landmarks_b)
    angle_diff = np.angle(np.exp(1j * (pose_a[..., :3] - pose_b[..., :3])))  # wrap to (-pi, pi]
    face_unit = 0.5 * (pose_a[..., 5] + pose_b[..., 5])
    return PoseDistance(
        angle_deg=np.degrees(np.abs(angle_diff)).mean(axis=-1),
        translation=np.linalg.norm(pose_a[..., 3:5] - pose_b[..., 3:5], axis=-1) / face_unit,
        log_scale=np.abs(np.log(pose_a[..., 5] / pose_b[..., 5])),
    )


def expression_distance(landmarks_a: np.ndarray, landmarks_b: np.ndarray) -> np.ndarray:
    """Mean point distance of the pose-free expression residuals (face units), per frame."""
    _, expression_a = split_pose_expression(landmarks_a)
    _, expression_b = split_pose_expression(landmarks_b)
    return np.linalg.norm(expression_a - expression_b, axis=-1).mean(axis=-1)


def expression_transfer_metrics(
    source: np.ndarray, driver: np.ndarray, output: np.ndarray
) -> dict[str, float]:
    """Pose drift (output vs source) and AED-like distance (output vs driver), frame means."""
    drift = pose_distance(output, source)
    return {
        "pose_drift_angle_deg": float(drift.angle_deg.mean()),
        "pose_drift_translation": float(drift.translation.mean()),
        "pose_drift_log_scale": float(drift.log_scale.mean()),
        "aed": float(expression_distance(output, driver).mean()),
    }


def pose_transfer_metrics(source: np.ndarray, driver: np.ndarray, output: np.ndarray) -> dict[str, float]:
    """Expression drift (output vs source) and APD-like pose distance (output vs driver), frame means."""
    to_driver = pose_distance(output, driver)
    return {
        "expression_drift": float(expression_distance(output, source).mean()),
        "apd_angle_deg": float(to_driver.angle_deg.mean()),
        "apd_translation": float(to_driver.translation.mean()),
        "apd_log_scale": float(to_driver.log_scale.mean()),
    }
