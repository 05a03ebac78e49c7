"""pipelines.media.paste: a soft landmark mask, colour matching, and a paste that leaves every pixel
outside the mask exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest

from dpe.landmarks import project_template
from pipelines.media.crop import crop_frame, landmarks_to_crop
from pipelines.media.paste import MaskConfig, face_mask, match_colour, paste_back


def face(scale: float = 80.0, centre=(128.0, 120.0), yaw: float = 0.0) -> np.ndarray:
    """68 landmarks of the template face (pixels of a 256 px crop)."""
    return project_template(np.array([yaw, 0.0, 0.0, centre[0], centre[1], scale])).astype(np.float32)


def textured_frame(height: int = 288, width: int = 352, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_mask_is_one_on_the_face_zero_at_the_crop_edge_and_soft_between():
    points = face()
    mask = face_mask([points], 256)
    assert mask.dtype == np.float32 and mask.min() >= 0.0 and mask.max() <= 1.0
    nose = np.round(points[30]).astype(int)
    assert mask[nose[1], nose[0]] > 0.99
    border = int(MaskConfig().border * 256)
    assert not mask[:2].any() and not mask[-2:].any() and not mask[:, :2].any() and not mask[:, -2:].any()
    assert mask[:border // 2].max() < 0.5
    soft = (mask > 0.05) & (mask < 0.95)
    assert soft.sum() > 0.05 * (mask > 0.5).sum(), "the edge must be feathered, not a hard step"
    chin = np.round(points[8]).astype(int)
    assert mask[min(255, chin[1] + 40), chin[0]] < 0.05, "the mask must not run far below the chin"


def test_mask_covers_the_forehead_above_the_brows():
    points = face()
    brow_top = points[17:27, 1].min()
    centre_x = int(round(points[27, 0]))
    with_forehead = face_mask([points], 256, MaskConfig(forehead=0.3))
    without = face_mask([points], 256, MaskConfig(forehead=0.0))
    row = int(brow_top - 15)
    assert with_forehead[row, centre_x] > 0.9 > without[row, centre_x]


def test_union_of_two_faces_covers_both_positions():
    left, right = face(centre=(100.0, 120.0)), face(centre=(160.0, 120.0), yaw=0.3)
    union = face_mask([left, right], 256)
    for points in (left, right):
        inside = face_mask([points], 256) > 0.95
        assert union[inside].min() > 0.9
        nose = np.round(points[30]).astype(int)
        assert union[nose[1], nose[0]] > 0.99


def test_pixels_outside_the_mask_are_untouched_and_inside_take_the_crop():
    frame = textured_frame()
    box = np.array([100.0, 40.0, 260.0, 200.0])
    crop = np.full((64, 64, 3), 7, np.uint8)
    points = landmarks_to_crop(face(scale=50, centre=(180, 118)), (0, 0, 256, 256), 256) * 64 / 256
    mask = face_mask([points], 64)
    out = paste_back(frame, crop, mask, box)
    x0, y0, x1, y1 = box.astype(int)
    outside = np.ones(frame.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(out[outside], frame[outside])
    big_mask = np.zeros(frame.shape[:2], np.float32)
    import cv2

    big_mask[y0:y1, x0:x1] = cv2.resize(mask, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(out[big_mask == 0], frame[big_mask == 0])
    assert np.all(out[big_mask > 0.999] == 7)


def test_pasting_the_frames_own_crop_back_changes_it_only_by_resampling():
    rng = np.random.default_rng(1)
    frame = np.clip(rng.normal(128, 20, (288, 352, 3)), 0, 255).astype(np.uint8)
    import cv2

    frame = cv2.GaussianBlur(frame, (0, 0), 3)  # natural images are smooth at the pixel scale
    box = (90.0, 30.0, 290.0, 230.0)
    crop = crop_frame(frame, box, 256)
    points = face(scale=70, centre=(128, 110))
    out = paste_back(frame, crop, face_mask([points], 256), box)
    assert np.abs(out.astype(int) - frame.astype(int)).max() <= 3


def test_a_box_reaching_outside_the_frame_is_clipped():
    frame = textured_frame()
    box = (-60.0, -60.0, 100.0, 100.0)
    crop = np.zeros((32, 32, 3), np.uint8)
    out = paste_back(frame, crop, np.ones((32, 32), np.float32), box)
    assert np.all(out[:100, :100] == 0) and np.array_equal(out[100:], frame[100:])


@pytest.mark.parametrize("offset", [(30, -20, 10), (-40, 0, 0)])
def test_colour_matching_removes_a_colour_cast_seen_around_the_face(offset):
    rng = np.random.default_rng(2)
    source = np.clip(rng.normal(120, 30, (128, 128, 3)), 0, 255).astype(np.uint8)
    edited = np.clip(source.astype(int) + np.array(offset), 0, 255).astype(np.uint8)
    mask = face_mask([face(scale=40, centre=(64, 60))], 128)
    matched = match_colour(edited, source, mask)
    band = (mask > 0.1) & (mask < 0.9)
    before = np.abs((edited.astype(int) - source.astype(int))[band].mean(axis=0))
    after = np.abs((matched.astype(int) - source.astype(int))[band].mean(axis=0))
    assert after.max() < 2.0 < before.max()


def test_colour_matching_is_a_no_op_without_a_transition_band():
    edited = np.full((16, 16, 3), 50, np.uint8)
    assert match_colour(edited, np.zeros_like(edited), np.zeros((16, 16), np.float32)) is edited


def test_a_pose_edits_mask_is_the_union_of_the_source_face_and_the_edited_one(carphone_frames):
    """The paste of a pose edit (a detector given) masks the source face and the face found in the edited
    crop: never less than the source face's mask, and more where the edited face moved."""
    from pipelines.edit.compose import paste_face
    from pipelines.media.faces import make_detector

    detector = make_detector("dlib")
    frame = np.ascontiguousarray(carphone_frames[0])
    landmarks = detector.landmarks(frame, detector.detect(frame)[0].box)
    low, high = landmarks.min(axis=0), landmarks.max(axis=0)
    centre, side = (low + high) / 2, 2.2 * float((high - low).max())
    box = np.array([*(centre - side / 2), *(centre + side / 2)])
    source = crop_frame(frame, box, 128)
    moved = np.roll(source, 6, axis=1)  # the edited face, 6 crop pixels to the right
    frame_size = (frame.shape[1], frame.shape[0])
    source_only = paste_face(frame_size, moved, source, box, landmarks, 1.0, MaskConfig(), False, None)
    union = paste_face(frame_size, moved, source, box, landmarks, 1.0, MaskConfig(), False, detector)
    assert (union.left, union.top) == (source_only.left, source_only.top)
    assert np.all(union.weights >= source_only.weights - 1e-6)
    right_of_source = np.zeros_like(union.weights, bool)
    right_of_source[:, int(np.ceil(landmarks[:, 0].max())) - union.left:] = True
    assert union.weights[right_of_source].sum() > 1.2 * source_only.weights[right_of_source].sum()


