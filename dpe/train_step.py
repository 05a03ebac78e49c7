"""One DPE training step as a plain function (the Ray Train loop calls it per batch).

Batch (a dict of tensors; frames A and B come from the same clip):

* ``frame_a``, ``frame_b``: (B, 3, H, W) float in [-1, 1], H = W = ``ModelConfig.size``
* ``pose_a``, ``pose_b``: (B, 6) and ``expression_a``, ``expression_b``: (B, 68, 2), the
  landmark split of ``dpe.landmarks.split_pose_expression`` stored by dataset preparation.

The step, with P = pose branch (``pose_offset`` + ``render_pose``) and X = expression
branch (``expression_offset`` + ``render_expression``), as in DESIGN.md:

1. forward cycle: ``P(w_A + pose(d_B))`` (B's pose, A's expression) is re-encoded and
   ``X(.. + exp(d_B))`` must give B; backward cycle: ``X(w_B + exp(d_A))`` (B's pose, A's
   expression) is re-encoded and ``P(.. + pose(d_A))`` must give A; both middle images
   must agree; each branch must reconstruct A from its own motion.
2. losses with the official weights (``PAIR_WEIGHTS``), a non-saturating GAN term on the two
   cycle outputs, and the landmark probes of ``dpe.losses`` (the asymmetric constraint).
3. generator + probe update, then the discriminator update (optional lazy R1).

Gradient accumulation splits the batch into ``micro_batches`` chunks (per-sample losses
are weighted by chunk size, so the gradient equals the full-batch one up to the
discriminator's minibatch-stddev statistics). When ``torch.distributed`` is initialised
with several workers, gradients are averaged across them before each optimiser step, so
no DistributedDataParallel wrapper is needed (the step calls model methods, not forward).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from .config import ModelConfig
from .discriminator import Discriminator
from .losses import (
    LEAKAGE_WEIGHT,
    READOUT_WEIGHT,
    DisentanglementProbes,
    PerceptualLoss,
    discriminator_gan_loss,
    generator_gan_loss,
    l1_distance,
    r1_penalty,
)
from .model import DPEGenerator
from .vgg import load_vgg19

BATCH_KEYS = ("frame_a", "frame_b", "pose_a", "pose_b", "expression_a", "expression_b")

# (VGG weight, L1 weight) per output/target pair, as in the official trainer.
PAIR_WEIGHTS: dict[str, tuple[float, float]] = {
    "cycle_b": (1.0, 2.0),  # forward cycle output vs B
    "cycle_a": (1.0, 2.0),  # backward cycle output vs A
    "middle": (2.0, 1.0),  # the two middle images vs each other
    "self_pose": (2.0, 1.0),  # pose branch reconstructs A
    "self_expression": (2.0, 1.0),  # expression branch reconstructs A
}


@dataclass
class TrainConfig:
    """Optimisation settings; the defaults are the official ones where one exists."""

    g_lr: float = 0.0016
    g_betas: tuple[float, float] = (0.0, 0.99**0.8)
    d_lr: float = 0.002 * 16 / 17
    d_betas: tuple[float, float] = (0.0, 0.99 ** (16 / 17))
    probe_lr: float = 1e-3
    perceptual: bool = True  # False trains without the VGG term (no weights file needed)
    vgg_weights: str | None = None  # None: $TORCH_HOME/hub/checkpoints/vgg19-dcbb9e9d.pth
    readout_weight: float = READOUT_WEIGHT
    leakage_weight: float = LEAKAGE_WEIGHT
    gan_weight: float = 1.0
    r1_weight: float = 0.0  # StyleGAN2 uses 10; the official DPE trainer none
    r1_every: int = 16
    micro_batches: int = 1
    bf16: bool = False  # bfloat16 autocast for the networks (losses are summed in float32)


@dataclass
class TrainState:
    """Everything one training step reads and updates."""

    generator: DPEGenerator
    discriminator: Discriminator
    probes: DisentanglementProbes
    perceptual: PerceptualLoss | None
    g_optimizer: torch.optim.Optimizer
    d_optimizer: torch.optim.Optimizer
    probe_optimizer: torch.optim.Optimizer
    model_config: ModelConfig
    train_config: TrainConfig = field(default_factory=TrainConfig)
    step: int = 0

    def modules(self) -> dict[str, nn.Module]:
        """Trainable modules by name (for ``dpe.checkpoint.save_checkpoint(models=...)``)."""
        return {"generator": self.generator, "discriminator": self.discriminator, "probes": self.probes}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Optimisers by name (for ``dpe.checkpoint.save_checkpoint(optimizers=...)``)."""
        return {"generator": self.g_optimizer, "discriminator": self.d_optimizer, "probes": self.probe_optimizer}

    def config_dict(self) -> dict:
        """Plain-data training configuration (for a checkpoint's ``extra``)."""
        return asdict(self.train_config)


