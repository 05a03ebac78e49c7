"""Split 68-point facial landmarks into rigid head pose and non-rigid expression.

Landmarks follow the iBUG 68-point layout produced by dlib's shape predictor and by
face-alignment: jaw 0-16, brows 17-26, nose bridge 27-30, nose base 31-35, eyes 36-47,
outer lips 48-59, inner lips 60-67; ``(x, y)`` in image pixels, y pointing down.

Per frame the split gives two fields (dataset manifests store them under these names):

* ``pose`` (T, 6): ``[yaw, pitch, roll, tx, ty, scale]``. The angles (radians) define
  ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)`` in the camera frame (x right, y down, z away
  from the camera); positive yaw moves the nose tip towards image left, positive pitch
  moves it down, positive roll turns the face clockwise on screen. ``(tx, ty)`` is
  where the template origin (the centroid of the stable points) lands in the image and
  ``scale`` is pixels per template unit (about the outer eye-corner distance).
* ``expression`` (T, 68, 2): the observed landmarks minus the posed template, divided by
  ``scale`` and mapped back through the in-plane 2x2 block of ``R`` (rotation and
  foreshortening undone, displacements taken to lie in the face plane), i.e. measured
  in the frontal, unit-scale template frame, in outer eye-corner distances. It does
  not change when the image is shifted, scaled or rotated in plane, it is zero for a
  neutral template face in any pose, and a deformation within the face plane (mouth
  opening, smile) reads the same from any head pose up to about 75 degrees.

Method: a scaled-orthographic (weak perspective) camera ``q = scale * R[:2] @ P + t``
is fitted by linear least squares on the points that move little with expression (eye
corners, nose, upper jaw); the 2x3 matrix is replaced by the nearest one with
orthonormal rows (SVD) and the third row of ``R`` is their cross product. Closed form,
so it vectorises over any leading dimensions.

The 3D template is built here from a parametric mean face (no downloaded data): jaw,
eyes and lips on ellipses, brows on a parabola, nose on straight lines, with 2D
proportions of an average frontal face and a depth per region (face sides about half a
face width behind the nose tip). It is exactly left-right symmetric.
"""

from __future__ import annotations

import numpy as np

NUM_LANDMARKS = 68

JAW = np.arange(0, 17)
NOSE_BRIDGE = np.arange(27, 31)
NOSE_BASE = np.arange(31, 36)
RIGHT_EYE = np.arange(36, 42)  # subject's right, image left
LEFT_EYE = np.arange(42, 48)
OUTER_LIPS = np.arange(48, 60)
INNER_LIPS = np.arange(60, 68)

# Points that move with the skull but hardly with expression: upper jaw near the ears,
# eye corners and the nose. Mouth, chin and brows are left out on purpose.
STABLE_POINTS = np.array([0, 1, 2, 14, 15, 16, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 39, 42, 45])

# Index of each point's mirror image under a left-right flip of the face.
MIRROR_INDEX = np.array(
    list(range(16, -1, -1))  # jaw
    + list(range(26, 16, -1))  # brows
    + [27, 28, 29, 30]  # nose bridge
    + [35, 34, 33, 32, 31]  # nose base
    + [45, 44, 43, 42, 47, 46]  # right eye <- left eye
    + [39, 38, 37, 36, 41, 40]  # left eye <- right eye
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]  # outer lips
    + [64, 63, 62, 61, 60, 67, 66, 65]  # inner lips
)


def _ellipse(cx: float, cy: float, a: float, b_up: float, b_down: float, angles: np.ndarray) -> np.ndarray:
    """Points on an ellipse in image coordinates (y down); angle 0 = right, pi/2 = up."""
    s = np.sin(angles)
    b = np.where(s > 0, b_up, b_down)
    return np.stack([cx + a * np.cos(angles), cy - b * s], axis=-1)


