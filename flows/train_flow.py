"""The `train_model` Prefect flow: orchestration only, the work lives in `pipelines.train.job`.

Its parameters are the options of `portrait train` (`TrainSettings`, one field each; plain values
shown as a form in Prefect's UI, so a deployment can start or resume a run). The training itself
runs on Ray Train, which restarts failed workers from the newest checkpoint; the Prefect task is
therefore not retried. Its summary artifact records the run's location, steps, samples/s and last
evaluation. The first SIGTERM or SIGINT asks the workers to checkpoint the step they are at and stop
(`flows.services.stop_on_signals`); the summary then says `stopped`, and the same command resumes.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.services import stop_on_signals, take_over
from pipelines.options import build
from pipelines.runtime import clear_stop, ensure_ray
from pipelines.train.job import run_training, summary_markdown, summary_text
from pipelines.train.settings import TrainSettings

_DEFAULTS = TrainSettings()


@task(name="train")
def train_task(settings: TrainSettings) -> dict:
    """Start or resume the Ray Train run; returns its summary."""
    return run_training(settings, take_over(settings))


@flow(name="train_model", log_prints=True)
def train_model(
    data: str = _DEFAULTS.data,
    run_dir: str = _DEFAULTS.run_dir,
    name: str = _DEFAULTS.name,
    train_split: str = _DEFAULTS.train_split,
    eval_split: str = _DEFAULTS.eval_split,
    frame_window: int | None = _DEFAULTS.frame_window,
    clip_cache_mb: int = _DEFAULTS.clip_cache_mb,
    loader_workers: int = _DEFAULTS.loader_workers,
    steps: int = _DEFAULTS.steps,
    size: int = _DEFAULTS.size,
    model_width: str = _DEFAULTS.model_width,
    batch: int | None = None,
    micro_batches: int = _DEFAULTS.micro_batches,
    bf16: bool = _DEFAULTS.bf16,
    grad_clip: float | None = _DEFAULTS.grad_clip,
    ema_decay: float | None = _DEFAULTS.ema_decay,
    compile: bool = _DEFAULTS.compile,
    max_skipped_steps: int = _DEFAULTS.max_skipped_steps,
    objective: str = _DEFAULTS.objective,
    init: str | None = _DEFAULTS.init,
    perceptual: str = _DEFAULTS.perceptual,
    vgg_weights: str | None = _DEFAULTS.vgg_weights,
    gan_start: int = _DEFAULTS.gan_start,
    sharpness: float | None = _DEFAULTS.sharpness,
    face_focus: float = _DEFAULTS.face_focus,
    flow_warmup: int = _DEFAULTS.flow_warmup,
    to_rgb_lr_mul: float = _DEFAULTS.to_rgb_lr_mul,
    lr_decay: float = _DEFAULTS.lr_decay,
    seed: int = _DEFAULTS.seed,
    workers: int = _DEFAULTS.workers,
    cpus_per_worker: float = _DEFAULTS.cpus_per_worker,
    gpus_per_worker: float = _DEFAULTS.gpus_per_worker,
    max_failures: int = _DEFAULTS.max_failures,
    ray_address: str | None = _DEFAULTS.ray_address,
    checkpoint_every: int = _DEFAULTS.checkpoint_every,
    checkpoint_minutes: float | None = _DEFAULTS.checkpoint_minutes,
    keep_checkpoints: int = _DEFAULTS.keep_checkpoints,
    log_every: int = _DEFAULTS.log_every,
    grid_every: int = _DEFAULTS.grid_every,
    eval_every: int = _DEFAULTS.eval_every,
    eval_pairs: int = _DEFAULTS.eval_pairs,
) -> dict:
    """Train DPE on a dataset prepared by `portrait prepare` (resumes when the run exists).

    `data` is the dataset folder or URI, the run is `<run_dir>/<name>`; the other parameters are
    those of `portrait train --help`. Returns the summary (run, step, pairs/s, last evaluation,
    skipped samples, newest checkpoint).
    """
    settings = build(TrainSettings, locals())
    clear_stop()  # a stop asked of an earlier run in this process is not this run's
    ensure_ray(settings.ray_address)  # on the flow's main thread, not inside the task's thread
    with stop_on_signals("train"):
        summary = train_task(settings)
    create_markdown_artifact(key="train-model-summary", markdown=summary_markdown(summary),
                             description=f"Training run {summary['run']}")
    print(summary_text(summary))
    return summary
