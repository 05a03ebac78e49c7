"""What a person looks at during training: evaluation on fixed held-out pairs, and the picture grid.

Both use pairs fixed for the whole run (`pairs.fixed_pairs`): frames A and B of the same
clip, from the evaluation split. With A as source and B as driver:

* **reconstruction**: `transfer_both` (B's expression and pose on A) should give B: L1, PSNR
  and SSIM against B (`dpe.metrics`);
* **pose drift under expression transfer**: landmarks of the expression-transfer output
  against A's (its pose must stay A's), and its expression distance to B (AED-like);
* **expression drift under pose transfer**: landmarks of the pose-transfer output against A's,
  and its pose distance to B (APD-like).

Landmarks of outputs, and for a like-for-like comparison of A and B too, are placed by the
68-point detector of `pipelines.media.faces` inside the face box of A's stored landmarks, on
frames enlarged to at least 256 px. Without a usable detector the landmark metrics are left
out (logged once); the image metrics remain.

`self_reconstruction_l1` is the proof that the loop trains: both branches reconstruct fixed
*training* frames from their own motion, and the mean L1 must fall.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import cv2
import numpy as np

from pipelines.train.pairs import Pair, pairs_to_batch

LOG = logging.getLogger(__name__)

LANDMARK_SIZE = 256
"""Frames are enlarged to this size before landmarks are placed (the detector's working scale)."""
GRID_TILE = 128
GRID_COLUMNS = ("source", "driving", "expression", "pose", "both")
_LABEL_HEIGHT = 20


def _images(pairs: list[Pair], device) -> tuple[Any, Any]:
    import torch

    batch = pairs_to_batch(pairs)
    return (torch.from_numpy(batch["frame_a"]).to(device), torch.from_numpy(batch["frame_b"]).to(device))


def transfers(generator, pairs: list[Pair]) -> dict[str, np.ndarray]:
    """Source, driving and the three edits of each pair as uint8 RGB (N, S, S, 3) arrays."""
    from dpe.editing import expression_transfer, pose_transfer, transfer_both

    with _inference(generator) as device:
        source, driving = _images(pairs, device)
        images = {"source": source, "driving": driving,
                  "expression": expression_transfer(generator, source, driving),
                  "pose": pose_transfer(generator, source, driving),
                  "both": transfer_both(generator, source, driving)}
    return {name: _to_uint8(image) for name, image in images.items()}


@contextlib.contextmanager
def _inference(generator):
    """Eval mode without gradients for the block (yields the generator's device), training mode restored."""
    import torch

    was_training = generator.training
    generator.eval()
    try:
        with torch.no_grad():
            yield next(generator.parameters()).device
    finally:
        generator.train(was_training)


def _to_uint8(images) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def self_reconstruction_l1(generator, pairs: list[Pair]) -> float:
    """Mean L1 (images in [-1, 1]) of both branches reconstructing frame A of each pair from its own motion."""
    import torch

    from dpe.metrics import l1_error

    with _inference(generator) as device:
        frames, _ = _images(pairs, device)
        code = generator.encode(frames)
        outputs = [generator.reconstruct_expression(code), generator.reconstruct_pose(code)]
        return float(torch.stack([l1_error(out.float(), frames) for out in outputs]).mean())


class Evaluator:
    """Evaluation of a generator on fixed held-out pairs; the landmark detector is made on first use."""

    def __init__(self, pairs: list[Pair], train_pairs: list[Pair], detector: str = "auto") -> None:
        self.pairs = pairs
        self.train_pairs = train_pairs
        self.detector_name = detector
        self._detector = None
        self._detector_failed = False

    def evaluate(self, generator, images: dict[str, np.ndarray] | None = None) -> dict[str, float]:
        """Metrics by name (lower is better except PSNR and SSIM); `images`: `transfers` of the pairs
        when already made for a grid."""
        import torch

        from dpe.metrics import l1_error, psnr, ssim

        metrics: dict[str, float] = {"train_self_l1": self_reconstruction_l1(generator, self.train_pairs)}
        if not self.pairs:
            return metrics
        images = images if images is not None else transfers(generator, self.pairs)
        both = torch.from_numpy(images["both"]).permute(0, 3, 1, 2).float() / 127.5 - 1
        target = torch.from_numpy(images["driving"]).permute(0, 3, 1, 2).float() / 127.5 - 1
        metrics.update(l1=float(l1_error(both, target).mean()), psnr=float(psnr(both, target).mean()))
        if both.shape[-1] >= 11:
            metrics["ssim"] = float(ssim(both, target).mean())
        metrics.update(self._landmark_metrics(images))
        return metrics

    def _landmark_metrics(self, images: dict[str, np.ndarray]) -> dict[str, float]:
        from dpe.metrics import expression_transfer_metrics, pose_transfer_metrics

        detector = self._get_detector()
        if detector is None:
            return {}
        boxes = [_face_box(pair.landmarks[0]) for pair in self.pairs]
        marks = {name: np.stack([_place(detector, image, box) for image, box in zip(images[name], boxes)])
                 for name in ("source", "driving", "expression", "pose")}
        out = {}
        out.update(expression_transfer_metrics(marks["source"], marks["driving"], marks["expression"]))
        out.update(pose_transfer_metrics(marks["source"], marks["driving"], marks["pose"]))
        return out

    def _get_detector(self):
        if self._detector is None and not self._detector_failed:
            from pipelines.media.faces import make_detector

            try:
                self._detector = make_detector(self.detector_name)
            except (ImportError, OSError, RuntimeError, ValueError) as error:
                self._detector_failed = True
                LOG.warning("evaluation without landmark metrics (pose/expression drift): no detector: %s", error)
        return self._detector


def _face_box(landmarks: np.ndarray) -> tuple[float, float, float, float]:
    """A square box around landmarks, enlarged like a detector's face box."""
    x0, y0 = landmarks.min(axis=0)
    x1, y1 = landmarks.max(axis=0)
    cx, cy, side = (x0 + x1) / 2, (y0 + y1) / 2, 1.15 * max(x1 - x0, y1 - y0)
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def _place(detector, image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """68 landmarks of the face in `box`, placed on the image enlarged to `LANDMARK_SIZE`, in image pixels."""
    scale = max(1.0, LANDMARK_SIZE / image.shape[0])
    if scale > 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    marks = detector.landmarks(np.ascontiguousarray(image), tuple(v * scale for v in box))
    return np.asarray(marks, dtype=np.float64) / scale


def grid_png(images: dict[str, np.ndarray]) -> bytes:
    """One row per pair: source, driving, expression transfer, pose transfer, both; labelled columns."""
    rows = []
    for i in range(len(images["source"])):
        tiles = [cv2.resize(images[name][i], (GRID_TILE, GRID_TILE), interpolation=cv2.INTER_CUBIC)
                 for name in GRID_COLUMNS]
        rows.append(np.concatenate(tiles, axis=1))
    header = np.full((_LABEL_HEIGHT, GRID_TILE * len(GRID_COLUMNS), 3), 255, np.uint8)
    for column, name in enumerate(GRID_COLUMNS):
        cv2.putText(header, name, (column * GRID_TILE + 6, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    picture = np.concatenate([header, *rows], axis=0)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding of the training grid failed")
    return encoded.tobytes()