def _build_template() -> np.ndarray:
    """Parametric mean face, (68, 3), in a face box of width 1 before normalisation."""
    pts = np.zeros((NUM_LANDMARKS, 3))
    depth = np.zeros(NUM_LANDMARKS)

    # Jaw: half ellipse from the right ear (0) over the chin (8) to the left ear (16).
    theta = np.linspace(np.pi, 0.0, 17)
    pts[JAW, :2] = _ellipse(0.5, 0.2, 0.5, 0.0, 0.8, -theta)
    depth[JAW] = -0.05 + 0.5 * np.cos(theta) ** 2

    # Brows: a flat parabola peaking at two thirds of the way outwards.
    brow_x = np.linspace(0.08, 0.40, 5)
    pts[17:22, :2] = np.stack([brow_x, 0.02 + 1.2 * (brow_x - 0.19) ** 2], axis=-1)
    depth[17:22] = np.linspace(0.06, -0.03, 5)

    # Nose: bridge straight down the midline, base as a shallow arc.
    pts[NOSE_BRIDGE, :2] = np.stack([np.full(4, 0.5), np.linspace(0.21, 0.5, 4)], axis=-1)
    depth[NOSE_BRIDGE] = [-0.04, -0.10, -0.17, -0.25]
    pts[NOSE_BASE, :2] = np.stack(
        [np.linspace(0.40, 0.60, 5), [0.56, 0.58, 0.59, 0.58, 0.56]], axis=-1
    )
    depth[NOSE_BASE] = [-0.08, -0.12, -0.15, -0.12, -0.08]

    # Right eye (image left): outer corner 36, upper lid 37-38, inner corner 39, lower lid 40-41.
    eye_angles = np.array([np.pi, 2 * np.pi / 3, np.pi / 3, 0.0, -np.pi / 3, -2 * np.pi / 3])
    pts[RIGHT_EYE, :2] = _ellipse(0.265, 0.215, 0.105, 0.035, 0.03, eye_angles)
    depth[RIGHT_EYE] = [0.08, 0.02, 0.0, 0.01, 0.0, 0.03]

    # Lips: outer contour from the left corner 48 clockwise; inner contour from 60.
    outer_angles = np.pi - np.arange(12) * np.pi / 6
    pts[OUTER_LIPS, :2] = _ellipse(0.5, 0.76, 0.18, 0.055, 0.085, outer_angles)
    depth[OUTER_LIPS] = -0.02 - 0.08 * np.sin(np.abs(outer_angles)) ** 2
    inner_angles = np.pi - np.arange(8) * np.pi / 4
    pts[INNER_LIPS, :2] = _ellipse(0.5, 0.765, 0.14, 0.01, 0.01, inner_angles)
    depth[INNER_LIPS] = -0.02 - 0.06 * np.sin(np.abs(inner_angles)) ** 2

    # The subject's left side mirrors the right side.
    left_side = np.concatenate([np.arange(22, 27), LEFT_EYE])
    mirrored = MIRROR_INDEX[left_side]
    pts[left_side, 0] = 1.0 - pts[mirrored, 0]
    pts[left_side, 1] = pts[mirrored, 1]
    depth[left_side] = depth[mirrored]
    pts[:, 2] = depth

    pts -= pts[STABLE_POINTS].mean(axis=0)
    return pts / np.linalg.norm(pts[36, :2] - pts[45, :2])


# Smallest cos(yaw) * cos(pitch) used to undo foreshortening (about 75 degrees of yaw).
MIN_FORESHORTENING = 0.25

FACE_TEMPLATE_3D: np.ndarray = _build_template()
FACE_TEMPLATE_3D.flags.writeable = False


def rotation_matrix(yaw: np.ndarray, pitch: np.ndarray, roll: np.ndarray) -> np.ndarray:
    """``Rz(roll) @ Ry(yaw) @ Rx(pitch)`` for arrays of angles, shape (..., 3, 3)."""
    cy, sy = np.cos(yaw), np.sin(yaw)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cr, sr = np.cos(roll), np.sin(roll)
    return np.stack(
        [
            np.stack([cr * cy, cr * sy * sp - sr * cp, cr * sy * cp + sr * sp], axis=-1),
            np.stack([sr * cy, sr * sy * sp + cr * cp, sr * sy * cp - cr * sp], axis=-1),
            np.stack([-sy, cy * sp, cy * cp], axis=-1),
        ],
        axis=-2,
    )


