"""The shared DPE encoder: image -> latent w and skip features for the generators."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import ConvLayer, EqualConv2d, ResBlock


class Encoder(nn.Module):
    """1x1 conv, residual down blocks (size -> 4 px), then a 4x4 valid conv to the latent.

    ``forward`` returns ``(latent (B, style_dim), features)`` with ``features`` the block outputs
    at 8, 16, ..., size px (low to high resolution, the order the generators consume them).
    Parameter names follow the official ``enc.net_app`` module.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ch = cfg.channels
        self.convs = nn.ModuleList([ConvLayer(3, ch[cfg.size], 1, blur_kernel=cfg.blur_kernel)])
        in_channel = ch[cfg.size]
        for i in range(cfg.log_size, 2, -1):
            out_channel = ch[2 ** (i - 1)]
            self.convs.append(ResBlock(in_channel, out_channel, cfg.blur_kernel))
            in_channel = out_channel
        self.convs.append(EqualConv2d(in_channel, cfg.style_dim, 4, padding=0, bias=False))
        self.size = cfg.size

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if img.ndim != 4 or img.shape[1] != 3 or img.shape[2] != self.size or img.shape[3] != self.size:
            raise ValueError(f"expected images (B, 3, {self.size}, {self.size}), got {tuple(img.shape)}")
        h = img
        outs = []
        for conv in self.convs[:-1]:
            h = conv(h)
            outs.append(h)
        latent = self.convs[-1](h).flatten(1)
        # outs: size, size/2, ..., 4 px; the generators take 8 .. size px, low to high.
        return latent, outs[::-1][1:]
