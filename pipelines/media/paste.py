"""Put an edited face crop back into the full-resolution frame without a visible seam.

Three steps, all in the crop's pixel space (so the cost does not depend on the video's resolution):

1. `face_mask`: a soft mask from 68 landmarks, no downloaded parsing network: the convex hull
   of the jaw line and the brows raised over the forehead, dilated, feathered with a Gaussian,
   and faded to zero before the crop's edge, so no box edge can show. Several landmark sets give
   the union of their regions: a pose edit moves the head, so the mask covers both where the
   face was and where the edit put it.
2. `match_colour`: the edited crop's colour is shifted (by whole levels per channel) to the
   source's, measured in the mask's transition band (where a colour step would show as a seam),
   not inside the face, whose content the edit changes on purpose.
3. `paste_overlay`: the crop and mask are resized to the crop box in the frame (area averaging when
   shrinking, bicubic when enlarging): an overlay the editing job blends into the decoded frame's
   own planes (`pictures.blend_overlay`); `paste_back` blends it into an RGB frame. Pixels where the
   mask is zero keep the source's values exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import cv2
import numpy as np

from pipelines.media.crop import pixel_box

JAW = slice(0, 17)
BROWS = slice(17, 27)
CHIN, NOSE_BRIDGE = 8, 27

MIN_WEIGHT = 1.0 / 255.0
"""Mask values below this are treated as zero (they could not change an 8-bit pixel by a half level)."""


class Overlay(NamedTuple):
    """RGB pixels to blend into a picture: (h, w, 3) uint8 `pixels` by (h, w) float32 `weights` in [0, 1],
    placed with their top-left corner at (left, top) (they may reach past the picture's edges)."""

    left: int
    top: int
    pixels: np.ndarray
    weights: np.ndarray


@dataclass(frozen=True)
class MaskConfig:
    """Shape of the soft face mask, in fractions of the face size (landmark extent) or crop side."""

    forehead: float = 0.3
    """The brows are raised by this fraction of the chin-to-nose-bridge distance, to cover the forehead."""
    dilate: float = 0.05
    """Grow the hull by this fraction of the face size."""
    feather: float = 0.07
    """Gaussian blur sigma as a fraction of the face size: the width of the soft edge."""
    border: float = 0.06
    """The mask fades linearly to zero within this fraction of the crop side from the crop's edge."""

    def __post_init__(self) -> None:
        for name in ("forehead", "dilate", "feather", "border"):
            if getattr(self, name) < 0:
                raise ValueError(f"mask {name} must not be negative, got {getattr(self, name)}")


def hull_points(landmarks: np.ndarray, forehead: float) -> np.ndarray:
    """Jaw line plus the brows moved up the face (along chin -> nose bridge) by `forehead` of that distance."""
    points = np.asarray(landmarks, dtype=np.float64)
    up = points[NOSE_BRIDGE] - points[CHIN]
    raised = points[BROWS] + forehead * up
    return np.concatenate([points[JAW], points[BROWS], raised])


def face_size(landmarks: np.ndarray) -> float:
    """The larger side of the landmarks' bounding box."""
    points = np.asarray(landmarks, dtype=np.float64)
    extent = points.max(axis=0) - points.min(axis=0)
    return float(max(extent.max(), 1.0))


def face_mask(landmark_sets: Sequence[np.ndarray], size: int, config: MaskConfig = MaskConfig()) -> np.ndarray:
    """(size, size) float32 mask in [0, 1]: the union of the face regions of every (68, 2) landmark set.

    Landmarks are in crop pixel coordinates. The soft edge scales with the first set's face size.
    """
    if not landmark_sets:
        raise ValueError("face_mask needs at least one landmark set")
    hard = np.zeros((size, size), np.uint8)
    shift = 4  # sub-pixel vertices: coordinates in 1/16 pixel
    for landmarks in landmark_sets:
        hull = cv2.convexHull(np.round(hull_points(landmarks, config.forehead) * (1 << shift)).astype(np.int32))
        cv2.fillConvexPoly(hard, hull, 255, lineType=cv2.LINE_AA, shift=shift)
    face = face_size(landmark_sets[0])
    radius = int(round(config.dilate * face))
    if radius > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        hard = cv2.dilate(hard, kernel)
    mask = hard.astype(np.float32) / 255.0
    sigma = config.feather * face
    if sigma > 0:
        mask = cv2.GaussianBlur(mask, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_CONSTANT)
    if config.border > 0:
        distance = np.minimum(np.arange(size), np.arange(size)[::-1]).astype(np.float32) + 0.5
        ramp = np.clip(distance / (config.border * size), 0.0, 1.0)
        mask *= ramp[:, None] * ramp[None, :]
    mask[mask < MIN_WEIGHT] = 0.0
    return np.clip(mask, 0.0, 1.0)


def match_colour(edited: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Shift `edited`'s colour per channel by its mean difference to `source` in the mask's transition band.

    The band weight 4 m (1 - m) peaks where the mask is one half, which is where a colour step
    between edit and source would show. The mean is a global statistic of smooth images, so it is
    measured on 64 px versions. Returns uint8; unchanged when the mask has no band.
    """
    side = mask.shape[0]
    if side > 64:
        shrink = (lambda image: cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA))
        mask, small_source, small_edited = shrink(mask), shrink(source), shrink(edited)
    else:
        small_source, small_edited = source, edited
    weight = 4.0 * mask * (1.0 - mask)
    total = float(weight.sum())
    if total < 1e-6:
        return edited
    difference = small_source.astype(np.float32) - small_edited.astype(np.float32)
    offset = np.einsum("ijc,ij->c", difference, weight) / total
    return cv2.add(edited, tuple(float(v) for v in np.round(offset)) + (0.0,))


def paste_overlay(frame_size: tuple[int, int], crop: np.ndarray, mask: np.ndarray,
                  box: np.ndarray | tuple[float, float, float, float]) -> Overlay | None:
    """`crop` and `mask` placed where `crop_frame(frame, box, size)` was taken in a frame of `frame_size`
    (width, height): the part inside the frame, with weights below `MIN_WEIGHT` set to zero; None
    when nothing of it would change the frame."""
    size = crop.shape[0]
    if crop.shape[:2] != (size, size) or mask.shape != (size, size):
        raise ValueError(f"crop {crop.shape} and mask {mask.shape} must be square and the same size")
    x0, y0, side = pixel_box(box)
    width, height = frame_size
    left, top, right, bottom = max(0, x0), max(0, y0), min(width, x0 + side), min(height, y0 + side)
    if left >= right or top >= bottom or not mask.any():
        return None
    interpolation = cv2.INTER_AREA if side < size else cv2.INTER_CUBIC
    big_crop = cv2.resize(crop, (side, side), interpolation=interpolation)
    big_mask = cv2.resize(mask, (side, side), interpolation=cv2.INTER_LINEAR)
    window = (slice(top - y0, bottom - y0), slice(left - x0, right - x0))
    weight = big_mask[window].astype(np.float32, copy=False)  # a new array's part: changed in place
    weight[weight < MIN_WEIGHT] = 0
    np.clip(weight, 0, 1, out=weight)
    if not weight.any():
        return None
    return Overlay(left, top, np.ascontiguousarray(big_crop[window]), weight)


def paste_back(frame: np.ndarray, crop: np.ndarray, mask: np.ndarray,
               box: np.ndarray | tuple[float, float, float, float]) -> np.ndarray:
    """A copy of `frame` with `crop` blended in by `mask` where `crop_frame(frame, box, size)` was taken."""
    result = frame.copy()
    overlay = paste_overlay((frame.shape[1], frame.shape[0]), crop, mask, box)
    if overlay is None:
        return result
    left, top, pixels, weight = overlay
    bottom, right = top + weight.shape[0], left + weight.shape[1]
    original = np.ascontiguousarray(frame[top:bottom, left:right])
    result[top:bottom, left:right] = cv2.blendLinear(pixels, original, weight, 1.0 - weight)
    return result
