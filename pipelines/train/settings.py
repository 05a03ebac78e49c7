"""The settings of a training run: each option of `portrait train` declared once, as a field.

`portrait train`, its YAML config files and the `train_model` Prefect flow are derived from
`TrainSettings` (`pipelines.options`); workers receive it pickled. Only the standard library is
imported here (no torch), so `portrait --help` stays fast.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pipelines.options import NOT_NEGATIVE, POSITIVE, Rule, at_least, check, matches, option

OBJECTIVES = ("ours", "official")
"""`ours`: dpe.train_step.TrainConfig() (landmark probes, exact area pyramid, ...); `official`:
TrainConfig.official(), the official trainer's objective, and the official frame sampler."""

MODEL_WIDTHS = ("auto", "official", "small")
"""Channel widths: `official` is the released model's table; `small` narrow layers for CPU demos
and tests; `auto` takes official at 256 px and above, small below."""

PERCEPTUAL_MODES = ("auto", "on", "off")
"""The VGG19 perceptual term: `on` needs the weights file, `auto` uses it when the file is there."""

OFFICIAL_FRAME_WINDOW = 500
"""The official sampler draws both frames of a pair from the first 500 frames of a clip."""

SHARPNESS_WITHOUT_VGG = 2.0
"""`--sharpness` when the VGG term is off with `--objective ours`: the image-gradient L1 per pair,
times the pair's VGG weight, about as large as the L1 terms on the sample at 64 px."""

DEFAULT_BATCH = 8
OFFICIAL_BATCH = 64
"""The official trainer's batch: `--batch` when it is not given with `--objective official`."""

RUN_NAME = matches(r"[A-Za-z0-9][A-Za-z0-9_.-]*", "must be letters, digits, '.', '_' and '-' (it names a folder)")
FRACTION_BELOW_ONE = Rule("must be at least 0 and below 1", lambda value: 0.0 <= value < 1.0)
EXCLUSIVE_FRACTION = Rule("must lie strictly between 0 and 1", lambda value: 0.0 < value < 1.0)
POWER_OF_TWO = Rule("must be a power of two, at least 16", lambda size: size >= 16 and size & (size - 1) == 0)
_DATA, _MODEL, _WORKERS, _OUTPUTS = "data and run", "model and objective", "workers", "outputs"


