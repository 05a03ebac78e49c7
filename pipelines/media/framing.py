"""Square crop boxes that frame a tracked face the way the DPE model saw faces in training.

Measured with the 68-point detector on the official repository's demo clips (VoxCeleb-style
crops, which the official checkpoint was trained on), the landmark box spans about 0.52 of the
crop's side and its centre sits at about (0.49, 0.62) of the crop's width and height: room for
the hair above, a little shoulder below. `Framing` holds those three numbers; `framed_boxes`
turns a face's per-frame landmarks into crop boxes framed that way.

The boxes move and scale with the rigid landmarks only (eyes and nose, `tracking.rigid_frame`),
calibrated to the track's median landmark box, so an opening mouth or raised brows do not shift
or resize the crop; centre and size are then smoothed with a centred moving average so the crop
does not jitter. Boxes may reach outside the frame: `crop.crop_frame` pads by replicating edges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.errors import FACE_LEAVES_FRAME, FACE_TOO_SMALL, ClipRejected
from pipelines.media.tracking import rigid_frame, smooth
from pipelines.options import Rule, option


@dataclass(frozen=True)
class Framing:
    """Where the face's landmark box sits in the crop, and how much the box track is smoothed."""

    face_fraction: float = 0.52
    """Side of the landmark box (its larger side) as a fraction of the crop side."""
    centre_x: float = 0.49
    """Horizontal position of the landmark box centre, as a fraction of the crop width."""
    centre_y: float = 0.62
    """Vertical position of the landmark box centre, as a fraction of the crop height (down is larger)."""
    smoothing_window: int = 9
    """Centred moving-average window for the box centre (frames)."""
    size_smoothing_window: int = 25
    """Centred moving-average window for the box size (frames): size changes slowly."""

    def __post_init__(self) -> None:
        if not 0.05 <= self.face_fraction <= 1.0:
            raise ValueError(f"face_fraction {self.face_fraction} must lie in [0.05, 1]")
        if not (0.0 < self.centre_x < 1.0 and 0.0 < self.centre_y < 1.0):
            raise ValueError(f"face centre ({self.centre_x}, {self.centre_y}) must lie inside the crop (0..1)")

    @property
    def reach(self) -> float:
        """How far the crop's farthest edge lies from the landmark box centre, in landmark box sides."""
        return max(self.centre_x, 1.0 - self.centre_x, self.centre_y, 1.0 - self.centre_y) / self.face_fraction


FRAMING_GROUP = "framing (where the face sits in the crop)"
_INSIDE_CROP = Rule("must lie inside the crop (0 < value < 1)", lambda value: 0.0 < value < 1.0)


@dataclass(frozen=True)
class FramingOptions:
    """The framing options a job shares (`portrait prepare` and `portrait edit`): a settings mixin."""

    face_fraction: float = option(Framing.face_fraction, "side of the face's landmark box as a fraction of the crop "
                                  "side (0.52: as in the data the official DPE model was trained on)",
                                  group=FRAMING_GROUP, metavar="F",
                                  rules=(Rule("must lie in [0.05, 1]", lambda value: 0.05 <= value <= 1.0),))
    face_centre_x: float = option(Framing.centre_x, "where the landmark box centre sits across the crop (0..1)",
                                  group=FRAMING_GROUP, metavar="X", rules=(_INSIDE_CROP,))
    face_centre_y: float = option(Framing.centre_y, "where the landmark box centre sits down the crop (0..1; 0.62 "
                                  "leaves room for hair)", group=FRAMING_GROUP, metavar="Y", rules=(_INSIDE_CROP,))

    @property
    def framing(self) -> Framing:
        return Framing(face_fraction=self.face_fraction, centre_x=self.face_centre_x, centre_y=self.face_centre_y)


def landmark_boxes(landmarks: np.ndarray) -> np.ndarray:
    """(T, 4) bounding boxes (x0, y0, x1, y1) of (T, 68, 2) landmarks."""
    points = np.asarray(landmarks, dtype=np.float64)
    return np.concatenate([points.min(axis=1), points.max(axis=1)], axis=1)


