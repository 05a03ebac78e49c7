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
with several workers, gradients are averaged across them by ``dpe.distributed.GradientReducer``
(DDP's bucketed all-reduce, overlapped with the last backward pass; no communication during
the earlier micro-batches), so no DistributedDataParallel wrapper is needed (the step calls
model methods, not forward). The discriminator's gradients are taken before either update (its
update never depended on the generator's), so the step waits for the device once: both updates
are applied, or, when a gradient norm or loss is not finite on any worker, neither (the step
is skipped; ``skipped`` in its logs). Optional: gradient-norm clipping (``grad_clip``), an
exponential moving average of the generator (``ema_decay``), a linear fall of every learning
rate at the end of a run (``lr_decay``), float16 with a gradient scaler, ``torch.compile``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from .config import ModelConfig
from .discriminator import Discriminator
from .distributed import BUCKET_MB, GradientReducer, distributed_world
from .losses import (
    LEAKAGE_WEIGHT,
    READOUT_WEIGHT,
    DisentanglementProbes,
    PerceptualLoss,
    discriminator_gan_loss,
    generator_gan_loss,
    gradient_l1_distance,
    inner_face_weights,
    l1_distance,
    r1_penalty,
)
from .model import DPEGenerator
from .vgg import load_vgg19

LOG = logging.getLogger(__name__)

LR_DECAY_FLOOR = 0.1
"""The share of each learning rate left at the end of ``TrainConfig.lr_decay``."""

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
    to_rgb_lr_mul: float = 1.0  # the generators' to-RGB convs learn at g_lr times this (1: one rate, as official)
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
    sharpness_weight: float = 0.0  # image-gradient L1 per pair, times the pair's VGG weight (0: off, as official)
    face_focus: float = 0.0  # L1 and sharpness weigh the inner face up to 1+this x the corners (0: uniform, official)
    gan_weight: float = 1.0
    flow_warmup: int = 0  # steps during which the flow/mask heads keep their weights (an identity warp; 0: none)
    gan_start: int = 0  # steps trained on reconstruction alone before the GAN term and D updates begin
    d_gan_weight: float = 1.0  # official: 10
    r1_weight: float = 0.0  # StyleGAN2 uses 10; the official DPE trainer none
    r1_every: int = 16
    micro_batches: int = 1
    bf16: bool = False  # bfloat16 autocast for the networks (losses are summed in float32)
    fp16: bool = False  # float16 autocast with a gradient scaler (GPUs without bfloat16; chosen for bf16 there)
    grad_clip: float | None = None  # clip each update's total gradient norm (G + probes, and D) to this
    ema_decay: float | None = None  # keep an exponential moving average of the generator (e.g. 0.999)
    lr_decay: tuple[int, int] | None = None  # (start, end) steps: every rate falls linearly to LR_DECAY_FLOOR x
    compile: bool = False  # torch.compile the networks (the default inductor backend)

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
    generator_ema: DPEGenerator | None = None  # the averaged generator (``ema_decay``): evaluation and export
    amp_dtype: torch.dtype | None = None  # autocast type, None for float32
    scaler: torch.amp.GradScaler | None = None  # float16 only
    g_reducer: GradientReducer = field(default_factory=lambda: GradientReducer([]))
    d_reducer: GradientReducer = field(default_factory=lambda: GradientReducer([]))

    def modules(self) -> dict[str, nn.Module]:
        """Modules by name (for ``dpe.checkpoint.save_checkpoint(models=...)``)."""
        modules = {"generator": self.generator, "discriminator": self.discriminator, "probes": self.probes}
        if self.generator_ema is not None:
            modules["generator_ema"] = self.generator_ema
        return modules

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Optimisers (and the float16 gradient scaler) by name (for ``save_checkpoint(optimizers=...)``)."""
        optimizers = {"generator": self.g_optimizer, "discriminator": self.d_optimizer,
                      "probes": self.probe_optimizer}
        if self.scaler is not None:
            optimizers["grad_scaler"] = self.scaler
        return optimizers

    def evaluated_generator(self) -> DPEGenerator:
        """The generator that evaluation, grids and export use: the average when there is one."""
        return self.generator_ema if self.generator_ema is not None else self.generator

    def config_dict(self) -> dict:
        """Plain-data training configuration (for a checkpoint's ``extra``)."""
        return asdict(self.train_config)


def make_train_state(
    model_config: ModelConfig,
    train_config: TrainConfig | None = None,
    device: str | torch.device = "cpu",
    bucket_mb: float = BUCKET_MB,
) -> TrainState:
    """Fresh networks, probes, the perceptual loss (unless disabled) and the official optimisers
    (`bucket_mb`: the gradient all-reduce's bucket size under several workers)."""
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
    if train_config.ema_decay is not None and not 0.0 < train_config.ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1), got {train_config.ema_decay}")
    generator_ema = copy.deepcopy(generator).requires_grad_(False) if train_config.ema_decay is not None else None
    amp_dtype = _autocast_type(train_config, device)
    if train_config.compile:
        for module in (*generator.children(), discriminator):
            module.compile()
    return TrainState(
        generator=generator,
        discriminator=discriminator,
        probes=probes,
        perceptual=perceptual,
        g_optimizer=torch.optim.Adam(_generator_groups(generator, train_config), lr=train_config.g_lr,
                                     betas=train_config.g_betas),
        d_optimizer=torch.optim.Adam(_trainable(discriminator), lr=train_config.d_lr, betas=train_config.d_betas),
        probe_optimizer=torch.optim.Adam(probes.parameters(), lr=train_config.probe_lr),
        model_config=model_config,
        train_config=train_config,
        generator_ema=generator_ema,
        amp_dtype=amp_dtype,
        scaler=torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None,
        g_reducer=GradientReducer([*_trainable(generator), *_trainable(probes)], bucket_mb),
        d_reducer=GradientReducer(_trainable(discriminator), bucket_mb),
    )


