"""End to end on the real talking-face clip with the real dlib detector: crops, annotations, rejections."""

from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipelines.dataset.schema import ClipSample, Provenance
from pipelines.errors import CORRUPT_VIDEO, MULTIPLE_FACES, NO_FACE, SPAN_OUTSIDE_VIDEO, ClipRejected
from pipelines.media.crop import crop_frame, landmarks_to_crop
from pipelines.media.faces import DlibDetector
from pipelines.media.tracking import TrackingConfig, jitter
from pipelines.media.video import ffmpeg_exe, probe, read_frames
from pipelines.prepare.clip import process_clip
from pipelines.prepare.requests import MetaBox
from pipelines.prepare.settings import SampleFormat
from pipelines.sample.media import source_clip_path

SAMPLE = source_clip_path()
FORMAT = SampleFormat(tracking=TrackingConfig(min_face_px=32), preset="veryfast")
"""The sample is 176x144 with a face of about 46 px; production keeps the 64 px default."""
CROP_SIZE = FORMAT.crop_size
ORIGIN = Provenance(clip_id="id1/carphone/whole", identity="id1", video_id="carphone", url="file:carphone.mp4",
                    split="train", source="urls", requested_span=(None, None))


def _process(path, start_s, end_s, boxes=(), sample_format=FORMAT) -> ClipSample:
    return process_clip(path, start_s, end_s, list(boxes), DETECTOR, ORIGIN, sample_format).sample


def _ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-v", "error", "-y", *args], check=True)


DETECTOR = DlibDetector()


@pytest.fixture(scope="module")
def detector() -> DlibDetector:
    return DETECTOR


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("clips")
    paths = {name: directory / f"{name}.mp4" for name in ("noface", "twofaces", "truncated")}
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=176x144:rate=25", "-t", "2", "-c:v", "libx264",
            "-preset", "ultrafast", str(paths["noface"]))
    _ffmpeg("-i", str(SAMPLE), "-filter_complex", "[0:v]split[a][b];[a][b]hstack", "-t", "2",
            "-c:v", "libx264", "-preset", "ultrafast", "-crf", "18", "-movflags", "+faststart", str(paths["twofaces"]))
    full = directory / "faststart.mp4"
    _ffmpeg("-i", str(SAMPLE), "-c", "copy", "-movflags", "+faststart", str(full))
    data = full.read_bytes()
    paths["truncated"].write_bytes(data[: int(len(data) * 0.4)])
    return paths


@pytest.fixture(scope="module")
def processed(detector):
    return process_clip(SAMPLE, None, None, [], detector, ORIGIN, FORMAT)


@pytest.fixture(scope="module")
def clip(processed) -> ClipSample:
    return processed.sample


@pytest.fixture(scope="module")
def per_frame_detections(detector) -> np.ndarray:
    """The detector's raw box on every frame: what a crop without tracking or smoothing would follow.

    HOG misses the face in a few frames; those boxes are interpolated from the neighbours.
    """
    boxes = []
    for frame in read_frames(SAMPLE, 0.0, 4.0):
        faces = detector.detect(frame)
        boxes.append(faces[0].box if faces else (np.nan,) * 4)
    boxes = np.array(boxes)
    found = ~np.isnan(boxes[:, 0])
    assert found.mean() > 0.9
    frames = np.arange(len(boxes))
    return np.stack([np.interp(frames, frames[found], boxes[found, k]) for k in range(4)], axis=1)


def test_clip_has_crops_and_annotations_of_every_frame(clip, processed, tmp_path):
    assert clip.frames == 100 and clip.meta.detector == "dlib"
    assert clip.boxes.shape == (100, 4) and clip.boxes.dtype == np.float32
    assert clip.landmarks.shape == (100, 68, 2) and clip.landmarks.dtype == np.float32
    assert clip.pose.shape == (100, 6) and clip.pose.dtype == np.float32
    assert clip.expression.shape == (100, 68, 2) and clip.expression.dtype == np.float32
    assert processed.detector_calls < 100 / 4
    assert {"analyse_s", "encode_s", "total_s"} <= processed.timings.keys()
    assert clip.meta.span == pytest.approx((0.0, 4.0)) and clip.meta.requested_span == (None, None)
    path = tmp_path / "clip.mp4"
    path.write_bytes(clip.mp4)
    assert clip.mp4.find(b"moov") < clip.mp4.find(b"mdat")
    info = probe(path)
    assert (info.width, info.height, info.fps) == (CROP_SIZE, CROP_SIZE, 25.0)
    assert len(list(read_frames(path, 0.0, info.duration_s))) == 100


