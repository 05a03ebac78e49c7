"""Loss terms of the DPE objective.

Reconstruction and GAN terms follow the official trainer (``dpe.train_step`` lists where the
default objective departs from it and why):

* ``PerceptualLoss``: VGG19 relu1_1..relu5_1, weight 10 per layer, on an image pyramid at
  scales 1, 1/2, 1/4, 1/8; each downsampled image is clamped to [-1, 1] as the official
  ``Vgg19.forward`` does (the user sees clamped images, so that is what the term scores; L1
  still sees the raw values and pulls overshoots back). Two modes:

  - ``pyramid``: ``"area"`` (our default) averages each 2x2, 4x4 or 8x8 block exactly;
    ``"gaussian"`` is the official (FOMM) anti-aliasing: a normalised Gaussian with
    sigma = (1/s - 1)/2 and size 2*round(4*sigma)+1 (5, 13, 29 for 1/2, 1/4, 1/8), applied
    depthwise with zero padding, then every (1/s)-th pixel. The Gaussian suppresses
    aliasing better; its zero padding fades a band of 2, 6 or 14 input pixels at the
    border towards 0 and its 29x29 kernel costs more, which is why it is not our default.
  - ``detach_target``: the official loss detaches the second image's features, so on the
    middle-consistency pair (two generated images) only the first one is pulled. Our
    default lets the gradient reach both: the pair has no ground truth, and the official
    L1 term on the same pair is two-sided too.

  Pyramid levels smaller than 16 px are skipped: VGG19 pools four times before relu5_1, so
  smaller inputs vanish (this only affects tiny test models).
* ``l1_distance``: mean absolute error per sample.
* ``inner_face_weights``: a pixel weight map of mean 1 that can weight both pixel terms (L1 and
  sharpness) towards the framed crop's inner face (``TrainConfig.face_focus``): at 64 px the eyes
  are a few pixels wide, the first detail a small model blurs (and washes to the skin's colour),
  and what a face detector looks for; the crop's border and background weigh less.
* ``gradient_l1_distance``: mean absolute error of the images' horizontal and vertical
  differences, per sample: an offline stand-in for the VGG term's pull towards sharp edges
  (``TrainConfig.sharpness_weight``). L1 alone rewards a blurred mean of the plausible outputs;
  a blurred image has weak differences where the target has strong ones, so this term charges
  for the lost edges at full price (it is 0 for identical images).
* Non-saturating GAN losses for generator and discriminator (softplus form), one mean per
  call; the training step sums them over the two cycle outputs, as the official trainer does.
* ``r1_penalty``: optional. The official optimiser constants (D lr 0.002*16/17, betas
  0.99**(16/17)) are StyleGAN2's lazy-R1 ratios for one penalty every 16 steps, but the
  official DPE trainer applies no penalty, so the training step leaves it off by default
  (``r1_weight=0``); StyleGAN2 uses gamma = 10, every 16 steps.

What the official code lacks (DESIGN.md, "Training objective") is anything that tells
the two branches apart: every term is unchanged when the pose and expression branches are
swapped together with frames A and B, which are drawn alike. ``DisentanglementProbes`` adds
the asymmetry from stored landmark annotations (``dpe.landmarks``: rigid pose (6) and
canonical-frame expression residual (68x2)):

* read-out (``READOUT_WEIGHT`` = 1): a linear probe must predict the frame's pose from the
  pose branch's offset ``pose_offset(d)``, another its expression from
  ``expression_offset(d)``. Probes and generator both minimise it, so each offset is
  pushed to carry its own factor linearly.
* leakage (``LEAKAGE_WEIGHT`` = 1): the cross terms. For each target dimension, the
  squared norm of the batch covariance between the *other* offset and that target,
  divided by the offset's total variance, averaged over target dimensions: pose targets
  against the expression offset plus expression targets against the pose offset. It
  is 0 when no linear trace of the other factor is left, at most the targets' batch
  variance (about 1 once standardised) per pair by Cauchy-Schwarz, and scale-invariant,
  so the generator cannot lower it by shrinking an offset. Its small-batch noise floor is about 1/batch and does not
  depend on the offsets, so it biases nothing; with only two frames (batch 1) it is
  constant and carries no gradient, and under gradient accumulation it is computed per
  micro-batch, so it wants micro-batches of several pairs. An adversarial variant was
  tried first (cross probes learn on detached offsets, the generator drives their
  output to the mean): on a toy problem the game cycled and left over half of the
  expression offset's variance explained by pose, where this closed form brought it to
  1-3 % at batches of 4-16.

Both weights are order-1 defaults, not tuned at scale: each term starts near 1 against
perceptual terms of order 10-100, so they steer the split without competing with the
reconstruction (both are ``TrainConfig`` fields of ``dpe.train_step``).

Targets are standardised with running statistics (cumulative average for the first 100
batches, then an exponential average with rate 0.01), so the pixel units of ``tx, ty,
scale`` and the small magnitudes of the expression residual need no hand-set scales.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .landmarks import NUM_LANDMARKS
from .vgg import VGG19Features

PYRAMID_SCALES = (1.0, 0.5, 0.25, 0.125)
PYRAMID_FILTERS = ("area", "gaussian")
VGG_LAYER_WEIGHT = 10.0
MIN_VGG_INPUT = 16
READOUT_WEIGHT = 1.0
LEAKAGE_WEIGHT = 1.0
POSE_DIM = 6
EXPRESSION_DIM = NUM_LANDMARKS * 2


class PerceptualLoss(nn.Module):
    """Multi-scale VGG19 feature distance, one value per sample; each pyramid image clamped to [-1, 1].

    ``pyramid="area"`` downsamples by exact block averages, ``"gaussian"`` as the official
    trainer does (FOMM's Gaussian anti-aliasing with zero padding, then a strided pick);
    ``detach_target=True`` cuts the gradient to the second image, as the official loss does.
    Why each: module docstring.
    """

    def __init__(
        self,
        vgg: VGG19Features,
        scales: Sequence[float] = PYRAMID_SCALES,
        layer_weight: float = VGG_LAYER_WEIGHT,
        pyramid: str = "area",
        detach_target: bool = False,
    ) -> None:
        super().__init__()
        if pyramid not in PYRAMID_FILTERS:
            raise ValueError(f"pyramid must be one of {PYRAMID_FILTERS}, got {pyramid!r}")
        if pyramid == "gaussian":
            for scale in scales:
                _integer_step(scale)
        self.vgg = vgg
        self.scales = tuple(scales)
        self.layer_weight = layer_weight
        self.pyramid = pyramid
        self.detach_target = detach_target

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(B,)`` losses for images ``(B, 3, H, W)``; each downsampled image is clamped to [-1, 1] before VGG.

        Gradients reach ``output`` and, unless ``detach_target``, ``target`` when it
        requires them.
        """
        if output.shape != target.shape:
            raise ValueError(f"output {tuple(output.shape)} and target {tuple(target.shape)} differ in shape")
        batch = output.shape[0]
        if self.detach_target:
            target = target.detach()  # VGG is frozen, so this cuts every path to the target
        pair = torch.cat([output, target])
        total = pair.new_zeros(batch, dtype=torch.float32)
        for scale in self.scales:
            size = round(pair.shape[-1] * scale)
            if size < MIN_VGG_INPUT:
                continue
            # clamped after downsampling, as the official Vgg19.forward clamps each pyramid image
            for features in self.vgg(self._downsample(pair, scale).clamp(-1.0, 1.0)):
                out_f, tgt_f = features.float().split(batch)
                total = total + self.layer_weight * (out_f - tgt_f).abs().mean(dim=(1, 2, 3))
        return total

    def _downsample(self, images: torch.Tensor, scale: float) -> torch.Tensor:
        if scale == 1.0:
            return images
        if self.pyramid == "gaussian":
            return gaussian_downsample(images, scale)
        return F.interpolate(images, scale_factor=scale, mode="area")


def gaussian_kernel(scale: float) -> torch.Tensor:
    """The official pyramid's normalised 2-D Gaussian for downsampling by ``scale`` (float32).

    sigma = (1/scale - 1)/2, size 2*round(4*sigma)+1 (Python rounding, as the official code).
    """
    sigma = (1.0 / scale - 1.0) / 2.0
    size = 2 * round(4 * sigma) + 1
    offsets = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    profile = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = profile[:, None] * profile[None, :]
    return kernel / kernel.sum()


def gaussian_downsample(images: torch.Tensor, scale: float) -> torch.Tensor:
    """Official anti-aliased downsampling: Gaussian blur with zero padding, then every (1/scale)-th pixel."""
    step = _integer_step(scale)
    kernel = gaussian_kernel(scale).to(device=images.device, dtype=images.dtype)
    channels, pad = images.shape[1], kernel.shape[-1] // 2  # odd size: the same pad on both sides
    weight = kernel.expand(channels, 1, *kernel.shape)
    blurred = F.conv2d(F.pad(images, (pad, pad, pad, pad)), weight, groups=channels)
    return blurred[:, :, ::step, ::step]


def _integer_step(scale: float) -> int:
    step = round(1.0 / scale)
    if not 0 < scale <= 1 or abs(step * scale - 1.0) > 1e-9:
        raise ValueError(f"the Gaussian pyramid needs scales 1/n for an integer n, got {scale}")
    return step


def l1_distance(output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` mean absolute error per sample; each pixel's error times ``weights`` (``(H, W)``) when given."""
    error = (output.float() - target.float()).abs()
    return (error if weights is None else error * weights).flatten(1).mean(dim=1)


INNER_FACE_CENTRE = (0.49, 0.57)
"""(x, y) of the inner face (landmarks 17-67: brows, eyes, nose, mouth) in a framed crop, as fractions of its side."""
INNER_FACE_SPREAD = (0.09, 0.12)
"""Their standard deviation across and down the crop. Both measured on the sample's training clips, framed as
``pipelines.media.framing.Framing`` frames every crop (the face's landmark box centred at (0.49, 0.62))."""


def inner_face_weights(size: int, focus: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(size, size)`` pixel weights of mean 1: ``1 + focus * g`` rescaled, ``g`` a Gaussian of peak 1 with the
    inner face's centre and spread, so the eyes and mouth weigh up to ``1 + focus`` times the crop's corners."""
    axis = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    (centre_x, centre_y), (spread_x, spread_y) = INNER_FACE_CENTRE, INNER_FACE_SPREAD
    across = ((axis - centre_x) / spread_x) ** 2
    down = ((axis - centre_y) / spread_y) ** 2
    weights = 1.0 + focus * torch.exp(-0.5 * (down[:, None] + across[None, :]))
    return weights / weights.mean()


def gradient_l1_distance(output: torch.Tensor, target: torch.Tensor,
                         weights: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` mean absolute error of horizontal and vertical neighbour differences, per sample; each difference
    weighted by the mean of its two pixels' ``weights`` (``(H, W)``, e.g. ``inner_face_weights``) when given."""
    difference = output.float() - target.float()
    horizontal = (difference[..., :, 1:] - difference[..., :, :-1]).abs()
    vertical = (difference[..., 1:, :] - difference[..., :-1, :]).abs()
    if weights is not None:
        horizontal = horizontal * (weights[:, 1:] + weights[:, :-1]) / 2
        vertical = vertical * (weights[1:, :] + weights[:-1, :]) / 2
    return horizontal.flatten(1).mean(dim=1) + vertical.flatten(1).mean(dim=1)


def generator_gan_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``softplus(-D(G(z)))``."""
    return F.softplus(-fake_logits.float()).mean()


def discriminator_gan_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Logistic discriminator loss ``softplus(D(fake)) + softplus(-D(real))``."""
    return F.softplus(fake_logits.float()).mean() + F.softplus(-real_logits.float()).mean()


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """Squared gradient norm of D on real images (``real_images`` must require grad)."""
    (grad,) = torch.autograd.grad(real_logits.float().sum(), real_images, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(dim=1).mean()


class AsymmetryLosses(NamedTuple):
    """Terms of the pose/expression constraint; see the module docstring."""

    readout: torch.Tensor  # generator and read-out probes minimise
    leakage: torch.Tensor  # generator minimises


def cross_covariance_leakage(offset: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Share of ``offset`` linearly tied to standardised ``targets``, about [0, 1] (0 for batch 1).

    Mean over target dimensions of ``|cov(offset, target_j)|^2 / trace(cov(offset))``.
    """
    if len(offset) < 2:
        return offset.new_zeros(())
    offset_c = offset.float() - offset.float().mean(dim=0)
    targets_c = targets.float() - targets.float().mean(dim=0)
    cross = offset_c.T @ targets_c / len(offset)  # (latent, targets)
    offset_variance = offset_c.pow(2).sum(dim=1).mean().clamp_min(1e-12)
    return cross.pow(2).sum(dim=0).mean() / offset_variance


class DisentanglementProbes(nn.Module):
    """Linear read-out of landmark pose from the pose offset and of expression from the expression offset."""

    def __init__(self, latent_dim: int, momentum: float = 0.01) -> None:
        super().__init__()
        self.pose_from_pose_offset = nn.Linear(latent_dim, POSE_DIM)
        self.expression_from_expression_offset = nn.Linear(latent_dim, EXPRESSION_DIM)
        self.momentum = momentum  # cumulative average until 1 / momentum batches, then EMA
        target_dim = POSE_DIM + EXPRESSION_DIM
        self.register_buffer("target_mean", torch.zeros(target_dim))
        self.register_buffer("target_var", torch.ones(target_dim))
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))

    @staticmethod
    def _targets(pose: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        if pose.shape[-1:] != (POSE_DIM,) or expression.shape[-2:] != (NUM_LANDMARKS, 2):
            raise ValueError(
                f"expected pose (B, {POSE_DIM}) and expression (B, {NUM_LANDMARKS}, 2) from "
                f"dpe.landmarks.split_pose_expression, got {tuple(pose.shape)} and {tuple(expression.shape)}"
            )
        return torch.cat([pose.float(), expression.float().flatten(1)], dim=1)

    @torch.no_grad()
    def observe(self, pose: torch.Tensor, expression: torch.Tensor) -> None:
        """Update the running target statistics with a batch of annotations."""
        targets = self._targets(pose, expression)
        self.batches_seen += 1
        rate = max(self.momentum, 1.0 / float(self.batches_seen))
        self.target_mean.lerp_(targets.mean(dim=0), rate)
        if len(targets) > 1:  # a single sample says nothing about the spread
            self.target_var.lerp_(targets.var(dim=0, unbiased=False), rate)

    def standardise(self, pose: torch.Tensor, expression: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets in running-standard units, clamped to +-5 while statistics are young."""
        z = (self._targets(pose, expression) - self.target_mean) / self.target_var.clamp_min(1e-12).sqrt()
        z = z.clamp(-5.0, 5.0)
        return z[:, :POSE_DIM], z[:, POSE_DIM:]

    def forward(
        self,
        pose_offset: torch.Tensor,
        expression_offset: torch.Tensor,
        pose: torch.Tensor,
        expression: torch.Tensor,
    ) -> AsymmetryLosses:
        pose_z, expression_z = self.standardise(pose, expression)
        pose_offset, expression_offset = pose_offset.float(), expression_offset.float()
        readout = F.mse_loss(self.pose_from_pose_offset(pose_offset), pose_z) + F.mse_loss(
            self.expression_from_expression_offset(expression_offset), expression_z
        )
        leakage = cross_covariance_leakage(expression_offset, pose_z) + cross_covariance_leakage(
            pose_offset, expression_z
        )
        return AsymmetryLosses(readout=readout, leakage=leakage)
