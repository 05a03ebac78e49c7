"""The networks, objective and starting weights of a run, from its settings.

Everything here is decided once, on the driver, before any worker starts (`plan_model`): the
model's `ModelConfig`, the `TrainConfig` of the chosen objective, whether the VGG19 perceptual
term can run, and what kind of file `--init` names (checked against the model, so a wrong file
fails in seconds, not after the workers have started). Workers build the same state from that
plan (`build_state`) and apply the initialisation (`apply_init`).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines.storage import OutputStore
from pipelines.train.settings import SHARPNESS_WITHOUT_VGG, TrainSettings, model_shape

if TYPE_CHECKING:
    from dpe.config import ModelConfig
    from dpe.train_step import TrainConfig

LOG = logging.getLogger(__name__)

INIT_OFFICIAL = "official"
INIT_LIA = "lia"


@dataclass(frozen=True)
class ModelPlan:
    """What every worker builds its `TrainState` from (pickled to the workers as it is)."""

    model: ModelConfig
    train: TrainConfig
    init_kind: str | None = None


def plan_model(settings: TrainSettings) -> ModelPlan:
    """Resolve the model, the objective and the initialisation file; ValueError naming what is wrong."""
    from dpe.config import ModelConfig
    from dpe.train_step import TrainConfig
    from dpe.vgg import VGGWeightsNotFoundError, resolve_vgg19_weights

    model = ModelConfig(**model_shape(settings.size, settings.model_width))
    perceptual = settings.perceptual != "off"
    vgg_weights = settings.vgg_weights
    if perceptual:
        try:
            vgg_weights = str(resolve_vgg19_weights(settings.vgg_weights))
        except VGGWeightsNotFoundError as error:
            if settings.perceptual == "on":
                raise ValueError(f"perceptual: {error}") from None
            LOG.warning("training WITHOUT the VGG19 perceptual term (the image-gradient term of --sharpness stands "
                        "in with our objective): %s", error)
            perceptual, vgg_weights = False, None
    options = dict(perceptual=perceptual, vgg_weights=vgg_weights, micro_batches=settings.micro_batches,
                   bf16=settings.bf16, grad_clip=settings.grad_clip, ema_decay=settings.ema_decay,
                   compile=settings.compile, gan_start=settings.gan_start, flow_warmup=settings.flow_warmup,
                   to_rgb_lr_mul=settings.to_rgb_lr_mul, sharpness_weight=sharpness_weight(settings, perceptual),
                   face_focus=settings.face_focus,
                   lr_decay=lr_decay_steps(settings))
    train = TrainConfig.official(**options) if settings.objective == "official" else TrainConfig(**options)
    init_kind = detect_init(settings.init, model) if settings.init else None
    if settings.objective == "official":
        _warn_official_departures(settings, init_kind)
    return ModelPlan(model, train, init_kind)


def sharpness_weight(settings: TrainSettings, perceptual: bool) -> float:
    """`--sharpness`, or its default: the offline stand-in for VGG when our objective trains without it."""
    if settings.sharpness is not None:
        return settings.sharpness
    return SHARPNESS_WITHOUT_VGG if settings.objective == "ours" and not perceptual else 0.0


def lr_decay_steps(settings: TrainSettings) -> tuple[int, int] | None:
    """`--lr-decay` as the steps of `TrainConfig.lr_decay`: the last share of `--steps`."""
    if settings.lr_decay == 0:
        return None
    return round(settings.steps * (1.0 - settings.lr_decay)), settings.steps


def _warn_official_departures(settings: TrainSettings, init_kind: str | None) -> None:
    """Say where an `--objective official` run is not the official trainer's run (it still trains)."""
    if init_kind != INIT_LIA:
        LOG.warning("--objective official without LIA's vox.pt: the official trainer starts from it (--init vox.pt); "
                    "this run starts from %s", "an official DPE checkpoint" if init_kind else "random weights")
    if settings.bf16:
        LOG.warning("--objective official with --bf16: the official trainer runs in float32; bfloat16 changes "
                    "the numerics (losses and gradients are rounded)")
    if settings.micro_batches > 1:
        LOG.warning("--objective official with --micro-batches %d: the discriminator's minibatch-stddev groups "
                    "see chunks of %d pairs, not the official batch", settings.micro_batches,
                    settings.per_worker_batch // settings.micro_batches)


def read_init(path: str) -> bytes:
    """The content of an initialisation file, local or on an object store (FileNotFoundError naming it)."""
    folder, _, name = path.rpartition("/")
    try:
        return OutputStore(folder or ".").read_bytes(name)
    except FileNotFoundError:
        raise FileNotFoundError(f"init: {path} does not exist; give --init an official dpe.pt or LIA's vox.pt") \
            from None


def detect_init(path: str, model_config) -> str:
    """Whether `path` is an official DPE checkpoint or LIA's vox.pt for this model (tried in that order).

    Raises FileNotFoundError or ValueError with both loaders' reasons when it is neither.
    """
    from dpe.checkpoint import initialise_from_official, load_lia_initialisation
    from dpe.discriminator import Discriminator
    from dpe.model import DPEGenerator

    content = read_init(path)
    generator, discriminator = DPEGenerator(model_config), Discriminator(model_config)
    try:
        loaded = initialise_from_official(io.BytesIO(content), generator, discriminator)
        LOG.info("--init %s: an official DPE checkpoint (%s)", path, " and ".join(loaded))
        return INIT_OFFICIAL
    except ValueError as official_error:
        try:
            load_lia_initialisation(io.BytesIO(content), generator)
        except ValueError as lia_error:
            raise ValueError(f"init: {path} is neither an official DPE checkpoint nor LIA's vox.pt for this model "
                             f"(size {model_config.size}). As an official file: {official_error} As a LIA file: "
                             f"{lia_error}") from None
    LOG.info("--init %s: LIA's vox.pt (encoder, motion MLP and directions)", path)
    return INIT_LIA


def build_state(plan: ModelPlan, device):
    """A fresh `dpe.train_step.TrainState` from the plan (seed torch first for identical ranks)."""
    from dpe.train_step import make_train_state

    return make_train_state(plan.model, plan.train, device)


def apply_init(state, kind: str, content: bytes) -> list[str]:
    """Load the initialisation file's content (as read on the driver) into a fresh state."""
    from dpe.checkpoint import initialise_from_official, load_lia_initialisation

    if kind == INIT_OFFICIAL:
        return initialise_from_official(io.BytesIO(content), state.generator, state.discriminator)
    if kind == INIT_LIA:
        load_lia_initialisation(io.BytesIO(content), state.generator)
        return ["encoder", "motion"]
    raise ValueError(f"unknown initialisation kind {kind!r}")