def test_crops_frame_the_face_like_the_data_the_official_model_was_trained_on(clip):
    """Landmark box about 0.52 of the crop side, its centre at about (0.49, 0.62) of width and height."""
    extent = clip.landmarks.max(axis=1) - clip.landmarks.min(axis=1)
    centre = (clip.landmarks.max(axis=1) + clip.landmarks.min(axis=1)) / 2
    assert np.median(extent.max(axis=1)) / CROP_SIZE == pytest.approx(0.52, abs=0.02)
    assert np.median(centre, axis=0) / CROP_SIZE == pytest.approx((0.49, 0.62), abs=0.02)


def test_landmarks_stay_inside_the_crop_in_every_frame(clip):
    margin = 0.05 * CROP_SIZE
    assert (clip.landmarks >= margin).all() and (clip.landmarks <= CROP_SIZE - margin).all()
    # The face fills a sensible part of the crop (neither a speck nor cut off).
    extent = clip.landmarks.max(axis=1) - clip.landmarks.min(axis=1)
    assert (extent.max(axis=1) > 0.35 * CROP_SIZE).all() and (extent.max(axis=1) < 0.8 * CROP_SIZE).all()


def test_crop_boxes_follow_the_detected_face(clip, per_frame_detections):
    crop_centres = (clip.boxes[:, :2] + clip.boxes[:, 2:]) / 2
    face_centres = (per_frame_detections[:, :2] + per_frame_detections[:, 2:]) / 2
    face_sizes = per_frame_detections[:, 2] - per_frame_detections[:, 0]
    assert (np.linalg.norm(crop_centres - face_centres, axis=1) < 0.3 * face_sizes).all()


def _mean_shake(boxes: np.ndarray) -> float:
    """Mean |second difference| of box centres over box size: HOG boxes move in steps, so at the sample's
    square-pixel width (193) most raw frame-to-frame steps are zero and the median (`jitter`) is 0 for them."""
    centres, sizes = (boxes[:, :2] + boxes[:, 2:]) / 2, np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    return float(np.mean(np.linalg.norm(centres[2:] - 2 * centres[1:-1] + centres[:-2], axis=1) / sizes[1:-1]))


def test_crops_are_steadier_than_per_frame_detections(clip, per_frame_detections):
    assert jitter(clip.boxes) < 0.005
    assert _mean_shake(clip.boxes) < 0.5 * _mean_shake(per_frame_detections)


def test_crops_are_resized_with_area_or_bicubic_never_nearest():
    frame = next(read_frames(SAMPLE, 1.0, 1.04))
    box = (40.0, 20.0, 130.0, 110.0)  # 90 px: enlarged to 256 (bicubic), shrunk to 64 (area)
    region = frame[20:110, 40:130]
    for size, interpolation in ((CROP_SIZE, cv2.INTER_CUBIC), (64, cv2.INTER_AREA)):
        ours = crop_frame(frame, box, size)
        np.testing.assert_array_equal(ours, cv2.resize(region, (size, size), interpolation=interpolation))
        nearest = cv2.resize(region, (size, size), interpolation=cv2.INTER_NEAREST)
        assert np.abs(ours.astype(int) - nearest.astype(int)).mean() > 1.0


@pytest.mark.parametrize("box", [(30.0, 40.0, 90.0, 100.0), (-20.0, -10.0, 60.0, 70.0), (130.3, 90.8, 190.3, 150.8)])
@pytest.mark.parametrize("size", [32, 256])
def test_landmark_transform_lands_on_the_same_image_content(box, size):
    image = np.zeros((144, 176, 3), np.uint8)
    point = np.array([(box[0] + box[2]) / 2 + 7, (box[1] + box[3]) / 2 - 5])
    x, y = np.clip(np.round(point).astype(int), 0, (175, 143))
    image[y - 1:y + 2, x - 1:x + 2] = 255
    crop = crop_frame(image, box, size)[..., 0].astype(float)
    ys, xs = np.mgrid[:size, :size]
    centroid = np.array([(crop * xs).sum(), (crop * ys).sum()]) / crop.sum()
    mapped = landmarks_to_crop(np.array([[x, y]], float), box, size)[0]
    assert np.abs(centroid - mapped).max() < max(1.0, 0.05 * size)


