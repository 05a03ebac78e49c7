"""Face detector backends: the real dlib models on the sample clip, and face-alignment's code path
with randomly initialised weights written to a temporary TORCH_HOME (never committed).

tests/conftest.py sets NUMBA_DISABLE_JIT=1, which spares face-alignment a 9 s JIT on first use.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipelines.media.faces import (
    FACE_ALIGNMENT_WEIGHTS,
    DlibDetector,
    FaceAlignmentDetector,
    detection_scale,
    face_alignment_available,
    make_detector,
)
from pipelines.media.video import read_frames
from pipelines.sample.media import source_clip_path


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return list(read_frames(source_clip_path(), 0.0, 4.0))[::20]


@pytest.fixture(scope="module")
def dlib_detector() -> DlibDetector:
    return DlibDetector()


def test_dlib_finds_the_one_face_in_every_sampled_frame(frames, dlib_detector):
    for frame in frames:
        faces = dlib_detector.detect(frame)
        assert len(faces) == 1
        x0, y0, x1, y1 = faces[0].box
        assert 30 < x1 - x0 < 100 and 30 < y1 - y0 < 100
        assert 0 <= x0 < x1 <= frame.shape[1] and 0 <= y0 < y1 <= frame.shape[0]


def test_dlib_landmarks_lie_on_the_detected_face(frames, dlib_detector):
    frame = frames[0]
    box = dlib_detector.detect(frame)[0].box
    points = dlib_detector.landmarks(frame, box)
    assert points.shape == (68, 2) and points.dtype == np.float32
    width = box[2] - box[0]
    centre = points.mean(axis=0)
    assert box[0] < centre[0] < box[2] and box[1] < centre[1] < box[3] + 0.2 * width
    # iBUG layout: the chin (8) is below the nose tip (30), which is below the eyes (36-47).
    assert points[8, 1] > points[30, 1] > points[36:48, 1].mean()
    assert points[36:42, 0].mean() < points[42:48, 0].mean()  # subject's right eye is on the image left


def test_dlib_finds_no_face_in_a_test_pattern(dlib_detector):
    pattern = np.zeros((144, 176, 3), np.uint8)
    pattern[:, ::16] = 255
    pattern[::16] = 255
    assert dlib_detector.detect(pattern) == []


@given(height=st.integers(16, 4000), width=st.integers(16, 4000))
def test_detection_scale_brings_the_short_side_into_range(height, width):
    scale = detection_scale((height, width), 280, 480)
    assert 280 - 1e-6 <= min(height, width) * scale <= 480 + 1e-6


def test_unknown_detector_name_is_refused():
    with pytest.raises(ValueError, match="choose one of"):
        make_detector("mtcnn")


def test_auto_uses_dlib_without_face_alignment_weights(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="pipelines.media.faces"):
        detector = make_detector("auto")
    assert detector.name == "dlib"
    assert "dlib" in caplog.text


def test_face_alignment_without_weights_fails_before_any_download(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        FaceAlignmentDetector(checkpoint_dir=tmp_path)
    assert all(name in str(caught.value) for name in FACE_ALIGNMENT_WEIGHTS)


@pytest.fixture(scope="module")
def random_torch_home(tmp_path_factory) -> str:
    """face-alignment weights of the right architecture, randomly initialised (about 180 MB, temporary)."""
    import torch
    from face_alignment.detection.sfd.net_s3fd import s3fd
    from face_alignment.models import FAN

    home = tmp_path_factory.mktemp("torch-home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(FAN(4).state_dict(), checkpoints / FACE_ALIGNMENT_WEIGHTS[0])
    torch.save(s3fd().state_dict(), checkpoints / FACE_ALIGNMENT_WEIGHTS[1])
    return str(home)


def test_auto_picks_face_alignment_and_runs_landmarks_on_a_given_box(random_torch_home, monkeypatch, frames,
                                                                     dlib_detector, caplog):
    monkeypatch.setenv("TORCH_HOME", random_torch_home)
    assert face_alignment_available()
    with caplog.at_level(logging.INFO, logger="pipelines.media.faces"):
        detector = make_detector("auto", flip_input=False)
    assert detector.name == "face-alignment" and "face-alignment" in caplog.text

    frame = frames[0]
    box = dlib_detector.detect(frame)[0].box
    points = detector.landmarks(frame, box)
    assert points.shape == (68, 2) and points.dtype == np.float32 and np.isfinite(points).all()
    # Random weights put the points anywhere, but always inside FAN's crop around the given box.
    size = max(box[2] - box[0], box[3] - box[1])
    assert (points[:, 0] > box[0] - size).all() and (points[:, 0] < box[2] + size).all()
    assert (points[:, 1] > box[1] - size).all() and (points[:, 1] < box[3] + size).all()

    faces = detector.detect(frame[:64, :64])
    assert all(len(face.box) == 4 and isinstance(face.score, float) for face in faces)
