"""Cut a square box out of a frame and resize it to the training size, with landmarks carried along.

Resampling is area averaging when shrinking (no aliasing) and bicubic when enlarging; never
nearest neighbour, whose blocky frames the official DPE preprocessing produced. Parts of a box
outside the frame are filled by replicating the border pixels. The box is snapped to whole
pixels once (`pixel_box`) and the same snapped box transforms the landmarks, so image and
landmarks always agree exactly.
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np


def pixel_box(box: np.ndarray | tuple[float, float, float, float]) -> tuple[int, int, int]:
    """Snap a square (x0, y0, x1, y1) box to whole pixels: (x0, y0, side)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(1, int(round(max(x1 - x0, y1 - y0))))
    centre_x, centre_y = (x0 + x1) / 2, (y0 + y1) / 2
    return int(round(centre_x - side / 2)), int(round(centre_y - side / 2)), side


def crop_frame(frame: np.ndarray, box: np.ndarray | tuple[float, float, float, float],
               size: int) -> np.ndarray:
    """The box's content as a (size, size, 3) image (INTER_AREA when shrinking, INTER_CUBIC when enlarging)."""
    return crop_pixels(frame, *pixel_box(box), size)


def crop_pixels(frame: np.ndarray, x0: int, y0: int, side: int, size: int) -> np.ndarray:
    """`crop_frame` of an already snapped box: the same pixels cropped from a part of the frame give the
    same image when the box is shifted by whole pixels (the clip preparation's single decode relies on it)."""
    height, width = frame.shape[:2]
    pad_left, pad_top = max(0, -x0), max(0, -y0)
    pad_right, pad_bottom = max(0, x0 + side - width), max(0, y0 + side - height)
    region = frame[max(0, y0):min(height, y0 + side), max(0, x0):min(width, x0 + side)]
    if region.size == 0:
        raise ValueError(f"crop box ({x0}, {y0}) side {side} lies entirely outside the {width}x{height} frame")
    if pad_left or pad_top or pad_right or pad_bottom:
        region = cv2.copyMakeBorder(region, pad_top, pad_bottom, pad_left, pad_right, cv2.BORDER_REPLICATE)
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return cv2.resize(region, (size, size), interpolation=interpolation)


def crop_region(read: Callable[[int, int, int, int], np.ndarray], frame_size: tuple[int, int],
                box: np.ndarray | tuple[float, float, float, float], size: int) -> np.ndarray:
    """`crop_frame` of a frame of `frame_size` (width, height) that is read only where the box lies:
    `read(left, top, right, bottom)` gives those pixels (as `video.DecodedFrame.region` does)."""
    width, height = frame_size
    x0, y0, side = pixel_box(box)
    left, top, right, bottom = max(0, x0), max(0, y0), min(width, x0 + side), min(height, y0 + side)
    if left >= right or top >= bottom:
        raise ValueError(f"crop box ({x0}, {y0}) side {side} lies entirely outside the {width}x{height} frame")
    return crop_pixels(read(left, top, right, bottom), x0 - left, y0 - top, side, size)


def landmarks_to_crop(points: np.ndarray, box: np.ndarray | tuple[float, float, float, float],
                      size: int) -> np.ndarray:
    """Map (..., 2) source-pixel points into the pixel coordinates of `crop_frame(frame, box, size)`.

    Coordinates are pixel indices (a pixel's centre is an integer), as landmark models give them,
    so the half-pixel offsets make pixel centres map to pixel centres under the resize.
    """
    x0, y0, side = pixel_box(box)
    scale = size / side
    shifted = np.asarray(points, dtype=np.float64) - (x0, y0) + 0.5
    return (shifted * scale - 0.5).astype(np.float32)