def test_a_video_without_faces_is_rejected_as_no_face(media, detector):
    with pytest.raises(ClipRejected) as caught:
        _process(media["noface"], 0.0, 2.0)
    assert caught.value.failure_class == NO_FACE
    assert str(media["noface"]) in caught.value.message


@pytest.fixture(scope="module")
def twofaces_right(media, detector) -> ClipSample:
    right_half = MetaBox(t=0.5, x=0.5 + 0.35 / 2, y=0.25, w=0.3 / 2, h=0.4)
    return _process(media["twofaces"], 0.0, 2.0, [right_half])


def test_two_faces_without_a_metadata_box_are_ambiguous(media, detector):
    with pytest.raises(ClipRejected) as caught:
        _process(media["twofaces"], 0.0, 2.0)
    assert caught.value.failure_class == MULTIPLE_FACES


def test_the_metadata_box_picks_the_face_it_names(twofaces_right):
    centres_x = (twofaces_right.boxes[:, 0] + twofaces_right.boxes[:, 2]) / 2
    assert twofaces_right.frames == 50
    assert (centres_x > 176).all()
    assert (twofaces_right.boxes[:, 0] >= 176 - 5).all()


def test_a_span_outside_the_video_is_rejected(detector):
    with pytest.raises(ClipRejected) as caught:
        _process(SAMPLE, 3.0, 6.0)
    assert caught.value.failure_class == SPAN_OUTSIDE_VIDEO
    assert "3.000-6.000" in caught.value.message


def test_a_truncated_video_is_rejected_as_corrupt(media, detector):
    with pytest.raises(ClipRejected) as caught:
        _process(media["truncated"], 0.0, 4.0)
    assert caught.value.failure_class == CORRUPT_VIDEO


def _peak_bytes(function):
    import tracemalloc

    tracemalloc.start()
    try:
        result = function()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def test_one_decode_gives_the_same_clip_as_two(detector):
    """The crops cut from the kept face parts are the crops of a second decode, byte for byte."""
    once = process_clip(SAMPLE, 0.0, 4.0, [], detector, ORIGIN, FORMAT)
    twice = process_clip(SAMPLE, 0.0, 4.0, [], detector, ORIGIN, FORMAT, region_budget_bytes=0)
    assert (once.decodes, twice.decodes) == (1, 2)
    assert once.sample.mp4 == twice.sample.mp4
    np.testing.assert_array_equal(once.sample.boxes, twice.sample.boxes)


def test_frames_are_streamed_and_only_face_parts_kept(detector, tmp_path):
    """In a wide frame, memory holds the parts around the face, never the decoded clip."""
    wide = tmp_path / "wide.mp4"  # the face at twice its size (about 90 px, found without rescaling) in 1920x480
    _ffmpeg("-i", str(SAMPLE), "-t", "4", "-vf", "scale=352:288,pad=1920:480:784:96", "-c:v", "libx264",
            "-preset", "ultrafast", "-crf", "12", str(wide))
    processed, peak = _peak_bytes(lambda: process_clip(wide, 0.0, 4.0, [], detector, ORIGIN, FORMAT))
    assert processed.decodes == 1
    assert peak < 0.25 * processed.sample.frames * 1920 * 480 * 3


def test_face_parts_past_the_memory_budget_are_dropped_for_a_second_decode(detector):
    budget = 200_000  # a few frames' parts
    processed, peak = _peak_bytes(lambda: process_clip(SAMPLE, 0.0, 4.0, [], detector, ORIGIN, FORMAT,
                                                       region_budget_bytes=budget))
    assert processed.decodes == 2
    assert peak < 0.5 * processed.sample.frames * 176 * 144 * 3
