"""One DPE training step as a plain function (the Ray Train loop calls it per batch).

Batch (a dict of tensors; frames A and B come from the same clip):

* ``frame_a``, ``frame_b``: (B, 3, H, W) float in [-1, 1], H = W = ``ModelConfig.size``
* ``pose_a``, ``pose_b``: (B, 6) and ``expression_a``, ``expression_b``: (B, 68, 2), the
  landmark split of ``dpe.landmarks.split_pose_expression`` stored by dataset preparation.

The step is the official trainer's graph (OpenTalker/DPE ``trainer.py`` and the training
stage of ``networks/generator.py``), in behaviour names: X = expression branch
(``expression_offset`` + ``render_expression``, official ``mlp_pose``/``dec_pose``), P = pose
branch (``pose_offset`` + ``render_pose``, official ``mlp_exp``/``dec_exp``).

1. forward cycle: ``X(w_A + exp(d_B))`` (A's pose, B's expression; official ``fake_poseB2A``)
   is re-encoded and ``P(.. + pose(d_B))`` must give B; backward cycle: ``P(w_B + pose(d_A))``
   (A's pose, B's expression; ``fake_expA2B``) is re-encoded and ``X(.. + exp(d_A))`` must
   give A; the two middle images must agree; each branch must reconstruct A from A's motion.
2. losses with the official weights (``PAIR_WEIGHTS``), the non-saturating GAN term summed
   over the two cycle outputs (``softplus(-D(cycle_b)).mean() + softplus(-D(cycle_a)).mean()``),
   and the landmark probes of ``dpe.losses`` (the asymmetric constraint).
3. generator + probe update, then the discriminator update: real B against the forward
   cycle's output and real A against the backward cycle's, each image set in its own
   discriminator call, the two pair losses summed (optional lazy R1 on each real set).
   Before ``gan_start`` steps (0: none, as the official trainer) the step is reconstruction alone:
   no GAN term, no discriminator update (without the VGG term the GAN term otherwise outweighs L1
   at small scale; README, training recipe).

``TrainConfig()`` is our objective, ``TrainConfig.official()`` the official one exactly. They
differ in:

* the probes (``readout_weight``, ``leakage_weight``): 0 in the official preset, which has
  nothing that tells the branches apart (both are still logged; the closed-form leakage stays
  a meaningful diagnostic, the read-out probes do not learn);
* ``perceptual_detach_target``: the official VGG loss detaches the second image, so the
  middle pair's perceptual term pulls only X's middle image; ours pulls both (the pair has
  no ground truth, and the official L1 on the same pair is two-sided);
* ``perceptual_pyramid``: official Gaussian anti-aliasing against our exact block average
  (cheaper, no zero-padding fade at the border; see ``dpe.losses``);
* ``d_gan_weight``: the official discriminator loss is multiplied by 10. Adam is invariant
  to a constant loss scale up to its eps, so this only matters against R1, whose gamma is
  calibrated on StyleGAN2's unscaled loss; ours is 1.

Where the official trainer was right and we had departed, the default now follows it: the
generator's GAN term is the sum over the two cycle outputs (we took one mean over both, half
the official adversarial weight); VGG inputs are clamped to [-1, 1]; the discriminator sees
each image set in its own call, so minibatch-stddev groups hold one kind of image (a joint
call of A and B put both frames of a clip, nearly the same face, into one group); the
forward cycle starts with the expression branch on A (we started with the pose branch,
which is the official objective with A and B exchanged in the cycles: the same in
expectation over exchangeable pairs, not batch for batch).

The official code does not run as shipped; the preset reproduces what it evidently intends:

* the training forward calls the encoder with an undefined ``h_start`` (NameError); the
  inference stages pass ``None``, which the encoder ignores, so there is nothing to pass;
* ``train.py`` unpacks seven values from ``gen_update``, which returns nine (ValueError);
* ``train.py`` then hands the two *middle* images to ``dis_update``, whose parameters are
  named for the two *cycle outputs*. We follow ``dis_update``: the discriminator judges
  the images the generator's adversarial term is computed on, each next to the real frame
  it reconstructs.

The official sampler (two frames drawn with replacement from the first 500 frames of a
clip) belongs to the data loader, and official training starts from LIA's ``vox.pt``
(``dpe.checkpoint.load_lia_initialisation``).

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
# Each cycle output and the real frame it must reproduce (the discriminator's pairs).
CYCLE_TARGETS: dict[str, str] = {"cycle_b": "frame_b", "cycle_a": "frame_a"}


@dataclass
class TrainConfig:
    """Optimisation settings and objective switches: our objective by default (module docstring)."""

    g_lr: float = 0.0016
    g_betas: tuple[float, float] = (0.0, 0.99**0.8)
    d_lr: float = 0.002 * 16 / 17
    d_betas: tuple[float, float] = (0.0, 0.99 ** (16 / 17))
    probe_lr: float = 1e-3
    perceptual: bool = True  # False trains without the VGG term (no weights file needed)
    vgg_weights: str | None = None  # None: $TORCH_HOME/hub/checkpoints/vgg19-dcbb9e9d.pth
    perceptual_pyramid: str = "area"  # official: "gaussian"
    perceptual_detach_target: bool = False  # official: True
    readout_weight: float = READOUT_WEIGHT  # official: 0
    leakage_weight: float = LEAKAGE_WEIGHT  # official: 0
    gan_weight: float = 1.0
    gan_start: int = 0  # steps trained on reconstruction alone before the GAN term and D updates begin
    d_gan_weight: float = 1.0  # official: 10
    r1_weight: float = 0.0  # StyleGAN2 uses 10; the official DPE trainer none
    r1_every: int = 16
    micro_batches: int = 1
    bf16: bool = False  # bfloat16 autocast for the networks (losses are summed in float32)

    @classmethod
    def official(cls, **overrides) -> "TrainConfig":
        """The official DPE trainer's objective exactly; ``overrides`` set other fields (paths, batching)."""
        official = dict(
            perceptual_pyramid="gaussian",
            perceptual_detach_target=True,
            readout_weight=0.0,
            leakage_weight=0.0,
            d_gan_weight=10.0,
        )
        return cls(**{**official, **overrides})


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
    perceptual = None
    if train_config.perceptual:
        perceptual = PerceptualLoss(
            load_vgg19(train_config.vgg_weights),
            pyramid=train_config.perceptual_pyramid,
            detach_target=train_config.perceptual_detach_target,
        ).to(device)
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
    adversarial = state.step >= cfg.gan_start

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
    sides: list[tuple[float, list[tuple[torch.Tensor, torch.Tensor]]]] = []  # (share, [(real, fake)])
    for chunk in chunks:
        share = len(chunk["frame_a"]) / size
        with autocast:
            total, terms, cycles = generator_objective(state, chunk, adversarial)
        (total * share).backward()
        sides.append((share, [(chunk[frame], cycles[name].detach()) for name, frame in CYCLE_TARGETS.items()]))
        for name, value in terms.items():
            logs[name] = logs.get(name, 0.0) + share * value
    _average_across_workers([*_trainable(state.generator), *_trainable(state.probes)])
    state.g_optimizer.step()
    state.probe_optimizer.step()

    _set_requires_grad(d_params, True)
    if not adversarial:  # reconstruction warm-up: the discriminator neither judges nor learns yet
        state.step += 1
        return logs

    # ---- discriminator: each image set in its own call, the per-side losses summed
    state.d_optimizer.zero_grad(set_to_none=True)
    for share, pairs in sides:
        with autocast:
            d_loss = sum(discriminator_gan_loss(state.discriminator(real), state.discriminator(fake))
                         for real, fake in pairs)
        (d_loss * (cfg.d_gan_weight * share)).backward()
        logs["d_gan"] = logs.get("d_gan", 0.0) + share * d_loss.item()
    if cfg.r1_weight > 0 and state.step % cfg.r1_every == 0:
        for share, pairs in sides:  # lazy R1 (StyleGAN2): every r1_every steps, scaled up by r1_every
            penalty = 0.0
            for real, _ in pairs:
                real = real.detach().requires_grad_(True)
                with autocast:
                    penalty = penalty + r1_penalty(state.discriminator(real), real)
            (penalty * (cfg.r1_weight / 2 * cfg.r1_every * share)).backward()
            logs["r1"] = logs.get("r1", 0.0) + share * penalty.item()
    _average_across_workers(d_params)
    state.d_optimizer.step()

    state.step += 1
    return logs