def make_train_state(
    model_config: ModelConfig,
    train_config: TrainConfig | None = None,
    device: str | torch.device = "cpu",
) -> TrainState:
    """Fresh networks, probes, the perceptual loss (unless disabled) and the official optimisers."""
    train_config = train_config or TrainConfig()
    if train_config.micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {train_config.micro_batches}")
    device = torch.device(device)
    generator = DPEGenerator(model_config).to(device)
    discriminator = Discriminator(model_config).to(device)
    probes = DisentanglementProbes(model_config.style_dim).to(device)
    perceptual = PerceptualLoss(load_vgg19(train_config.vgg_weights)).to(device) if train_config.perceptual else None
    return TrainState(
        generator=generator,
        discriminator=discriminator,
        probes=probes,
        perceptual=perceptual,
        g_optimizer=torch.optim.Adam(_trainable(generator), lr=train_config.g_lr, betas=train_config.g_betas),
        d_optimizer=torch.optim.Adam(_trainable(discriminator), lr=train_config.d_lr, betas=train_config.d_betas),
        probe_optimizer=torch.optim.Adam(probes.parameters(), lr=train_config.probe_lr),
        model_config=model_config,
        train_config=train_config,
    )


def train_step(state: TrainState, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """One generator/probe update and one discriminator update; returns the losses as floats."""
    cfg = state.train_config
    device = next(state.generator.parameters()).device
    batch = _checked_batch(batch, state.model_config.size, device)
    size = len(batch["frame_a"])
    chunks = _split(batch, cfg.micro_batches)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    logs: dict[str, float] = {}

    # The probes' target statistics see the whole batch once, so chunking does not change them.
    state.probes.observe(
        torch.cat([batch["pose_a"], batch["pose_b"]]), torch.cat([batch["expression_a"], batch["expression_b"]])
    )

    # ---- generator and probes
    state.generator.train()
    d_params = [p for group in state.d_optimizer.param_groups for p in group["params"]]
    _set_requires_grad(d_params, False)  # D is a fixed critic during the generator pass
    state.g_optimizer.zero_grad(set_to_none=True)
    state.probe_optimizer.zero_grad(set_to_none=True)
    fakes, reals = [], []
    for chunk in chunks:
        share = len(chunk["frame_a"]) / size
        with autocast:
            total, terms, cycle_outputs = generator_objective(state, chunk)
        (total * share).backward()
        fakes.append(cycle_outputs.detach())
        reals.append(torch.cat([chunk["frame_a"], chunk["frame_b"]]))
        for name, value in terms.items():
            logs[name] = logs.get(name, 0.0) + share * value
    _average_across_workers([*_trainable(state.generator), *_trainable(state.probes)])
    state.g_optimizer.step()
    state.probe_optimizer.step()

    # ---- discriminator
    _set_requires_grad(d_params, True)
    state.d_optimizer.zero_grad(set_to_none=True)
    for real, fake in zip(reals, fakes):
        share = len(real) / (2 * size)
        with autocast:
            d_loss = discriminator_gan_loss(state.discriminator(real), state.discriminator(fake))
        (d_loss * share).backward()
        logs["d_gan"] = logs.get("d_gan", 0.0) + share * d_loss.item()
    if cfg.r1_weight > 0 and state.step % cfg.r1_every == 0:
        for real in reals:  # lazy R1 (StyleGAN2): every r1_every steps, scaled up by r1_every
            share = len(real) / (2 * size)
            real = real.detach().requires_grad_(True)
            with autocast:
                penalty = r1_penalty(state.discriminator(real), real)
            (penalty * (cfg.r1_weight / 2 * cfg.r1_every * share)).backward()
            logs["r1"] = logs.get("r1", 0.0) + share * penalty.item()
    _average_across_workers(d_params)
    state.d_optimizer.step()

    state.step += 1
    return logs


def generator_objective(
    state: TrainState, batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """Generator loss of one (micro-)batch, its terms as floats, and the two cycle outputs."""
    cfg, G = state.train_config, state.generator
    frame_a, frame_b = batch["frame_a"], batch["frame_b"]

    code_a, code_b = G.encode(frame_a), G.encode(frame_b)
    motion_a, motion_b = G.motion_vector(code_a.latent), G.motion_vector(code_b.latent)
    pose_a, pose_b = G.pose_offset(motion_a), G.pose_offset(motion_b)
    expression_a, expression_b = G.expression_offset(motion_a), G.expression_offset(motion_b)

    # Forward cycle: A takes B's pose, then B's expression, and must become B.
    middle_ab = G.render_pose(code_a.latent + pose_b, code_a.features)
    code_ab = G.encode(middle_ab)
    cycle_b = G.render_expression(code_ab.latent + expression_b, code_ab.features)
    # Backward cycle: B takes A's expression, then A's pose, and must become A.
    middle_ba = G.render_expression(code_b.latent + expression_a, code_b.features)
    code_ba = G.encode(middle_ba)
    cycle_a = G.render_pose(code_ba.latent + pose_a, code_ba.features)
    # Self-reconstruction through each branch.
    self_pose = G.render_pose(code_a.latent + pose_a, code_a.features)
    self_expression = G.render_expression(code_a.latent + expression_a, code_a.features)

    outputs = torch.cat([cycle_b, cycle_a, middle_ab, self_pose, self_expression])
    targets = torch.cat([frame_b, frame_a, middle_ba, frame_a, frame_a])
    pairs = len(PAIR_WEIGHTS)
    vgg_weights, l1_weights = (torch.tensor(w, device=outputs.device) for w in zip(*PAIR_WEIGHTS.values()))
    l1 = l1_distance(outputs, targets).view(pairs, -1).mean(dim=1)
    terms = {f"l1_{name}": l1[i] for i, name in enumerate(PAIR_WEIGHTS)}
    total = (l1_weights * l1).sum()
    if state.perceptual is not None:
        vgg = state.perceptual(outputs, targets).view(pairs, -1).mean(dim=1)
        terms.update({f"vgg_{name}": vgg[i] for i, name in enumerate(PAIR_WEIGHTS)})
        total = total + (vgg_weights * vgg).sum()

    cycle_outputs = torch.cat([cycle_a, cycle_b])
    terms["g_gan"] = generator_gan_loss(state.discriminator(cycle_outputs))
    asymmetry = state.probes(
        torch.cat([pose_a, pose_b]),
        torch.cat([expression_a, expression_b]),
        torch.cat([batch["pose_a"], batch["pose_b"]]),
        torch.cat([batch["expression_a"], batch["expression_b"]]),
    )
    terms["readout"], terms["leakage"] = asymmetry.readout, asymmetry.leakage
    total = (
        total
        + cfg.gan_weight * terms["g_gan"]
        + cfg.readout_weight * asymmetry.readout
        + cfg.leakage_weight * asymmetry.leakage
    )
    terms["g_total"] = total
    return total, {name: float(value.detach()) for name, value in terms.items()}, cycle_outputs


def _checked_batch(batch: Mapping[str, torch.Tensor], size: int, device: torch.device) -> dict[str, torch.Tensor]:
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        raise KeyError(f"training batch lacks {missing}; expected keys {list(BATCH_KEYS)}")
    out = {key: torch.as_tensor(batch[key]).to(device=device, dtype=torch.float32) for key in BATCH_KEYS}
    n = len(out["frame_a"])
    for key in ("frame_a", "frame_b"):
        if out[key].shape != (n, 3, size, size):
            raise ValueError(f"{key} must have shape ({n}, 3, {size}, {size}) in [-1, 1], got {tuple(out[key].shape)}")
    for key, shape in (("pose", (n, 6)), ("expression", (n, 68, 2))):
        for side in ("a", "b"):
            if out[f"{key}_{side}"].shape != shape:
                raise ValueError(f"{key}_{side} must have shape {shape}, got {tuple(out[f'{key}_{side}'].shape)}")
    return out


def _split(batch: dict[str, torch.Tensor], micro_batches: int) -> list[dict[str, torch.Tensor]]:
    size = len(batch["frame_a"])
    if micro_batches > size:
        raise ValueError(f"micro_batches={micro_batches} exceeds the batch size {size}")
    pieces = {key: torch.tensor_split(value, micro_batches) for key, value in batch.items()}
    return [{key: pieces[key][i] for key in batch} for i in range(micro_batches)]


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    """Parameters that learn (the generators keep some frozen ones for checkpoint layout)."""
    return [p for p in module.parameters() if p.requires_grad]


def _set_requires_grad(params: Iterable[nn.Parameter], flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)


def _average_across_workers(parameters: Iterable[nn.Parameter]) -> None:
    """All-reduce gradients (mean) when running under torch.distributed with several workers."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    params = list(parameters)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n