def _angles_from_rotation(rot: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    yaw = np.arctan2(-rot[..., 2, 0], np.hypot(rot[..., 2, 1], rot[..., 2, 2]))
    pitch = np.arctan2(rot[..., 2, 1], rot[..., 2, 2])
    roll = np.arctan2(rot[..., 1, 0], rot[..., 0, 0])
    return yaw, pitch, roll


def project_template(pose: np.ndarray) -> np.ndarray:
    """Landmarks of the neutral template seen with ``pose`` (..., 6) -> (..., 68, 2)."""
    pose = np.asarray(pose, dtype=np.float64)
    if pose.shape[-1:] != (6,):
        raise ValueError(f"pose must have shape (..., 6) [yaw, pitch, roll, tx, ty, scale], got {pose.shape}")
    rot = rotation_matrix(pose[..., 0], pose[..., 1], pose[..., 2])
    projected = np.einsum("...ij,nj->...ni", rot[..., :2, :], FACE_TEMPLATE_3D)
    return pose[..., None, 5:6] * projected + pose[..., None, 3:5]


def split_pose_expression(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rigid pose (..., 6) and canonical-frame expression residual (..., 68, 2).

    See the module docstring for the meaning of each field. Works on any leading
    dimensions, e.g. (68, 2) for one face or (T, 68, 2) for a track.
    """
    q = np.asarray(landmarks, dtype=np.float64)
    if q.shape[-2:] != (NUM_LANDMARKS, 2):
        raise ValueError(f"landmarks must have shape (..., 68, 2) in the iBUG 68 layout, got {q.shape}")
    if not np.all(np.isfinite(q)):
        raise ValueError("landmarks contain NaN or infinite values; drop those frames before splitting")

    template = FACE_TEMPLATE_3D[STABLE_POINTS]  # centred on its own mean by construction
    observed = q[..., STABLE_POINTS, :]
    t = observed.mean(axis=-2)
    centred = observed - t[..., None, :]
    # Least-squares affine camera: centred ~ template @ M.T, M is (..., 2, 3).
    normal = template.T @ template
    m = np.swapaxes(np.linalg.solve(normal, template.T @ centred), -1, -2)

    u, sv, vt = np.linalg.svd(m, full_matrices=False)
    scale = sv.mean(axis=-1)
    if np.any(scale <= 1e-9):
        raise ValueError("landmarks are degenerate (all stable points coincide); cannot fit a head pose")
    rows = u @ vt  # nearest 2x3 matrix with orthonormal rows
    rot = np.concatenate([rows, np.cross(rows[..., 0, :], rows[..., 1, :])[..., None, :]], axis=-2)
    yaw, pitch, roll = _angles_from_rotation(rot)
    pose = np.stack([yaw, pitch, roll, t[..., 0], t[..., 1], scale], axis=-1)

    residual = (q - project_template(pose)) / scale[..., None, None]
    # Undo rotation and foreshortening: solve R[:2, :2] @ e = residual, taking the
    # displacement to lie in the face plane. det = cos(yaw) cos(pitch); capped so that
    # near-profile faces do not amplify detector noise.
    block = rot[..., :2, :2]
    det = np.maximum(block[..., 0, 0] * block[..., 1, 1] - block[..., 0, 1] * block[..., 1, 0], MIN_FORESHORTENING)
    adjugate = np.stack(
        [
            np.stack([block[..., 1, 1], -block[..., 0, 1]], axis=-1),
            np.stack([-block[..., 1, 0], block[..., 0, 0]], axis=-1),
        ],
        axis=-2,
    )
    expression = np.einsum("...ij,...nj->...ni", adjugate / det[..., None, None], residual)
    return pose, expression
