"""The DPE generator: shared encoder, motion network, two heads and two generators.

Names are by behaviour. The official release names its modules the other way round:

- ``encoder``               <- ``enc.net_app``   image -> w, skip features
- ``motion.mlp``            <- ``mlp``           w -> alpha (motion coefficients)
- ``motion.directions``     <- ``dir``           Q = qr(direction matrix); d = Q alpha
- ``expression_head``       <- ``mlp_pose``      d -> expression offset
- ``pose_head``             <- ``mlp_exp``       d -> pose offset
- ``expression_generator``  <- ``dec_pose``      expression transfer (source pose kept)
- ``pose_generator``        <- ``dec_exp``       pose transfer (source expression kept)

Official ``exp`` stage (expression transfer, source pose kept)::

    render_expression(w_S + expression_offset(d_D), features_S)

Official ``pose`` stage (pose transfer, source expression kept)::

    render_pose(w_S + pose_offset(d_D), features_S)

Official ``both`` stage: the ``exp`` result X is re-encoded and
``render_pose(w_X + pose_offset(d_D), features_X)``.

The small motion network and the heads always run in float32 (autocast disabled): they cost
nothing and keep the motion vectors exact under bf16 autocast.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from .config import ModelConfig
from .encoder import Encoder
from .generator import FlowGenerator
from .layers import EqualLinear


class Encoded(NamedTuple):
    """Encoder output: latent ``(B, style_dim)`` and skip features at 8..size px (low -> high)."""

    latent: torch.Tensor
    features: list[torch.Tensor]

    def expand(self, batch: int) -> "Encoded":
        """Broadcast a batch-1 encoding to ``batch`` (views, no copy)."""
        if self.latent.shape[0] == batch:
            return self
        if self.latent.shape[0] != 1:
            raise ValueError(f"cannot broadcast an encoding of batch {self.latent.shape[0]} to {batch}")
        return Encoded(self.latent.expand(batch, -1), [f.expand(batch, -1, -1, -1) for f in self.features])


def _fp32(device_type: str):
    """Context that disables autocast on ``device_type``."""
    return torch.autocast(device_type=device_type, enabled=False)


def _linear_stack(dim_in: int, dims: Sequence[int]) -> nn.Sequential:
    layers = []
    for d in dims:
        layers.append(EqualLinear(dim_in, d))
        dim_in = d
    return nn.Sequential(*layers)


class DirectionBasis(nn.Module):
    """The learned style_dim x motion_dim direction matrix (official ``dir``)."""

    def __init__(self, style_dim: int, motion_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(style_dim, motion_dim))

    def forward(self) -> torch.Tensor:
        """Q of the reduced QR of ``weight + 1e-8`` (orthonormal columns), as in the official code."""
        with _fp32(self.weight.device.type):
            q, _ = torch.linalg.qr(self.weight + 1e-8, mode="reduced")
        return q


class MotionNetwork(nn.Module):
    """w -> alpha (5 linear layers, no activations) and the learned direction basis.

    The direction matrix (style_dim x motion_dim) is orthonormalised by QR at every call; the
    motion vector is ``d = Q alpha``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mlp = _linear_stack(cfg.style_dim, [cfg.style_dim] * 4 + [cfg.motion_dim])
        self.directions = DirectionBasis(cfg.style_dim, cfg.motion_dim)

    def coefficients(self, latent: torch.Tensor) -> torch.Tensor:
        with _fp32(latent.device.type):
            return self.mlp(latent.to(self.directions.weight.dtype))

    def basis(self) -> torch.Tensor:
        """Orthonormal basis Q ``(style_dim, motion_dim)``."""
        return self.directions()

    def combine(self, alpha: torch.Tensor) -> torch.Tensor:
        """d = Q alpha for a batch of coefficients ``(B, motion_dim)``."""
        with _fp32(alpha.device.type):
            q = self.basis()
            return alpha.to(q.dtype) @ q.t()

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.combine(self.coefficients(latent))


class DPEGenerator(nn.Module):
    """All generator-side networks of DPE (the official ``Generator``), named by behaviour."""

    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()
        # registration order = the official state-dict order
        self.encoder = Encoder(cfg)
        self.expression_generator = FlowGenerator(cfg)
        self.pose_generator = FlowGenerator(cfg)
        self.motion = MotionNetwork(cfg)
        self.expression_head = _linear_stack(cfg.style_dim, [cfg.style_dim] * 3)
        self.pose_head = _linear_stack(cfg.style_dim, [cfg.style_dim] * 3)

    # ------------------------------------------------------------------ encoder / motion
    def encode(self, img: torch.Tensor) -> Encoded:
        latent, features = self.encoder(img)
        return Encoded(latent, features)

    def motion_coefficients(self, latent: torch.Tensor) -> torch.Tensor:
        """alpha ``(B, motion_dim)``."""
        return self.motion.coefficients(latent)

    def motion_vector(self, latent: torch.Tensor) -> torch.Tensor:
        """d = Q alpha ``(B, style_dim)``, float32."""
        return self.motion(latent)

    # ------------------------------------------------------------------ heads
    def expression_offset(self, d: torch.Tensor) -> torch.Tensor:
        """Latent offset that carries the expression of motion ``d`` (official ``mlp_pose``)."""
        with _fp32(d.device.type):
            return self.expression_head(d.to(self.expression_head[0].weight.dtype))

    def pose_offset(self, d: torch.Tensor) -> torch.Tensor:
        """Latent offset that carries the head pose of motion ``d`` (official ``mlp_exp``)."""
        with _fp32(d.device.type):
            return self.pose_head(d.to(self.pose_head[0].weight.dtype))

    # ------------------------------------------------------------------ generators
    def render_expression(self, z: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Expression generator (official ``dec_pose``) on latent ``z`` and encoder features."""
        return self.expression_generator(z, features)

    def render_pose(self, z: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Pose generator (official ``dec_exp``) on latent ``z`` and encoder features."""
        return self.pose_generator(z, features)

    # ------------------------------------------------------------------ composites
    def reconstruct_expression(self, code: Encoded) -> torch.Tensor:
        """Self-reconstruction through the expression branch: ``w + expression_offset(d(w))``."""
        d = self.motion_vector(code.latent)
        return self.render_expression(code.latent + self.expression_offset(d), code.features)

    def reconstruct_pose(self, code: Encoded) -> torch.Tensor:
        """Self-reconstruction through the pose branch: ``w + pose_offset(d(w))``."""
        d = self.motion_vector(code.latent)
        return self.render_pose(code.latent + self.pose_offset(d), code.features)
