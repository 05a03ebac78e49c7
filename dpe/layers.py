"""StyleGAN2-style building blocks of DPE, in plain PyTorch (no custom CUDA ops).

Parameter and buffer names follow the official release so that its state dict maps onto these
modules by a prefix rename (see :mod:`dpe.checkpoint`).

Numerics follow the official layers:
- equalized learning rate: weights are stored N(0, 1) and scaled by 1/sqrt(fan_in) at run time;
- fused leaky ReLU: ``leaky_relu(x + bias, 0.2) * sqrt(2)``;
- resampling by the [1, 3, 3, 1] blur with the StyleGAN2 padding rules (``upfirdn2d``);
- modulated convolutions with demodulation (eps 1e-8).

Modulated convolutions are computed in the "non-fused" form: the input is scaled by the style,
one convolution with the shared weight runs on the whole batch, and the output is scaled by the
demodulation coefficients. This equals the official grouped convolution with per-sample weights
(the demodulation factor is per sample and output channel, so it commutes with the convolution
and the blur) and is faster for batches.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

SQRT2 = math.sqrt(2.0)


# ---------------------------------------------------------------------------- functional helpers
def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor, negative_slope: float = 0.2,
                     scale: float = SQRT2) -> torch.Tensor:
    if x.ndim > 2 and bias.ndim == 1:
        bias = bias.view(1, -1, *([1] * (x.ndim - 2)))
    return F.leaky_relu(x + bias, negative_slope) * scale


def make_kernel(k: Sequence[int]) -> torch.Tensor:
    """Normalised 2-D blur kernel (outer product of ``k`` with itself, summing to 1)."""
    t = torch.tensor(list(k), dtype=torch.float32)
    t = t[None, :] * t[:, None]
    return t / t.sum()


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or kept as is when it is already float32/float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _depthwise(kernel: torch.Tensor, channels: int, dtype: torch.dtype) -> torch.Tensor:
    return kernel.to(dtype)[None, None].expand(channels, 1, *kernel.shape)


def blur2d(x: torch.Tensor, kernel: torch.Tensor, pad: tuple[int, int], down: int = 1) -> torch.Tensor:
    """``upfirdn2d(x, kernel, up=1, down, pad)``: FIR filter (true convolution) with padding,
    keeping every ``down``-th output sample."""
    c = x.shape[1]
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    w = _depthwise(torch.flip(kernel, [0, 1]), c, x.dtype)
    return F.conv2d(x, w, groups=c, stride=down)


def upsample2d(x: torch.Tensor, kernel: torch.Tensor, pad: tuple[int, int], factor: int = 2) -> torch.Tensor:
    """``upfirdn2d(x, kernel, up=factor, pad)`` written as a strided depthwise transposed conv.

    Zero insertion + padding (p0, p1) + convolution with ``kernel`` equals a transposed
    convolution with stride ``factor`` and padding ``kh - 1 - p0`` (trailing rows trimmed).
    """
    c, h, w = x.shape[1], x.shape[2], x.shape[3]
    kh = kernel.shape[0]
    q = kh - 1 - pad[0]
    if q < 0:
        raise ValueError("upsample padding larger than the kernel is not supported")
    out = F.conv_transpose2d(x, _depthwise(kernel, c, x.dtype), stride=factor, padding=q, groups=c)
    out_h = h * factor + pad[0] + pad[1] - kh + 1
    out_w = w * factor + pad[0] + pad[1] - kh + 1
    return out[:, :, :out_h, :out_w]


# ---------------------------------------------------------------------------- modules
class FusedLeakyReLU(nn.Module):
    def __init__(self, channel: int, negative_slope: float = 0.2, scale: float = SQRT2):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channel, 1, 1))
        self.negative_slope = negative_slope
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias, self.negative_slope, self.scale)


class ScaledLeakyReLU(nn.Module):
    def __init__(self, negative_slope: float = 0.2):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, self.negative_slope)


class Blur(nn.Module):
    """FIR blur; ``kernel`` buffer scaled by factor**2 when it follows an upsampling."""

    def __init__(self, kernel: Sequence[int], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        k = make_kernel(kernel)
        if upsample_factor > 1:
            k = k * (upsample_factor**2)
        self.register_buffer("kernel", k)
        self.pad = (int(pad[0]), int(pad[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return blur2d(x, self.kernel, self.pad)


class Upsample(nn.Module):
    def __init__(self, kernel: Sequence[int], factor: int = 2):
        super().__init__()
        self.factor = factor
        k = make_kernel(kernel) * (factor**2)
        self.register_buffer("kernel", k)
        p = k.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample2d(x, self.kernel, self.pad, self.factor)


class EqualConv2d(nn.Module):
    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channel, in_channel, kernel_size, kernel_size))
        self.scale = 1.0 / math.sqrt(in_channel * kernel_size**2)
        self.stride = stride
        self.padding = padding
        self.bias = nn.Parameter(torch.zeros(out_channel)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, bias=self.bias, stride=self.stride, padding=self.padding)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, {k}, stride={self.stride}, padding={self.padding}"


class EqualLinear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, bias_init: float = 0.0,
                 lr_mul: float = 1.0, activation: str | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.activation = activation
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias * self.lr_mul
        if self.activation:
            out = F.linear(x, self.weight * self.scale)
            return F.leaky_relu(out if bias is None else out + bias, 0.2) * SQRT2
        return F.linear(x, self.weight * self.scale, bias=bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, activation={self.activation}"


class ConvLayer(nn.Sequential):
    """[Blur] + EqualConv2d + [FusedLeakyReLU]; indices match the official ``nn.Sequential``."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, downsample: bool = False,
                 blur_kernel: Sequence[int] = (1, 3, 3, 1), bias: bool = True, activate: bool = True):
        layers: list[nn.Module] = []
        if downsample:
            factor = 2
            p = (len(blur_kernel) - factor) + (kernel_size - 1)
            layers.append(Blur(blur_kernel, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_channel, out_channel, kernel_size, padding=padding, stride=stride,
                                  bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(out_channel) if bias else ScaledLeakyReLU(0.2))
        super().__init__(*layers)
        # blur + strided 1x1 conv only reads every other blurred sample: blur at stride 2 instead
        self._strided_blur = downsample and kernel_size == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._strided_blur:
            return super().forward(x)
        blur, conv, *rest = self
        x = blur2d(x, blur.kernel, blur.pad, down=2)
        x = F.conv2d(x, conv.weight * conv.scale, bias=conv.bias)
        for layer in rest:
            x = layer(x)
        return x


class ResBlock(nn.Module):
    """Residual down block: 3x3 conv, blur + stride-2 3x3 conv, blurred stride-2 1x1 skip."""

    def __init__(self, in_channel: int, out_channel: int, blur_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        self.conv1 = ConvLayer(in_channel, in_channel, 3, blur_kernel=blur_kernel)
        self.conv2 = ConvLayer(in_channel, out_channel, 3, downsample=True, blur_kernel=blur_kernel)
        self.skip = ConvLayer(in_channel, out_channel, 1, downsample=True, activate=False, bias=False,
                              blur_kernel=blur_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / SQRT2


class ModulatedConv2d(nn.Module):
    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False, blur_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        self.in_channel = in_channel
        self.out_channel = out_channel
        self.kernel_size = kernel_size
        self.upsample = upsample
        self.demodulate = demodulate
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.scale = 1.0 / math.sqrt(in_channel * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1.0)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        s = self.modulation(style)  # (B, in)
        weight = self.weight[0] * self.scale  # (out, in, k, k)
        x = x * s[:, :, None, None]
        if self.upsample:
            out = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2, padding=0)
        else:
            out = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            # sum_{i,kh,kw} (w[o,i,kh,kw] * s[b,i])^2, in float32 at least
            s32 = at_least_fp32(s)
            wsq = weight.pow(2).sum(dim=(2, 3)).to(s32.dtype)  # (out, in)
            demod = torch.rsqrt(s32.pow(2) @ wsq.t() + 1e-8)  # (B, out)
            out = out * demod.to(out.dtype)[:, :, None, None]
        if self.upsample:
            out = self.blur(out)
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_channel}, {self.out_channel}, {self.kernel_size}, upsample={self.upsample}, "
                f"demodulate={self.demodulate}")


