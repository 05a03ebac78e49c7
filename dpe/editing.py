"""Batched expression / pose editing with a DPE generator.

Every function takes image tensors ``(B, 3, H, W)`` in [-1, 1] or precomputed :class:`FrameCode`
objects, works on the device of its inputs, runs without gradients, and returns float32 images
(not clamped). Wrap calls in ``torch.autocast(device_type, dtype=torch.bfloat16)`` or pass
``amp_dtype=torch.bfloat16`` for mixed precision; the motion network and heads stay float32.

Motion target (``d`` fed to a head; ``z = w_S + head(d)``):

- ``mode="absolute"`` (official behaviour at ``strength=1``): ``d = lerp(d_S, d_D, strength)``.
- ``mode="relative"``: ``d = d_S + strength * (d_D - d_Ref)``: the driver's motion relative to a
  reference driving frame is applied on top of the source's own motion, so the source keeps its
  head scale and framing; when the driver equals the reference, ``d = d_S``.

``strength=0`` therefore gives ``z = w_S + head(d_S)``, the official self-reconstruction of the
source through that branch (bit-identical to :meth:`DPEGenerator.reconstruct_expression` /
``reconstruct_pose``). Because the heads are affine (linear layers without activations),
interpolating the motion is the same as interpolating the offsets
``head(d_S) + strength * (head(d_D) - head(d_S))``.

Precompute once: :func:`encode_source` encodes a still source (latent, motion, features) and
:func:`encode_driving` a driving frame (latent, motion); pass them instead of tensors so a fixed
source or a fixed driver is not re-encoded for every frame. A batch-1 code broadcasts against a
batch of the other operand without copying.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal, Union

import torch

from .model import DPEGenerator, Encoded

Mode = Literal["absolute", "relative"]


@dataclass(frozen=True)
class FrameCode:
    """Encoder output of a batch of frames, reusable across many edits.

    ``features`` is ``None`` for driving codes (only their motion is used).
    """

    latent: torch.Tensor  # (B, style_dim)
    motion: torch.Tensor  # (B, style_dim), float32, d = Q alpha
    features: list[torch.Tensor] | None = None

    @property
    def batch(self) -> int:
        return self.latent.shape[0]

    def encoded(self) -> Encoded:
        if self.features is None:
            raise ValueError("this FrameCode has no features (a driving code); use encode_source for sources")
        return Encoded(self.latent, self.features)


Frames = Union[torch.Tensor, FrameCode]


@torch.no_grad()
def encode_source(model: DPEGenerator, images: torch.Tensor) -> FrameCode:
    """Encode source frames once: latent, motion and the skip features the generators warp."""
    code = model.encode(images)
    return FrameCode(code.latent, model.motion_vector(code.latent), list(code.features))


@torch.no_grad()
def encode_driving(model: DPEGenerator, images: torch.Tensor) -> FrameCode:
    """Encode driving frames once: only latent and motion are kept."""
    latent = model.encode(images).latent
    return FrameCode(latent, model.motion_vector(latent), None)


def _as_source(model: DPEGenerator, x: Frames) -> FrameCode:
    if isinstance(x, FrameCode):
        if x.features is None:
            raise ValueError("source code has no features: build it with encode_source")
        return x
    return encode_source(model, x)


def _as_driving(model: DPEGenerator, x: Frames) -> FrameCode:
    return x if isinstance(x, FrameCode) else encode_driving(model, x)


def _batch(*sizes: int) -> int:
    big = max(sizes)
    bad = [s for s in sizes if s not in (1, big)]
    if bad:
        raise ValueError(f"batch sizes {sizes} do not broadcast (each must be 1 or {big})")
    return big


def _strength(strength: float | torch.Tensor, batch: int, ref: torch.Tensor) -> torch.Tensor | float:
    if isinstance(strength, torch.Tensor):
        s = strength.to(device=ref.device, dtype=ref.dtype).reshape(-1, 1)
        if s.shape[0] not in (1, batch):
            raise ValueError(f"strength has {s.shape[0]} values for a batch of {batch}")
        return s
    return float(strength)


def target_motion(source_motion: torch.Tensor, driving_motion: torch.Tensor,
                  strength: float | torch.Tensor = 1.0, mode: Mode = "absolute",
                  reference_motion: torch.Tensor | None = None) -> torch.Tensor:
    """Motion vector fed to a head (see the module docstring). Shapes broadcast over the batch."""
    batch = _batch(source_motion.shape[0], driving_motion.shape[0],
                   *(() if reference_motion is None else (reference_motion.shape[0],)))
    s = _strength(strength, batch, source_motion)
    if mode == "absolute":
        if reference_motion is not None:
            raise ValueError("driving_reference is only used with mode='relative'")
        # lerp returns its end points exactly at weights 0 and 1 (bit-identical self-reconstruction).
        return torch.lerp(source_motion, driving_motion, s).expand(batch, -1)
    if mode == "relative":
        if reference_motion is None:
            raise ValueError("mode='relative' needs driving_reference (e.g. the first frame of the driving video)")
        return (source_motion + s * (driving_motion - reference_motion)).expand(batch, -1)
    raise ValueError(f"mode must be 'absolute' or 'relative', got {mode!r}")


def _amp(source: Frames, amp_dtype: torch.dtype | None):
    """Autocast on the device of the inputs when ``amp_dtype`` is given."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    device = (source.latent if isinstance(source, FrameCode) else source).device
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _transfer(model: DPEGenerator, branch: str, source: Frames, driving: Frames, strength, mode: Mode,
              driving_reference: Frames | None) -> torch.Tensor:
    src = _as_source(model, source)
    drv = _as_driving(model, driving)
    ref = None if driving_reference is None else _as_driving(model, driving_reference)
    d = target_motion(src.motion, drv.motion, strength, mode, None if ref is None else ref.motion)
    batch = d.shape[0]
    code = src.encoded().expand(batch)
    if branch == "expression":
        z = code.latent + model.expression_offset(d)
        out = model.render_expression(z, code.features)
    else:
        z = code.latent + model.pose_offset(d)
        out = model.render_pose(z, code.features)
    return out.float()