def framed_boxes(landmarks: np.ndarray, framing: Framing = Framing()) -> np.ndarray:
    """(T, 4) float32 square crop boxes for one face tracked over T consecutive frames.

    Frame t's box has side `landmark extent / face_fraction` and puts the landmark box centre at
    (`centre_x`, `centre_y`) of the crop, with extent and centre estimated from the rigid landmarks
    and smoothed over time.
    """
    points = np.asarray(landmarks, dtype=np.float64)
    if points.ndim != 3 or points.shape[1:] != (68, 2) or len(points) == 0:
        raise ValueError(f"landmarks must be (T, 68, 2) with T >= 1, got {points.shape}")
    extents = landmark_boxes(points)
    extent_sizes = np.maximum(extents[:, 2] - extents[:, 0], extents[:, 3] - extents[:, 1])
    extent_centres = (extents[:, :2] + extents[:, 2:]) / 2
    rigid_centres, spreads = rigid_frame(points)
    sizes = spreads * float(np.median(extent_sizes / spreads))
    offsets = np.median((extent_centres - rigid_centres) / spreads[:, None], axis=0)
    centres = smooth(rigid_centres + offsets * spreads[:, None], framing.smoothing_window)
    sides = smooth(sizes, framing.size_smoothing_window) / framing.face_fraction
    x0 = centres[:, 0] - framing.centre_x * sides
    y0 = centres[:, 1] - framing.centre_y * sides
    return np.stack([x0, y0, x0 + sides, y0 + sides], axis=1).astype(np.float32)


def framing_of(landmarks: np.ndarray, boxes: np.ndarray) -> tuple[float, float, float]:
    """Measured framing of landmarks in their crop boxes: median (face fraction, centre x, centre y)."""
    extents = landmark_boxes(landmarks)
    boxes = np.asarray(boxes, dtype=np.float64)
    sides = boxes[:, 2] - boxes[:, 0]
    fraction = np.maximum(extents[:, 2] - extents[:, 0], extents[:, 3] - extents[:, 1]) / sides
    centre_x = ((extents[:, 0] + extents[:, 2]) / 2 - boxes[:, 0]) / sides
    centre_y = ((extents[:, 1] + extents[:, 3]) / 2 - boxes[:, 1]) / sides
    return float(np.median(fraction)), float(np.median(centre_x)), float(np.median(centre_y))


def outside_fraction(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Per box, the fraction of its area outside a width x height frame."""
    inside_w = np.clip(np.minimum(boxes[:, 2], width) - np.maximum(boxes[:, 0], 0), 0, None)
    inside_h = np.clip(np.minimum(boxes[:, 3], height) - np.maximum(boxes[:, 1], 0), 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return 1.0 - inside_w * inside_h / np.maximum(area, 1e-9)


def checked_boxes(landmarks: np.ndarray, frame_size: tuple[int, int], framing: Framing, min_face_px: float,
                  max_outside_fraction: float, first_frame: int = 0) -> np.ndarray:
    """`framed_boxes` for a face that must be big enough and stay in the frame, else `ClipRejected`:
    `face_too_small` (median landmark extent below `min_face_px` source pixels) or `face_leaves_frame`
    (more than `max_outside_fraction` of some box outside the frame; frame numbers from `first_frame`)."""
    extents = landmark_boxes(landmarks)
    face = float(np.median(np.maximum(extents[:, 2] - extents[:, 0], extents[:, 3] - extents[:, 1])))
    if face < min_face_px:
        raise ClipRejected(FACE_TOO_SMALL, f"the face spans {face:.0f} px (< {min_face_px:.0f} px; --min-face-px)")
    boxes = framed_boxes(landmarks, framing)
    outside = outside_fraction(boxes, *frame_size)
    worst = int(np.argmax(outside))
    if outside[worst] > max_outside_fraction:
        raise ClipRejected(FACE_LEAVES_FRAME, f"{outside[worst]:.0%} of the crop lies outside the frame at frame "
                                              f"{first_frame + worst} (> {max_outside_fraction:.0%}; "
                                              "--max-outside-fraction)")
    return boxes