def generator_objective(
    state: TrainState, batch: Mapping[str, torch.Tensor], adversarial: bool = True
) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
    """Generator loss of one (micro-)batch, its terms as floats, and the cycle outputs by name
    (without the GAN term when not `adversarial`)."""
    cfg, G = state.train_config, state.generator
    frame_a, frame_b = batch["frame_a"], batch["frame_b"]

    code_a, code_b = G.encode(frame_a), G.encode(frame_b)
    motion_a, motion_b = G.motion_vector(code_a.latent), G.motion_vector(code_b.latent)
    pose_a, pose_b = G.pose_offset(motion_a), G.pose_offset(motion_b)
    expression_a, expression_b = G.expression_offset(motion_a), G.expression_offset(motion_b)

    # Forward cycle: A takes B's expression, then B's pose, and must become B.
    middle_forward = G.render_expression(code_a.latent + expression_b, code_a.features)
    code_forward = G.encode(middle_forward)
    cycle_b = G.render_pose(code_forward.latent + pose_b, code_forward.features)
    # Backward cycle: B takes A's pose, then A's expression, and must become A.
    middle_backward = G.render_pose(code_b.latent + pose_a, code_b.features)
    code_backward = G.encode(middle_backward)
    cycle_a = G.render_expression(code_backward.latent + expression_a, code_backward.features)
    # Self-reconstruction through each branch.
    self_pose = G.render_pose(code_a.latent + pose_a, code_a.features)
    self_expression = G.render_expression(code_a.latent + expression_a, code_a.features)

    # Both middle images show A's pose with B's expression; official order: forward one first.
    outputs = torch.cat([cycle_b, cycle_a, middle_forward, self_pose, self_expression])
    targets = torch.cat([frame_b, frame_a, middle_backward, frame_a, frame_a])
    pairs = len(PAIR_WEIGHTS)
    vgg_weights, l1_weights = (torch.tensor(w, device=outputs.device) for w in zip(*PAIR_WEIGHTS.values()))
    l1 = l1_distance(outputs, targets).view(pairs, -1).mean(dim=1)
    terms = {f"l1_{name}": l1[i] for i, name in enumerate(PAIR_WEIGHTS)}
    total = (l1_weights * l1).sum()
    if state.perceptual is not None:
        vgg = state.perceptual(outputs, targets).view(pairs, -1).mean(dim=1)
        terms.update({f"vgg_{name}": vgg[i] for i, name in enumerate(PAIR_WEIGHTS)})
        total = total + (vgg_weights * vgg).sum()

    cycles = {"cycle_b": cycle_b, "cycle_a": cycle_a}
    if adversarial:
        terms["g_gan"] = sum(generator_gan_loss(state.discriminator(image)) for image in cycles.values())
        total = total + cfg.gan_weight * terms["g_gan"]
    asymmetry = state.probes(
        torch.cat([pose_a, pose_b]),
        torch.cat([expression_a, expression_b]),
        torch.cat([batch["pose_a"], batch["pose_b"]]),
        torch.cat([batch["expression_a"], batch["expression_b"]]),
    )
    terms["readout"], terms["leakage"] = asymmetry.readout, asymmetry.leakage
    total = total + cfg.readout_weight * asymmetry.readout + cfg.leakage_weight * asymmetry.leakage
    terms["g_total"] = total
    return total, {name: float(value.detach()) for name, value in terms.items()}, cycles


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
