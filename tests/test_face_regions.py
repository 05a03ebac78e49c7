"""The kept face parts give exactly the crops of the whole frame, or say they cannot (then the clip decodes again)."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipelines.media.crop import crop_frame
from pipelines.prepare.clip import FaceRegions

FACE = np.random.default_rng(0).uniform(-0.5, 0.5, size=(68, 2))
"""A unit-sized face: landmark box centred on 0, side about 1."""


def _frame(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@settings(max_examples=60, deadline=None)
@given(width=st.integers(48, 240), height=st.integers(48, 240), cx=st.floats(0, 1), cy=st.floats(0, 1),
       face=st.floats(8, 80), dx=st.floats(-1.5, 1.5), dy=st.floats(-1.5, 1.5), scale=st.floats(0.5, 3.5),
       size=st.sampled_from([16, 64]))
def test_crops_from_face_parts_equal_crops_of_the_whole_frame(width, height, cx, cy, face, dx, dy, scale, size):
    frame = _frame(width, height, 1)
    centre = np.array([cx * width, cy * height])
    landmarks = centre + FACE * face / np.ptp(FACE, axis=0).max()
    regions = FaceRegions(reach=1.5, budget_bytes=10**9)
    regions.keep(frame, [landmarks])
    side = scale * face
    box_centre = centre + np.array([dx, dy]) * face
    box = np.array([[*(box_centre - side / 2), *(box_centre + side / 2)]], dtype=np.float32)
    x0, y0, x1, y1 = box[0]
    assume(x1 > 1 and y1 > 1 and x0 < width - 1 and y0 < height - 1)  # crop_frame refuses a box wholly outside
    crops = regions.crops(0, box, size, (width, height))
    inside_reach = np.abs(np.array([dx, dy])).max() + scale / 2 <= 1.4
    if crops is None:
        assert not inside_reach  # a box within the parts' reach is always served from them
    else:
        np.testing.assert_array_equal(next(crops), crop_frame(frame, box[0], size))


def test_a_frame_without_a_tracked_face_cannot_serve_a_crop():
    frame = _frame(64, 64, 2)
    regions = FaceRegions(reach=1.5, budget_bytes=10**9)
    regions.keep(frame, [])
    assert regions.crops(0, np.array([[10, 10, 40, 40]], np.float32), 16, (64, 64)) is None


def test_parts_past_the_budget_are_dropped():
    frame = _frame(200, 200, 3)
    landmarks = np.array([100.0, 100.0]) + FACE * 40
    regions = FaceRegions(reach=1.5, budget_bytes=3 * 130 * 130 * 3)
    for _ in range(5):
        regions.keep(frame, [landmarks])
    assert regions.overflowed and regions.nbytes == 0 and not regions.parts
    assert regions.crops(0, np.array([[80, 80, 120, 120]], np.float32), 16, (200, 200)) is None
