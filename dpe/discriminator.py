"""StyleGAN2 residual discriminator with minibatch standard deviation (official layout)."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import ConvLayer, EqualLinear, ResBlock, at_least_fp32


class Discriminator(nn.Module):
    """Image (B, 3, size, size) -> logits (B, 1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ch = cfg.channels
        convs: list[nn.Module] = [ConvLayer(3, ch[cfg.size], 1, blur_kernel=cfg.blur_kernel)]
        in_channel = ch[cfg.size]
        for i in range(cfg.log_size, 2, -1):
            out_channel = ch[2 ** (i - 1)]
            convs.append(ResBlock(in_channel, out_channel, cfg.blur_kernel))
            in_channel = out_channel
        self.convs = nn.Sequential(*convs)
        self.stddev_group = cfg.stddev_group
        self.final_conv = ConvLayer(in_channel + 1, ch[4], 3, blur_kernel=cfg.blur_kernel)
        self.final_linear = nn.Sequential(
            EqualLinear(ch[4] * 4 * 4, ch[4], activation="fused_lrelu"),
            EqualLinear(ch[4], 1),
        )

    def _group(self, batch: int) -> int:
        # Official: min(batch, 4), which must divide the batch. For other batch sizes we take
        # the largest group <= 4 that divides it instead of failing.
        group = min(batch, self.stddev_group)
        while batch % group:
            group -= 1
        return group

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        out = self.convs(img)
        batch, channel, height, width = out.shape
        group = self._group(batch)
        # samples b = g * (batch // group) + m share the statistics of index m
        stats = at_least_fp32(out).view(group, -1, 1, channel, height, width)
        stats = torch.sqrt(stats.var(0, unbiased=False) + 1e-8)
        stats = stats.mean([2, 3, 4], keepdim=True).squeeze(2)  # (batch // group, 1, 1, 1)
        stats = stats.repeat(group, 1, height, width).to(out.dtype)
        out = self.final_conv(torch.cat([out, stats], 1))
        return self.final_linear(out.reshape(batch, -1))
