"""Configuration of the DPE networks.

The defaults describe the official release (256x256 RGB, 512-d latent, 20 motion directions,
channel multiplier 1): generator 69,101,798 parameters, discriminator 24,001,089.
``ModelConfig.tiny()`` is a small variant with the same structure for fast CPU tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping


def official_channels(channel_multiplier: int = 1) -> dict[int, int]:
    """Feature width per resolution used by the official encoder, generators and discriminator."""
    cm = channel_multiplier
    return {
        4: 512,
        8: 512,
        16: 512,
        32: 512,
        64: 256 * cm,
        128: 128 * cm,
        256: 64 * cm,
        512: 32 * cm,
        1024: 16 * cm,
    }


@dataclass
class ModelConfig:
    """Sizes of the DPE networks.

    ``channels`` maps every resolution from 4 up to ``size`` to a feature width; when left
    empty it is filled with the official table for ``channel_multiplier``.
    """

    size: int = 256
    style_dim: int = 512
    motion_dim: int = 20
    channel_multiplier: int = 1
    channels: dict[int, int] = field(default_factory=dict)
    blur_kernel: tuple[int, ...] = (1, 3, 3, 1)
    stddev_group: int = 4  # minibatch-stddev group of the discriminator

    def __post_init__(self) -> None:
        if self.size < 8 or self.size & (self.size - 1):
            raise ValueError(f"size must be a power of two >= 8, got {self.size}")
        if not self.channels:
            self.channels = official_channels(self.channel_multiplier)
        # json/yaml round trips turn int keys into strings: normalise.
        self.channels = {int(k): int(v) for k, v in dict(self.channels).items()}
        missing = [r for r in self.resolutions_all if r not in self.channels]
        if missing:
            raise ValueError(f"channels lacks a width for resolutions {missing}")
        self.blur_kernel = tuple(int(v) for v in self.blur_kernel)
        if self.motion_dim > self.style_dim:
            raise ValueError("motion_dim must not exceed style_dim (QR of a style_dim x motion_dim matrix)")

    # ------------------------------------------------------------------ derived sizes
    @property
    def log_size(self) -> int:
        return int(math.log2(self.size))

    @property
    def resolutions_all(self) -> list[int]:
        """4, 8, ..., size."""
        return [2**i for i in range(2, self.log_size + 1)]

    @property
    def feature_resolutions(self) -> list[int]:
        """Resolutions of the encoder skip features the generators warp: 8, 16, ..., size."""
        return [2**i for i in range(3, self.log_size + 1)]

    def feature_channels(self) -> list[int]:
        return [self.channels[r] for r in self.feature_resolutions]

    # ------------------------------------------------------------------ presets / (de)serialisation
    @classmethod
    def tiny(cls) -> "ModelConfig":
        """A 32x32 model with narrow layers (about 0.1 M parameters) for CPU tests."""
        return cls(size=32, style_dim=32, motion_dim=5, channels={4: 32, 8: 32, 16: 16, 32: 16})

    def to_dict(self) -> dict[str, Any]:
        """Plain python types only (safe for ``torch.load(weights_only=True)`` and json)."""
        return {
            "size": self.size,
            "style_dim": self.style_dim,
            "motion_dim": self.motion_dim,
            "channel_multiplier": self.channel_multiplier,
            "channels": {int(k): int(v) for k, v in self.channels.items()},
            "blur_kernel": list(self.blur_kernel),
            "stddev_group": self.stddev_group,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**dict(data))