def _generator_groups(generator: DPEGenerator, train_config: TrainConfig) -> list[dict]:
    """One Adam group, or two when the to-RGB convs have their own rate (``to_rgb_lr_mul``).

    The equalised learning rate divides every weight by sqrt(fan_in) at run time, so a 1x1 to-RGB
    conv over C channels moves its colours at g_lr / sqrt(C) per step; from a random start its
    colour mix then lags the rest of the renderer (README, training recipe).
    """
    named = [(name, p) for name, p in generator.named_parameters() if p.requires_grad]
    rates = _generator_rates(train_config)
    if len(rates) == 1:
        return [{"params": [p for _, p in named]}]
    to_rgb = [p for name, p in named if ".to_rgbs." in name]
    return [{"params": [p for name, p in named if ".to_rgbs." not in name]}, {"params": to_rgb, "lr": rates[1]}]


def _generator_rates(train_config: TrainConfig) -> list[float]:
    """The base rate of each generator Adam group (``_generator_groups``)."""
    if train_config.to_rgb_lr_mul == 1.0:
        return [train_config.g_lr]
    return [train_config.g_lr, train_config.g_lr * train_config.to_rgb_lr_mul]


def lr_factor(train_config: TrainConfig, step: int) -> float:
    """The share of the base learning rates used at ``step``: 1, then a linear fall to ``LR_DECAY_FLOOR``
    over ``lr_decay`` (averages out the late steps' noise at small batches; README, training recipe)."""
    if train_config.lr_decay is None:
        return 1.0
    start, end = train_config.lr_decay
    progress = min(max((step - start) / max(end - start, 1), 0.0), 1.0)
    return 1.0 - (1.0 - LR_DECAY_FLOOR) * progress


def _set_learning_rates(state: TrainState) -> None:
    """Every optimiser group at its base rate times ``lr_factor`` of this step (set from the
    configuration, so a restored optimiser state needs nothing saved for it)."""
    cfg = state.train_config
    factor = lr_factor(cfg, state.step)
    for optimizer, rates in ((state.g_optimizer, _generator_rates(cfg)), (state.probe_optimizer, [cfg.probe_lr]),
                             (state.d_optimizer, [cfg.d_lr])):
        for group, rate in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = rate * factor