def test_blending_into_the_frames_planes_keeps_every_sample_outside_the_weights_exactly():
    import av

    from pipelines.media.pictures import blend_overlay, plane_arrays

    frame = av.VideoFrame(64, 48, "yuv420p")
    frame.colorspace, frame.color_range = 1, 1
    rng = np.random.default_rng(3)
    for plane in plane_arrays(frame):
        plane[:] = rng.integers(16, 236, plane.shape)
    before = [plane.copy() for plane in plane_arrays(frame)]
    weights = np.zeros((20, 24), np.float32)
    weights[4:16, 8:20] = 1.0  # samples (chroma too) at x 18..29, y 14..25 of the frame
    pixels = np.full((20, 24, 3), (200, 30, 90), np.uint8)
    after = plane_arrays(blend_overlay(frame, 10, 10, pixels, weights))
    for plane, (old, new) in enumerate(zip(before, after)):
        step = 1 if plane == 0 else 2
        inside = np.zeros(old.shape, bool)
        inside[14 // step:26 // step, 18 // step:30 // step] = True
        np.testing.assert_array_equal(new[~inside], old[~inside])
    luma = after[0][14:26, 18:30].astype(float)  # inside, luma takes the colour (BT.709, limited range)
    assert np.abs(luma - (16 + 219 * (0.2126 * 200 + 0.7152 * 30 + 0.0722 * 90) / 255)).max() <= 0.5