class NoiseInjection(nn.Module):
    """Kept for checkpoint compatibility: the official code never passes noise, so the weight is
    never used. It is frozen (``requires_grad=False``) so that training and DDP see no unused
    trainable parameter."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ConstantInput(nn.Module):
    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


class StyledConv(nn.Module):
    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 upsample: bool = False, blur_kernel: Sequence[int] = (1, 3, 3, 1), demodulate: bool = True):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim, demodulate=demodulate,
                                    upsample=upsample, blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, style)))


class ToRGB(nn.Module):
    """1x1 conv + fused leaky ReLU + bias (not modulated), plus the upsampled previous image."""

    def __init__(self, in_channel: int, upsample: bool = True, blur_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ConvLayer(in_channel, 3, 1, blur_kernel=blur_kernel)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


def identity_grid(size: int) -> torch.Tensor:
    """(1, size, size, 2) grid of linspace(-1, 1, size) x/y coordinates, as in the official code.

    With ``align_corners=False`` this is not an exact identity warp (it stretches by
    size/(size-1)); DPE was trained with it, so it is kept.
    """
    xs = torch.linspace(-1.0, 1.0, size, dtype=torch.float64)
    gy, gx = torch.meshgrid(xs, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).float()[None]


class ToFlow(nn.Module):
    """Flow/mask head of a generator scale.

    A 1x1 modulated conv (no demodulation) + bias gives 3 channels, accumulated with the
    upsampled raw output of the previous scale; channels 0-1 (tanh) are added to the identity
    grid and sample the encoder feature (``grid_sample``, bilinear, zeros, align_corners=False),
    channel 2 (sigmoid) is a mask. Returns ``(warped * mask, warped * mask + x * (1 - mask), raw)``.

    A fresh head starts at (nearly) the identity warp with the mask open (conv weight scaled by
    ``INIT_GAIN``, mask logit ``OPEN_MASK_LOGIT``): the generator starts by passing the encoder's features through, and
    learns motion from there. With the random initialisation of the official code, ``tanh`` of
    the accumulated raw flows sends each scale's samples far across the image (a quarter of
    them saturated at 64 px), the warped features are noise and training closes the masks: the
    decoder then paints from the latent alone (grey blobs at small scale; README, training
    recipe). Loaded weights (official or ours) replace this initialisation.
    """

    INIT_GAIN = 0.01  # small, not zero: the modulation still gets a gradient at the first step
    OPEN_MASK_LOGIT = 3.0  # sigmoid(3) = 0.95

    def __init__(self, in_channel: int, style_dim: int, size: int, upsample: bool = True,
                 blur_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False, blur_kernel=blur_kernel)
        with torch.no_grad():
            self.conv.weight.mul_(self.INIT_GAIN)
        self.bias = nn.Parameter(torch.tensor([0.0, 0.0, self.OPEN_MASK_LOGIT]).view(1, 3, 1, 1))
        self.register_buffer("grid", identity_grid(size), persistent=False)

    def forward(self, x: torch.Tensor, style: torch.Tensor, feat: torch.Tensor,
                skip: torch.Tensor | None = None):
        # Flow coordinates are precision sensitive: this head runs in float32 even under autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = self.conv(at_least_fp32(x), at_least_fp32(style)) + self.bias
            if skip is not None:
                out = out + self.upsample(at_least_fp32(skip))
        flow = torch.tanh(out[:, 0:2]).permute(0, 2, 3, 1) + self.grid.to(out.dtype)
        mask = torch.sigmoid(out[:, 2:3])
        warped = F.grid_sample(feat.to(out.dtype), flow, mode="bilinear", padding_mode="zeros", align_corners=False)
        feat_warp = warped * mask
        return feat_warp, feat_warp + x * (1.0 - mask), out
