"""A DPE generator (official ``Synthesis``): latent + encoder features -> image."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .config import ModelConfig
from .layers import ConstantInput, StyledConv, ToFlow, ToRGB


class FlowGenerator(nn.Module):
    """StyleGAN2-like decoder that warps the encoder's skip features.

    From a learned 4x4 constant, every scale 8..size runs an upsampling modulated conv and a
    modulated conv, then a to-flow head that warps the encoder feature of that scale into the
    stream (mask blend), and a to-RGB conv that accumulates the image across scales. The same
    latent styles every layer. No tanh on the output.

    ``to_rgb1`` and the noise weights exist in the official state dict but are never used by
    the official forward pass; they are kept (frozen) so that checkpoints map one to one.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ch, sd, bk = cfg.channels, cfg.style_dim, cfg.blur_kernel
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], 3, sd, blur_kernel=bk)
        self.to_rgb1 = ToRGB(ch[4], upsample=False, blur_kernel=bk)
        self.to_rgb1.requires_grad_(False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.to_flows = nn.ModuleList()
        in_channel = ch[4]
        for res in cfg.feature_resolutions:
            out_channel = ch[res]
            self.convs.append(StyledConv(in_channel, out_channel, 3, sd, upsample=True, blur_kernel=bk))
            self.convs.append(StyledConv(out_channel, out_channel, 3, sd, blur_kernel=bk))
            self.to_rgbs.append(ToRGB(out_channel, blur_kernel=bk))
            self.to_flows.append(ToFlow(out_channel, sd, res, blur_kernel=bk))
            in_channel = out_channel

    def forward(self, latent: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.to_flows):
            raise ValueError(f"expected {len(self.to_flows)} encoder features, got {len(features)}")
        out = self.conv1(self.input(latent.shape[0]), latent)
        img = flow = None
        for k, feat in enumerate(features):
            out = self.convs[2 * k](out, latent)
            out = self.convs[2 * k + 1](out, latent)
            warped, out, flow = self.to_flows[k](out, latent, feat, flow)
            img = self.to_rgbs[k](warped, img)
        return img