@torch.no_grad()
def expression_transfer(model: DPEGenerator, source: Frames, driving: Frames, strength: float | torch.Tensor = 1.0,
                        mode: Mode = "absolute", driving_reference: Frames | None = None,
                        amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Give the source the driver's expression, keeping the source's head pose.

    Official ``exp`` stage at ``strength=1, mode='absolute'``.
    """
    with _amp(source, amp_dtype):
        return _transfer(model, "expression", source, driving, strength, mode, driving_reference)


@torch.no_grad()
def pose_transfer(model: DPEGenerator, source: Frames, driving: Frames, strength: float | torch.Tensor = 1.0,
                  mode: Mode = "absolute", driving_reference: Frames | None = None,
                  amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Give the source the driver's head pose, keeping the source's expression.

    Official ``pose`` stage at ``strength=1, mode='absolute'``.
    """
    with _amp(source, amp_dtype):
        return _transfer(model, "pose", source, driving, strength, mode, driving_reference)


@torch.no_grad()
def transfer_both(model: DPEGenerator, source: Frames, driving: Frames, strength: float | torch.Tensor = 1.0,
                  mode: Mode = "absolute", driving_reference: Frames | None = None,
                  amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Expression and pose of the driver: :func:`expression_transfer`, re-encode the result, then
    :func:`pose_transfer` of that result with the same driver, strength and mode.

    This is the official ``both`` stage at ``strength=1, mode='absolute'``. At ``strength=0`` it
    returns the pose-branch self-reconstruction of the expression-branch self-reconstruction.
    """
    with _amp(source, amp_dtype):
        drv = _as_driving(model, driving)
        ref = None if driving_reference is None else _as_driving(model, driving_reference)
        first = _transfer(model, "expression", source, drv, strength, mode, ref)
        return _transfer(model, "pose", first, drv, strength, mode, ref)
