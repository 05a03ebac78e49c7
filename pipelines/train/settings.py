"""The settings of a training run and their defaults: the one place those defaults are stated.

`portrait train`, its YAML config files and the `train_model` Prefect flow read their defaults
from `TrainSettings`; workers receive it as plain data. Only the standard library is imported
here (no torch), so `portrait --help` stays fast.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

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

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class TrainSettings:
    """Everything a training run needs (plain data: the flow's parameters, pickled to workers)."""

    data: str = "out/dataset"
    """A dataset written by `portrait prepare`: a local folder or an s3:// / gs:// URI."""
    run_dir: str = "runs"
    """Where runs live (local folder, NFS or object store); the run is `<run_dir>/<name>/`."""
    name: str = "dpe"
    """The run's name: running the same name and run_dir again resumes it."""
    steps: int = 1000
    """Total optimiser steps of the run (a rerun with more steps continues to the new total)."""
    size: int = 256
    """Model resolution in pixels (stored 256 px crops are resized to it)."""
    model_width: str = "auto"
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    batch: int = 8
    """Pairs per optimiser step over all workers (the official trainer: 64); a multiple of workers."""
    micro_batches: int = 1
    """Gradient accumulation: each worker's share of the batch runs in this many chunks."""
    bf16: bool = False
    objective: str = "ours"
    init: str | None = None
    """Start a new run from an official dpe.pt or from LIA's vox.pt (detected from its keys)."""
    perceptual: str = "auto"
    vgg_weights: str | None = None
    """VGG19 weights file; default $TORCH_HOME/hub/checkpoints/vgg19-dcbb9e9d.pth."""
    frame_window: int | None = None
    """Draw pair frames from the first N frames of a clip; None: the whole clip (500 with the official objective)."""
    train_split: str = "train"
    eval_split: str = "test"
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    grid_every: int = 100
    eval_every: int = 100
    eval_pairs: int = 8
    max_failures: int = 3
    """Worker-group restarts from the latest checkpoint before the run is given up."""
    seed: int = 0
    clip_cache_mb: int = 256
    """Decoded clips kept per worker (LRU, at model size)."""
    ray_address: str | None = None

    @property
    def per_worker_batch(self) -> int:
        return self.batch // self.workers

    @property
    def effective_frame_window(self) -> int | None:
        if self.frame_window is not None:
            return self.frame_window
        return OFFICIAL_FRAME_WINDOW if self.objective == "official" else None

    def with_absolute_paths(self) -> TrainSettings:
        """Local paths made absolute here, on the driver: workers run in their run folder, elsewhere."""
        from pipelines.storage import absolute_location

        return replace(self, **{name: absolute_location(getattr(self, name))
                                for name in ("data", "run_dir", "init", "vgg_weights")})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> TrainSettings:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in record.items() if key in known})


MODEL_SHAPING = ("size", "model_width", "objective")
"""Settings a resumed run must keep: they decide the networks and the objective in the checkpoint."""


def check_settings(settings: TrainSettings) -> TrainSettings:
    """Return `settings` if every value is usable, else raise ValueError naming the option and the fix."""
    s = settings
    _check(bool(_NAME.fullmatch(s.name)), "name", s.name,
           "must be letters, digits, '.', '_' and '-' (it names a folder)")
    _check(s.steps >= 1, "steps", s.steps, "must be at least 1")
    _check(s.size >= 16 and s.size & (s.size - 1) == 0, "size", s.size, "must be a power of two, at least 16")
    _check(s.model_width in MODEL_WIDTHS, "model_width", s.model_width, f"must be one of {MODEL_WIDTHS}")
    _check(s.objective in OBJECTIVES, "objective", s.objective, f"must be one of {OBJECTIVES}")
    _check(s.perceptual in PERCEPTUAL_MODES, "perceptual", s.perceptual, f"must be one of {PERCEPTUAL_MODES}")
    _check(s.workers >= 1, "workers", s.workers, "must be at least 1")
    _check(s.cpus_per_worker > 0, "cpus_per_worker", s.cpus_per_worker, "must be positive")
    _check(s.gpus_per_worker >= 0, "gpus_per_worker", s.gpus_per_worker, "must not be negative")
    _check(s.batch >= s.workers and s.batch % s.workers == 0, "batch", s.batch,
           f"must be a multiple of --workers ({s.workers}): each worker takes an equal share")
    _check(s.micro_batches >= 1 and s.per_worker_batch % s.micro_batches == 0, "micro_batches", s.micro_batches,
           f"must divide the per-worker batch ({s.per_worker_batch})")
    _check(s.frame_window is None or s.frame_window >= 1, "frame_window", s.frame_window, "must be at least 1")
    for name in ("checkpoint_every", "keep_checkpoints", "log_every", "grid_every", "eval_every", "eval_pairs",
                 "clip_cache_mb"):
        _check(getattr(s, name) >= 1, name, getattr(s, name), "must be at least 1")
    _check(s.max_failures >= 0, "max_failures", s.max_failures, "must not be negative")
    return settings


def _check(condition: bool, name: str, value: object, rule: str) -> None:
    if not condition:
        raise ValueError(f"{name.replace('_', '-')}: {value!r} {rule}")


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
