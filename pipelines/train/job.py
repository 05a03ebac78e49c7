"""The training job on the driver: check everything, start a Ray Train TorchTrainer, summarise.

Before any worker starts, `run_training` refuses what cannot work, with a message that names the
input and the fix: bad settings, a missing dataset or an empty split, a missing or mismatched
`--init` file, VGG weights demanded but absent, and a rerun whose model-shaping settings differ
from the run's checkpoints. Then it runs `loop.train_worker` on `--workers` Ray workers (gloo on
CPU, NCCL on GPU) with

* `RunConfig(name, storage_path=run_dir)`: the run folder; running the same name and run
  directory again resumes from the newest checkpoint (Ray Train 2.60 restores by name + path);
* `FailureConfig(max_failures)`: a dead worker restarts the group from the newest checkpoint;
* `CheckpointConfig(num_to_keep=keep_checkpoints)`.

On a cluster of several nodes a local `--run-dir` must be visible from every node
(`runtime.require_shared`): rank 0, which writes the run's files and checkpoints, and every rank
that restores one, may be on any node.

A stop asked of the command (SIGTERM, SIGINT: `runtime.request_stop`) reaches the workers as a file
in the run folder; they checkpoint the step they are at and return, and the summary says `stopped`.

While the workers train, a progress bar on the driver follows the run's progress file (worker
output need not reach the driver). The summary is read back from the run's files.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

from pipelines import runs
from pipelines.runtime import require_shared, stop_requested
from pipelines.storage import LocationNotVisible, OutputStore, portable_filesystem, store_environment
from pipelines.train.clips import Catalogue, TrainingDataError, load_catalogue
from pipelines.train.loop import NonFiniteTraining
from pipelines.train.model import ModelPlan, plan_model, read_init
from pipelines.train.outputs import STOP_REQUEST
from pipelines.train.settings import MODEL_SHAPING, TrainSettings

LOG = logging.getLogger(__name__)

PROGRESS_POLL_S = 2.0
STOP_POLL_S = 0.2


class RunRefused(ValueError):
    """A rerun whose settings cannot continue the existing run; the message lists the differences."""


def run_location(settings: TrainSettings) -> str:
    return f"{settings.run_dir.rstrip('/')}/{settings.name}"


PreparedRun = tuple[TrainSettings, ModelPlan, Catalogue, Catalogue, int]


def prepare_run(settings: TrainSettings) -> PreparedRun:
    """All checks that need no Ray: returns the settings, the model plan, the train and evaluation
    catalogues and the step to resume from. Settings come from `pipelines.options.build`, which made
    local paths absolute on this driver."""
    store = OutputStore(settings.run_dir)
    train = load_catalogue(settings.data, settings.train_split)
    try:
        evaluation = load_catalogue(settings.data, settings.eval_split)
    except TrainingDataError as error:
        LOG.warning("evaluating on training clips: %s", error)
        evaluation = train
    LOG.info("training data: %s; evaluation: %s", train.describe(), evaluation.describe())
    latest = runs.latest_checkpoint(settings.run_dir, settings.name)
    start = latest[0] if latest else 0
    if latest:
        _check_same_model(store, settings)
    plan = plan_model(settings)
    return settings, plan, train, evaluation, start


def _check_same_model(store: OutputStore, settings: TrainSettings) -> None:
    recorded = runs.read_json(store, f"{settings.name}/{runs.RUN_RECORD}", {}).get("settings", {})
    differences = [f"{name}: {recorded[name]!r} -> {getattr(settings, name)!r}"
                   for name in MODEL_SHAPING if name in recorded and recorded[name] != getattr(settings, name)]
    if differences:
        raise RunRefused(f"run {run_location(settings)} has checkpoints of another model or objective "
                         f"({'; '.join(differences)}); rerun with the run's settings to resume, or give a new --name")
    if recorded.get("workers") not in (None, settings.workers) or recorded.get("batch") not in (None, settings.batch):
        LOG.warning("resuming with %d workers and batch %d where the run had %s and %s: training continues, "
                    "but the pairs drawn from here on differ from an uninterrupted run", settings.workers,
                    settings.batch, recorded.get("workers"), recorded.get("batch"))


def _write_run_record(settings: TrainSettings, plan: ModelPlan, train: Catalogue, evaluation: Catalogue,
                      start: int) -> None:
    store = OutputStore(settings.run_dir)
    relpath = f"{settings.name}/{runs.RUN_RECORD}"
    record = runs.read_json(store, relpath, {})
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record.setdefault("created_at", now)
    record.update(settings=settings.to_dict(), model=plan.model.to_dict(), train_config=asdict(plan.train),
                  init_kind=plan.init_kind,
                  data={"train": train.describe(), "evaluation": evaluation.describe(),
                        "train_shards": list(train.shards)})
    record.setdefault("launches", []).append({"at": now, "from_step": start, "to_step": settings.steps,
                                              "workers": settings.workers})
    store.write_bytes_atomic(relpath, json.dumps(record, indent=1, sort_keys=True).encode())


def run_training(settings: TrainSettings, prepared: PreparedRun | None = None) -> dict[str, Any]:
    """Train (or resume) the run on the connected Ray and return its summary; raises on refused input
    or a failed run. `prepared`: what `prepare_run` returned for these settings, if already done."""
    settings, plan, train, evaluation, start = prepared or prepare_run(settings)
    location = run_location(settings)
    if stop_requested():  # asked to stop while the command was starting
        return summarise(settings, stopped=True)
    if start >= settings.steps:
        LOG.info("run %s is already at step %d (asked for %d): nothing to train; raise --steps to continue",
                 location, start, settings.steps)
        return summarise(settings)
    LOG.info("run %s: %s from step %d to %d on %d worker(s), %d pairs per step", location,
             "resuming" if start else "starting", start, settings.steps, settings.workers, settings.batch)
    # Every rank reads checkpoints from the run and rank 0 may land on any node: a local run folder must be
    # one that every node mounts (checked with a marker the driver writes; object stores pass).
    require_shared(settings.run_dir, "--run-dir", output=True)
    _write_run_record(settings, plan, train, evaluation, start)

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.train.loop import train_worker

    init_content = None
    if plan.init_kind is not None and start == 0:
        init_content = ray.put(read_init(settings.init))
    resources = {"CPU": settings.cpus_per_worker}
    if settings.gpus_per_worker:
        resources["GPU"] = settings.gpus_per_worker
    store = OutputStore(settings.run_dir)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"settings": settings, "plan": plan, "train_catalogue": train,
                           "eval_catalogue": evaluation, "init_content": init_content},
        scaling_config=ScalingConfig(num_workers=settings.workers, use_gpu=settings.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=settings.name, **_ray_train_storage(settings, store),
                             failure_config=FailureConfig(max_failures=settings.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=settings.keep_checkpoints),
                             worker_runtime_env=_worker_environment(settings)),
    )
    store.delete(f"{settings.name}/{STOP_REQUEST}", missing_ok=True)  # a stop asked of an earlier launch
    with _ProgressBar(store, settings, start):
        try:
            _fit_until_stopped(trainer, store, settings)
        except ray.train.WorkerGroupError as error:
            raise _input_problem(error) or error
    return summarise(settings, stopped=stop_requested())


def _fit_until_stopped(trainer, store: OutputStore, settings: TrainSettings) -> None:
    """`trainer.fit()` on a helper thread while this thread relays a stop request (`runtime.request_stop`,
    set by the command's SIGTERM/SIGINT handlers) to the workers as the run's stop file; rank 0 sees it at
    the next log step and every rank checkpoints and returns. This thread keeps waiting, so the command's
    handlers (not Ray Train's own SIGINT handler, which only the main thread installs) answer the signals."""
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as error:  # handed to the waiting thread
            failure.append(error)

    thread = threading.Thread(target=fit, name="train-fit", daemon=True)
    thread.start()
    relayed = False
    while thread.is_alive():
        thread.join(STOP_POLL_S)
        if stop_requested() and not relayed:
            store.write_bytes_atomic(f"{settings.name}/{STOP_REQUEST}", b"asked to stop by the driver\n")
            relayed = True
            LOG.warning("stop requested: the workers checkpoint at their next log step and stop")
    if failure:
        raise failure[0]


def _ray_train_storage(settings: TrainSettings, store: OutputStore) -> dict[str, Any]:
    """RunConfig's storage: a local folder, or the object store as a file system that carries the driver's
    endpoint and credentials (Ray Train's controller resolves its storage in a process of its own)."""
    if store.is_local:
        return {"storage_path": str(store.local_path())}
    filesystem, path = portable_filesystem(settings.run_dir)
    return {"storage_path": path, "storage_filesystem": filesystem}


def _worker_environment(settings: TrainSettings) -> dict | None:
    """The driver's object-store variables for every worker (a cluster's nodes were started before the
    user set them) when the data or the run lives in an object store."""
    return store_environment(settings.run_dir) or store_environment(settings.data)


def _input_problem(error: Exception) -> Exception | None:
    """A worker's error that is about the run's inputs (data it cannot see or use), to report as
    itself rather than as a crash of the worker group."""
    for failure in getattr(error, "worker_failures", {}).values():
        while failure is not None:
            if isinstance(failure, (TrainingDataError, LocationNotVisible, NonFiniteTraining)):
                return failure
            failure = failure.__cause__
    return None


def summarise(settings: TrainSettings, stopped: bool = False) -> dict[str, Any]:
    """The run's location, step (that of its newest checkpoint when it stopped before its end), throughput,
    last evaluation, skipped samples and newest checkpoint; `stopped`: the run was asked to stop."""
    store = OutputStore(settings.run_dir)
    final = runs.read_json(store, f"{settings.name}/{runs.FINAL_METRICS}", {})
    latest = runs.latest_checkpoint(settings.run_dir, settings.name)
    step = max(final.get("step", 0), latest[0] if latest else 0)  # metrics.json is written at the end only
    return {"run": run_location(settings), "step": step, "stopped": stopped and step < settings.steps,
            "steps": settings.steps, "pairs_per_s": final.get("pairs_per_s"),
            "last_evaluation": final.get("last_evaluation"), "losses": final.get("losses", {}),
            "skipped": final.get("skipped", {}),
            "checkpoint": f"{settings.run_dir.rstrip('/')}/{latest[1]}" if latest else None}


def summary_text(summary: dict[str, Any]) -> str:
    """The summary as the lines `portrait train` prints."""
    lines = [f"training run: {summary['run']}", f"  {'step':<30}{summary['step']} / {summary['steps']}"]
    if summary.get("pairs_per_s") is not None:
        lines.append(f"  {'pairs/s':<30}{summary['pairs_per_s']:.2f}")
    evaluation = summary.get("last_evaluation") or {}
    for name, value in evaluation.items():
        if name != "step":
            lines.append(f"  {'eval ' + name:<30}{value:.4g}")
    for name, count in (summary.get("skipped") or {}).items():
        lines.append(f"  {'skipped ' + name:<30}{count}")
    lines.append(f"  {'checkpoint':<30}{summary.get('checkpoint')}")
    if summary.get("stopped"):
        lines.append(f"  {'stopped':<30}asked to stop; the same command resumes")
    return "\n".join(lines)


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as the Prefect artifact of the `train_model` flow."""
    evaluation = summary.get("last_evaluation") or {}
    rows = [f"| {name} | {value:.4g} |" for name, value in evaluation.items() if name != "step"]
    pairs = summary.get("pairs_per_s")
    return "\n".join([
        f"# Training run `{summary['run']}`", "",
        f"* steps: {summary['step']} of {summary['steps']}",
        f"* samples/s (pairs per second, all workers): {pairs:.2f}" if pairs is not None else "* samples/s: -",
        f"* newest checkpoint: `{summary.get('checkpoint')}`",
        f"* skipped samples: {summary.get('skipped') or 'none'}", "",
        f"## Last evaluation (step {evaluation.get('step', '-')})", "", "| metric | value |", "|---|---|", *rows])


class _ProgressBar:
    """A tqdm bar on the driver that follows the run's progress file while `fit()` runs."""

    def __init__(self, store: OutputStore, settings: TrainSettings, start: int) -> None:
        self.store, self.settings, self.start = store, settings, start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="train-progress", daemon=True)

    def __enter__(self) -> _ProgressBar:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _follow(self) -> None:
        from tqdm import tqdm

        relpath = f"{self.settings.name}/{runs.PROGRESS}"
        with tqdm(total=self.settings.steps, initial=self.start, desc=f"train {self.settings.name}",
                  unit="step") as bar:
            while True:
                stopping = self._stop.wait(PROGRESS_POLL_S)
                progress = runs.read_json(self.store, relpath, {})
                if progress.get("step", 0) > bar.n:
                    values = progress.get("values", {})
                    bar.update(progress["step"] - bar.n)
                    bar.set_postfix(g=f"{values.get('g_total', float('nan')):.3f}",
                                    pairs_s=f"{values.get('pairs_per_s', 0.0):.2f}", refresh=False)
                if stopping:
                    return
