"""Converting only a region of a decoded frame to RGB gives exactly the whole frame's pixels there."""

import av
import numpy as np
import pytest

from pipelines.media.crop import crop_frame, crop_region
from pipelines.media.pictures import Orientation, View, plane_arrays


def noise_frame(pix_fmt: str, width: int, height: int, colorspace: int = 1, color_range: int = 1) -> av.VideoFrame:
    """A frame of random samples (the hardest case for chroma interpolation at a region's edge)."""
    frame = av.VideoFrame(width, height, pix_fmt)
    frame.colorspace, frame.color_range = colorspace, color_range
    rng = np.random.default_rng(7)
    for plane in plane_arrays(frame):
        top = 1023 if plane.dtype.itemsize == 2 else 255
        plane[:] = rng.integers(0, top + 1, plane.shape)
    return frame


@pytest.mark.parametrize("pix_fmt,colorspace,color_range", [("yuv420p", 1, 1), ("yuv420p", 5, 2),
                                                            ("yuv422p10le", 9, 1), ("yuv444p", 1, 1),
                                                            ("gbrp", 2, 0)])
@pytest.mark.parametrize("orientation", [Orientation(), Orientation.turn(90), Orientation(-1, 0, 0, 1)])
def test_region_equals_the_whole_pictures_pixels(pix_fmt, colorspace, color_range, orientation):
    frame = noise_frame(pix_fmt, 162, 96, colorspace, color_range)
    view = View(162, 96, 162, orientation)
    whole = view.picture(frame)
    height, width = whole.shape[:2]
    for left, top, right, bottom in [(7, 5, 60, 41), (0, 0, width, height), (-9, -3, 20, 30),
                                     (width - 33, height - 17, width + 11, height + 4), (31, 12, 32, 13)]:
        np.testing.assert_array_equal(view.region(frame, left, top, right, bottom),
                                      whole[max(0, top):bottom, max(0, left):right])


def test_crop_of_a_region_equals_the_crop_of_the_whole_picture():
    frame = noise_frame("yuv420p", 200, 120)
    view = View(200, 120, 200)
    whole = view.picture(frame)
    for box in [(20.3, 10.7, 90.3, 80.7), (-15, -20, 60, 55), (150, 70, 230, 150), (40, 5, 50, 15)]:
        for size in (32, 128):
            np.testing.assert_array_equal(
                crop_region(lambda *rect: view.region(frame, *rect), (200, 120), box, size),
                crop_frame(whole, box, size))


def test_odd_sizes_anamorphic_and_one_field_views_fall_back_to_the_whole_picture():
    frame, odd = noise_frame("yuv420p", 120, 80), noise_frame("yuv420p", 121, 81)
    for view, frame in ((View(120, 80, 160), frame), (View(120, 80, 120, field=0), frame), (View(121, 81, 121), odd)):
        np.testing.assert_array_equal(view.region(frame, 10, 10, 50, 40), view.picture(frame)[10:40, 10:50])