@dataclass(frozen=True)
class TrainSettings:
    """Everything a training run needs: the options of `portrait train` and of the `train_model`
    flow (one field each), pickled to workers as they are and saved in each checkpoint and run record."""

    data: str = option("out/dataset", "dataset folder (or s3:// / gs:// URI) written by `portrait prepare`",
                       group=_DATA, metavar="PATH_OR_URI", path=True)
    run_dir: str = option("runs", "folder (or s3:// / gs:// URI) that holds runs; the run is RUN_DIR/NAME",
                          group=_DATA, metavar="PATH_OR_URI", path=True)
    name: str = option("dpe", "run name; the same name and --run-dir resume the run", group=_DATA, rules=(RUN_NAME,))
    train_split: str = option("train", "split to train on", group=_DATA)
    eval_split: str = option("test", "split of the held-out pairs (training clips when the dataset has none)",
                             group=_DATA)
    frame_window: int | None = option(None, "draw pair frames from the first N frames of a clip (default: the whole "
                                            "clip; 500 with --objective official)", group=_DATA, metavar="N",
                                      rules=(at_least(1),))
    clip_cache_mb: int = option(256, "clips kept per loader process: decoded when all fit, else as stored (LRU)",
                                group=_DATA, rules=(at_least(1),))
    loader_workers: int = option(2, "processes per worker that prepare the pairs of the next steps (0: drawn on "
                                    "the training thread); give them CPUs with --cpus-per-worker", group=_DATA,
                                 rules=(NOT_NEGATIVE,))
    steps: int = option(1000, "total optimiser steps of the run (a rerun with more steps continues to the new total)",
                        group=_MODEL, rules=(at_least(1),))
    size: int = option(256, "model resolution in pixels (power of two; the stored 256 px crops are resized to it)",
                       group=_MODEL, rules=(POWER_OF_TWO,))
    model_width: str = option("auto", "channel widths: official, or small for CPU demos; auto = official at 256 px "
                                      "and above", group=_MODEL, choices=MODEL_WIDTHS)
    batch: int | None = option(None, "pairs per step over all workers (default 8; with --objective official 64, the "
                                     "official trainer's); a multiple of --workers", group=_MODEL,
                               rules=(at_least(1),))
    micro_batches: int = option(1, "gradient accumulation: chunks of each worker's share of the batch", group=_MODEL,
                                rules=(at_least(1),))
    bf16: bool = option(False, "bfloat16 autocast (GPUs; float16 with a gradient scaler on GPUs without bfloat16)",
                        group=_MODEL)
    grad_clip: float | None = option(None, "clip each update's total gradient norm to this (default: no clipping; the "
                                           "norms are logged either way)", group=_MODEL, metavar="NORM",
                                     rules=(POSITIVE,))
    ema_decay: float | None = option(None, "keep an exponential moving average of the generator with this decay "
                                           "(e.g. 0.999): evaluations, grids and --export use it", group=_MODEL,
                                     metavar="DECAY", rules=(EXCLUSIVE_FRACTION,))
    compile: bool = option(False, "torch.compile the networks (GPUs: faster steps after a slower first one)",
                           group=_MODEL)
    max_skipped_steps: int = option(10, "stop the run when this many steps in a row had non-finite losses or "
                                        "gradients (each is skipped and logged)", group=_MODEL, metavar="K",
                                    rules=(at_least(1),))
    objective: str = option("ours", "ours (with the landmark constraint) or official (the official trainer exactly)",
                            group=_MODEL, choices=OBJECTIVES)
    init: str | None = option(None, "start a new run from an official dpe.pt or LIA's vox.pt (detected from its keys)",
                              group=_MODEL, metavar="FILE", path=True)
    perceptual: str = option("auto", "VGG19 perceptual term: auto uses it when the weights file is present (logged)",
                             group=_MODEL, choices=PERCEPTUAL_MODES)
    vgg_weights: str | None = option(None, "vgg19-dcbb9e9d.pth (default: $TORCH_HOME/hub/checkpoints)", group=_MODEL,
                                     metavar="FILE", path=True)
    gan_start: int = option(0, "steps of reconstruction alone before the GAN term and the discriminator start "
                               "(0: from the first step, as the official trainer; see README, training recipe)",
                            group=_MODEL, metavar="STEP", rules=(NOT_NEGATIVE,))
    sharpness: float | None = option(None, "weight of the image-gradient L1 term, a sharpness term that stands in for "
                                           f"VGG offline (default: {SHARPNESS_WITHOUT_VGG:g} when training without the "
                                           "VGG term with --objective ours, else 0; see README, training recipe)",
                                     group=_MODEL, metavar="WEIGHT", rules=(NOT_NEGATIVE,))
    face_focus: float = option(0.0, "extra weight of the L1 and sharpness terms on the framed crop's inner face "
                                    "(eyes, nose, mouth): up to 1+X times the corners, the mean weight kept at 1 (0: "
                                    "uniform, as the official trainer; see README, training recipe)", group=_MODEL,
                               metavar="X", rules=(NOT_NEGATIVE,))
    flow_warmup: int = option(0, "steps during which the flow/mask heads keep their identity-warp start while the "
                                 "renderer learns (0: none)", group=_MODEL, metavar="STEP", rules=(NOT_NEGATIVE,))
    to_rgb_lr_mul: float = option(1.0, "learning-rate multiplier of the generators' to-RGB convs (1: one rate, as "
                                       "the official trainer)", group=_MODEL, metavar="X", rules=(POSITIVE,))
    lr_decay: float = option(0.0, "share of the run, at its end, over which every learning rate falls linearly to a "
                                  "tenth (0: constant rates, as the official trainer; see README, training recipe)",
                             group=_MODEL, metavar="SHARE", rules=(FRACTION_BELOW_ONE,))
    seed: int = option(0, "seed of the weights and of every pair drawn", group=_MODEL)
    workers: int = option(1, "Ray Train workers", group=_WORKERS, rules=(at_least(1),))
    cpus_per_worker: float = option(1.0, "CPUs reserved per worker (its torch threads on CPU)", group=_WORKERS,
                                    rules=(POSITIVE,))
    gpus_per_worker: float = option(0.0, "GPUs per worker", group=_WORKERS, rules=(NOT_NEGATIVE,))
    max_failures: int = option(3, "worker-group restarts from the newest checkpoint before giving up",
                               group=_WORKERS, rules=(NOT_NEGATIVE,))
    ray_address: str | None = option(None, "Ray cluster address (default: $RAY_ADDRESS, else a local Ray)",
                                     group=_WORKERS, metavar="ADDR")
    checkpoint_every: int = option(100, "steps between checkpoints", group=_OUTPUTS, metavar="N", rules=(at_least(1),))
    checkpoint_minutes: float | None = option(None, "also checkpoint at the first log step this many minutes after "
                                                    "the last checkpoint", group=_OUTPUTS, metavar="MINUTES",
                                              rules=(POSITIVE,))
    keep_checkpoints: int = option(3, "newest checkpoints kept", group=_OUTPUTS, metavar="K", rules=(at_least(1),))
    log_every: int = option(10, "steps per CSV / TensorBoard row and progress update", group=_OUTPUTS, metavar="N",
                            rules=(at_least(1),))
    grid_every: int = option(100, "steps between grids of transfers", group=_OUTPUTS, metavar="N", rules=(at_least(1),))
    eval_every: int = option(100, "steps between evaluations", group=_OUTPUTS, metavar="N", rules=(at_least(1),))
    eval_pairs: int = option(8, "fixed held-out pairs of the grids and evaluations", group=_OUTPUTS, metavar="N",
                             rules=(at_least(1),))

    def __post_init__(self) -> None:
        if self.batch is None:  # resolved once, so workers, records and checks all see the number
            object.__setattr__(self, "batch", OFFICIAL_BATCH if self.objective == "official" else DEFAULT_BATCH)
        check(self, [
            ("batch", self.batch >= self.workers and self.batch % self.workers == 0,
             f"must be a multiple of --workers ({self.workers}): each worker takes an equal share"),
            ("micro_batches", self.per_worker_batch % self.micro_batches == 0,
             f"must divide the per-worker batch ({self.per_worker_batch})"),
        ])

    @property
    def per_worker_batch(self) -> int:
        return self.batch // self.workers

    @property
    def effective_frame_window(self) -> int | None:
        if self.frame_window is not None:
            return self.frame_window
        return OFFICIAL_FRAME_WINDOW if self.objective == "official" else None

    def to_dict(self) -> dict[str, Any]:
        """For JSON records (run.json, checkpoints): the settings as plain values."""
        return asdict(self)


MODEL_SHAPING = ("size", "model_width", "objective")
"""Settings a resumed run must keep: they decide the networks and the objective in the checkpoint."""


def model_shape(size: int, model_width: str) -> dict[str, Any]:
    """The `dpe.config.ModelConfig` fields for a resolution and a width preset (plain data).

    `official` is the released model's layout at that size; `small` (style 32, 8 motion
    directions, 32 channels up to 32 px, 16 at 64 px, 8 above) trains on CPUs in minutes.
    """
    width = model_width if model_width != "auto" else ("official" if size >= 256 else "small")
    if width == "official":
        return {"size": size}
    resolutions = [2**i for i in range(2, size.bit_length())]
    return {"size": size, "style_dim": 32, "motion_dim": 8,
            "channels": {r: 32 if r <= 32 else 16 if r <= 64 else 8 for r in resolutions}}