def _autocast_type(train_config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bfloat16, float16 (asked for, or bf16 asked for on a GPU without it) or None (float32)."""
    if train_config.fp16:
        return torch.float16
    if not train_config.bf16:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        LOG.warning("this GPU has no bfloat16: training in float16 with a gradient scaler instead")
        return torch.float16
    return torch.bfloat16


def train_step(state: TrainState, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One generator/probe update and one discriminator update, or none (a skipped step).

    Returns the loss terms and gradient norms as detached 0-dim tensors on the model's device (read
    them once per log interval, not per step: each read waits for the device) and ``skipped`` (a
    CPU tensor, 1.0 when the step was skipped). The step waits for the device once, to decide
    whether every gradient norm and loss is finite on every worker; if not, no optimiser, EMA or
    probe statistic changes (``state.step`` still advances, so the data of later steps is unchanged).
    Under float16, gradients that overflow while the losses are finite are the gradient scaler's
    routine (``overflow``, not ``skipped``): it lowers its scale and the step is not applied.
    """
    cfg = state.train_config
    device = next(state.generator.parameters()).device
    batch = _checked_batch(batch, state.model_config.size, device)
    size = len(batch["frame_a"])
    chunks = _split(batch, cfg.micro_batches)
    autocast = torch.autocast(device_type=device.type, dtype=state.amp_dtype or torch.float32,
                              enabled=state.amp_dtype is not None)
    scale = state.scaler.scale if state.scaler is not None else (lambda loss: loss)
    logs: dict[str, torch.Tensor] = {}
    adversarial = state.step >= cfg.gan_start  # before --gan-start: reconstruction alone

    # The probes' target statistics see the whole batch once, so chunking does not change them.
    probe_statistics = [buffer.clone() for buffer in state.probes.buffers()]
    state.probes.observe(
        torch.cat([batch["pose_a"], batch["pose_b"]]), torch.cat([batch["expression_a"], batch["expression_b"]])
    )

    # ---- generator and probes: gradients (D is a fixed critic during this pass)
    state.generator.train()
    g_params, d_params = _g_parameters(state), _d_parameters(state)
    _set_requires_grad(d_params, False)
    state.g_optimizer.zero_grad(set_to_none=True)
    state.probe_optimizer.zero_grad(set_to_none=True)
    sides: list[tuple[float, list[tuple[torch.Tensor, torch.Tensor]]]] = []  # (share, [(real, fake)])
    for number, chunk in enumerate(chunks):
        share = len(chunk["frame_a"]) / size
        with state.g_reducer.armed(last=number == len(chunks) - 1):
            with autocast:
                total, terms, cycles = generator_objective(state, chunk, adversarial)
            scale(total * share).backward()
        sides.append((share, [(chunk[frame], cycles[name].detach()) for name, frame in CYCLE_TARGETS.items()]))
        for name, value in terms.items():
            logs[name] = logs.get(name, 0.0) + share * value
    state.g_reducer.finish()
    if state.step < cfg.flow_warmup:  # the renderer learns on an identity warp before the flows may move
        for parameter in _flow_head_parameters(state.generator):
            parameter.grad = None

    # ---- discriminator: gradients (D's update does not depend on G's, so both step together below)
    # Before --gan-start the discriminator neither judges nor learns (a reconstruction warm-up).
    _set_requires_grad(d_params, True)
    state.d_optimizer.zero_grad(set_to_none=True)
    if adversarial:
        if cfg.r1_weight > 0 and state.step % cfg.r1_every == 0:
            for share, pairs in sides:  # lazy R1 (StyleGAN2): every r1_every steps, scaled up by r1_every
                penalty = 0.0
                for real, _ in pairs:
                    real = real.detach().requires_grad_(True)
                    with autocast:
                        penalty = penalty + r1_penalty(state.discriminator(real), real)
                scale(penalty * (cfg.r1_weight / 2 * cfg.r1_every * share)).backward()
                logs["r1"] = logs.get("r1", 0.0) + share * penalty.detach()
        for number, (share, pairs) in enumerate(sides):  # each image set in its own call, the losses summed
            with state.d_reducer.armed(last=number == len(sides) - 1):
                with autocast:
                    d_loss = sum(discriminator_gan_loss(state.discriminator(real), state.discriminator(fake))
                                 for real, fake in pairs)
                scale(d_loss * (cfg.d_gan_weight * share)).backward()
            logs["d_gan"] = logs.get("d_gan", 0.0) + share * d_loss.detach()
        state.d_reducer.finish()

    # ---- one decision for both updates, the same on every worker
    optimizers = [state.g_optimizer, state.probe_optimizer] + ([state.d_optimizer] if adversarial else [])
    if state.scaler is not None:
        for optimizer in optimizers:
            state.scaler.unscale_(optimizer)
    logs["g_grad_norm"] = _clipped_norm(g_params, cfg.grad_clip)
    losses, norms = [logs["g_total"]], [logs["g_grad_norm"]]
    if adversarial:
        logs["d_grad_norm"] = _clipped_norm(d_params, cfg.grad_clip)
        losses.append(logs["d_gan"])
        norms.append(logs["d_grad_norm"])
    losses_bad = ~torch.isfinite(torch.stack([value.float() for value in losses])).all()
    grads_bad = ~torch.isfinite(torch.stack([value.float() for value in norms])).all()
    losses_bad, grads_bad = _on_any_worker(torch.stack([losses_bad, grads_bad]))
    # float16 gradients that overflow with finite losses are the scaler's business (it lowers its scale)
    overflow = state.scaler is not None and grads_bad and not losses_bad
    skipped = losses_bad or grads_bad
    if skipped:
        for buffer, saved in zip(state.probes.buffers(), probe_statistics):
            buffer.copy_(saved)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        if state.scaler is not None:
            state.scaler.update()  # lowers the scale when the gradients overflowed
    else:
        if cfg.lr_decay is not None:
            _set_learning_rates(state)
        for optimizer in optimizers:
            if state.scaler is not None:
                state.scaler.step(optimizer)
            else:
                optimizer.step()
        if state.scaler is not None:
            state.scaler.update()
        if state.generator_ema is not None:
            update_ema(state.generator_ema, state.generator, cfg.ema_decay)
    logs["skipped"] = torch.tensor(float(skipped and not overflow))
    if state.scaler is not None:
        logs["overflow"] = torch.tensor(float(overflow))
    state.step += 1
    return logs


def generator_objective(
    state: TrainState, batch: Mapping[str, torch.Tensor], adversarial: bool = True
) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
    """Generator loss of one (micro-)batch, its terms (detached tensors), and the cycle outputs by name
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
    weights = inner_face_weights(outputs.shape[-1], cfg.face_focus, outputs.device) if cfg.face_focus > 0 else None
    l1 = l1_distance(outputs, targets, weights).view(pairs, -1).mean(dim=1)
    terms = {f"l1_{name}": l1[i] for i, name in enumerate(PAIR_WEIGHTS)}
    total = (l1_weights * l1).sum()
    if state.perceptual is not None:
        vgg = state.perceptual(outputs, targets).view(pairs, -1).mean(dim=1)
        terms.update({f"vgg_{name}": vgg[i] for i, name in enumerate(PAIR_WEIGHTS)})
        total = total + (vgg_weights * vgg).sum()
    if cfg.sharpness_weight > 0:
        sharpness = gradient_l1_distance(outputs, targets, weights).view(pairs, -1).mean(dim=1)
        terms.update({f"sharp_{name}": sharpness[i] for i, name in enumerate(PAIR_WEIGHTS)})
        total = total + cfg.sharpness_weight * (vgg_weights * sharpness).sum()

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
    return total, {name: value.detach() for name, value in terms.items()}, cycles


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


def _g_parameters(state: TrainState) -> list[nn.Parameter]:
    return [*_trainable(state.generator), *_trainable(state.probes)]


def _flow_head_parameters(generator: DPEGenerator) -> list[nn.Parameter]:
    return [p for name, p in generator.named_parameters() if ".to_flows." in name]


def _d_parameters(state: TrainState) -> list[nn.Parameter]:
    return [p for group in state.d_optimizer.param_groups for p in group["params"]]


def _clipped_norm(parameters: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """The gradients' total L2 norm (before clipping), clipped to ``max_norm`` when given (device only)."""
    with_grads = [p for p in parameters if p.grad is not None]
    if not with_grads:
        return torch.zeros((), device=parameters[0].device if parameters else None)
    norm = torch.nn.utils.get_total_norm([p.grad for p in with_grads], norm_type=2.0)
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(with_grads, max_norm, norm)
    return norm


def _on_any_worker(flags: torch.Tensor) -> list[bool]:
    """Each flag, true when it is true on any worker (the reduced gradient norms already agree; the
    losses are each worker's own). The step's one wait for the device."""
    flags = flags.to(torch.int32)
    if distributed_world() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [bool(flag) for flag in flags.tolist()]


@torch.no_grad()
def update_ema(average: nn.Module, model: nn.Module, decay: float) -> None:
    """``average = decay * average + (1 - decay) * model`` for parameters; buffers copied."""
    averaged = [p for p in average.parameters() if p.dtype.is_floating_point]
    current = [p for p in model.parameters() if p.dtype.is_floating_point]
    torch._foreach_lerp_(averaged, current, 1.0 - decay)
    for mine, theirs in zip(average.buffers(), model.buffers()):
        mine.copy_(theirs)
