"""The loop every Ray Train worker runs: draw this rank's pairs, take a `dpe.train_step`, report.

All ranks start from the same weights (same seed, same initialisation file or checkpoint) and
`train_step` averages gradients across them, so the weights stay identical; each rank draws its
own pairs (`pairs.PairSampler`), prepared ahead of the step by its loader processes
(`pairs.PairLoader`, `--loader-workers`). Every rank runs the same steps and meets the others at the
same collective calls: the gradient all-reduce inside the step, a gather of the interval's
losses and skipped samples every `log_every` steps, and `ray.train.report` at each checkpoint
(a barrier). Rank 0 alone writes the run's files (`outputs.RunOutputs`), grids and evaluations
(of the moving-average generator when `--ema-decay` keeps one); grids and evaluations are made on a
copy of the weights by a helper thread (`BackgroundVisuals`), so no rank waits for them.

Stop: when the driver is asked to stop (`job.run_training`), rank 0 sees its request at the next log
step and every rank checkpoints that step and returns (a rerun resumes from it).

Safety: a step with a non-finite loss or gradient on any rank is skipped by every rank
(`dpe.train_step`); `SkipGuard` logs each and stops the run after `--max-skipped-steps` in a row,
and a checkpoint holding a non-finite value is refused. Checkpoints come every `--checkpoint-every`
steps, or at the first log step `--checkpoint-minutes` after the last (rank 0's clock, shared in
the log gather, decides for all); rank 0 stages the file once and Ray Train uploads it
asynchronously while the ranks train on. After a restore, rank 0's weights are broadcast.

Resume is exact: a checkpoint holds the weights, the three optimisers, the step and each
rank's probe statistics (the only state that differs between ranks); the pairs of a step
depend only on (seed, rank, step), and torch is re-seeded from the same triple before every
step. So N steps in one go and N/2 + resume + N/2 give the same weights and the same data.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipelines import runs
from pipelines.dataset.layout import SHARD_INDEX_PATH
from pipelines.storage import require_visible
from pipelines.train import checkpoints
from pipelines.train.clips import Catalogue, ClipReader
from pipelines.train.model import ModelPlan, apply_init, build_state
from pipelines.train.pairs import PairLoader, fixed_pairs
from pipelines.train.settings import TrainSettings

LOG = logging.getLogger(__name__)


class NonFiniteTraining(RuntimeError):
    """Too many steps in a row with non-finite losses or gradients (`--max-skipped-steps`)."""

TRAIN_PAIRS_FOR_EVALUATION = 8
"""Fixed training pairs whose self-reconstruction L1 is tracked (the proof that the loop trains)."""


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of one step on one rank (reproducible on resume)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`; `config` is what `job.run_training` passes."""
    import ray.train
    import ray.train.torch
    import torch

    from dpe.distributed import broadcast_from_first
    from dpe.train_step import train_step

    settings: TrainSettings = config["settings"]
    require_visible(settings.data, SHARD_INDEX_PATH, "--data")
    plan: ModelPlan = config["plan"]
    train_catalogue: Catalogue = config["train_catalogue"]
    eval_catalogue: Catalogue = config["eval_catalogue"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(settings.cpus_per_worker)))
    else:  # TF32 matmuls and convolutions: float32 weights, tensor-core speed
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(settings.seed)
    state = build_state(plan, device)
    start = _restore_or_initialise(state, ray.train.get_checkpoint(), plan, config.get("init_content"), rank)
    broadcast_from_first(_shared_tensors(state))
    loader = PairLoader(train_catalogue, {"data": settings.data, "size": settings.size,
                                          "frame_window": settings.effective_frame_window,
                                          "cache_bytes": settings.clip_cache_mb << 20},
                        seed=settings.seed, rank=rank, count=settings.per_worker_batch, start=start,
                        end=settings.steps, workers=settings.loader_workers, device=device)
    LOG.info("rank %d/%d on %s: steps %d..%d, %d pairs per step, data %s", rank, world_size, device, start,
             settings.steps, settings.per_worker_batch, train_catalogue.describe())

    outputs = visuals = None
    if rank == 0:
        from pipelines.train.evaluation import Evaluator
        from pipelines.train.outputs import RunOutputs

        outputs = RunOutputs(settings.run_dir, settings.name, settings.steps, start, world_size)
        eval_reader = ClipReader(settings.data, settings.size, cache_bytes=settings.clip_cache_mb << 20)
        evaluator = Evaluator(fixed_pairs(eval_catalogue, eval_reader, settings.eval_pairs, settings.seed),
                              fixed_pairs(train_catalogue, eval_reader, TRAIN_PAIRS_FOR_EVALUATION, settings.seed))
        visuals = BackgroundVisuals(outputs, evaluator, state.model_config, device)
        if start == 0:
            visuals.submit(state.evaluated_generator(), 0, grid=True, evaluate=True)

    interval = _Interval()
    guard = SkipGuard(settings.max_skipped_steps)
    upload = checkpoints.upload_checkpoint(settings.run_dir, settings.name,
                                           context.get_storage().storage_filesystem)
    schedule = CheckpointSchedule(settings)
    batches = iter(loader)
    stop = False
    for step in range(start, settings.steps):
        began = time.perf_counter()
        loaded_step, batch = next(batches)
        assert loaded_step == step, f"the loader gave step {loaded_step} for step {step}"
        loaded = time.perf_counter()
        torch.manual_seed(step_seed(settings.seed, rank, step))
        logs = train_step(state, batch)
        guard.record(step, bool(logs["skipped"]))
        interval.add(logs, loaded - began, time.perf_counter() - began)
        done = step + 1
        last = done == settings.steps
        overdue = False
        if schedule.is_log_step(done):
            gathered = _gather({"losses": interval.means(), "skipped": dict(loader.skipped),
                                "overdue": schedule.overdue(), "stop": outputs is not None and outputs.stop_requested()},
                               world_size)
            overdue, stop = gathered[0]["overdue"], gathered[0]["stop"]  # rank 0's clock and view decide for all
            if outputs is not None:
                _log(outputs, state, settings, done, interval, gathered)
            interval = _Interval()
        if visuals is not None:
            visuals.collect()
            visuals.submit(state.evaluated_generator(), done, grid=done % settings.grid_every == 0 or last,
                           evaluate=done % settings.eval_every == 0 or last)
        if schedule.due(done, overdue) or stop:
            _checkpoint(state, settings, plan, done, rank, world_size, upload, outputs)
            schedule.checkpointed()
        if stop:
            LOG.warning("rank %d: stop requested: stopped after step %d, checkpointed", rank, done)
            break
    if visuals is not None:
        visuals.close()
        if not stop:
            outputs.finish(settings.steps)


def _restore_or_initialise(state, checkpoint, plan: ModelPlan, init_content: Any, rank: int) -> int:
    """Load the latest checkpoint (returns its step), or the --init file for a new run (returns 0)."""
    import ray

    from dpe.checkpoint import load_checkpoint

    if checkpoint is not None:
        models, optimizers = state.modules(), state.optimizers()
        optional = {"generator_ema": models.pop("generator_ema", None),
                    "grad_scaler": optimizers.pop("grad_scaler", None)}
        with checkpoint.as_directory() as folder:
            payload = load_checkpoint(Path(folder) / runs.CHECKPOINT_FILE, models=models, optimizers=optimizers)
        # An average or a scaler the run did not have before (--ema-decay or float16 added on resume) starts afresh.
        if optional["generator_ema"] is not None:
            optional["generator_ema"].load_state_dict(payload["models"].get("generator_ema",
                                                                            state.generator.state_dict()))
        if optional["grad_scaler"] is not None and "grad_scaler" in payload["optimizers"]:
            optional["grad_scaler"].load_state_dict(payload["optimizers"]["grad_scaler"])
        _restore_probe_statistics(state.probes, payload["extra"].get("probe_statistics", []), rank)
        state.step = int(payload["step"])
        LOG.info("rank %d resumed from %s at step %d", rank, checkpoint.path, state.step)
        return state.step
    if plan.init_kind is not None:
        content = ray.get(init_content) if isinstance(init_content, ray.ObjectRef) else init_content
        loaded = apply_init(state, plan.init_kind, content)
        LOG.info("rank %d initialised %s from the %s file", rank, ", ".join(loaded), plan.init_kind)
    return 0


def _shared_tensors(state) -> list:
    """What every rank must hold identically: weights and buffers of the networks and of the average,
    the probes' weights (their running statistics are each rank's own)."""
    modules = [state.generator, state.discriminator,
               *([state.generator_ema] if state.generator_ema is not None else [])]
    return [*(t for m in modules for t in (*m.parameters(), *m.buffers())), *state.probes.parameters()]


class CheckpointSchedule:
    """When a checkpoint is due: every `--checkpoint-every` steps, at the run's last step, and with
    `--checkpoint-minutes` at the first log step that many minutes after the last checkpoint (or the
    start). The time rule is read on rank 0's clock, which travels in the log gather (`overdue`), so
    every rank decides alike; `clock` is injectable for tests."""

    def __init__(self, settings: TrainSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.every, self.minutes = settings.checkpoint_every, settings.checkpoint_minutes
        self.steps, self.log_every = settings.steps, settings.log_every
        self.clock = clock
        self.last = clock()

    def is_log_step(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.steps

    def overdue(self) -> bool:
        """Whether this rank's clock says the time rule is due."""
        return self.minutes is not None and self.clock() - self.last >= 60 * self.minutes

    def due(self, step: int, rank0_overdue: bool) -> bool:
        """Whether `step` (finished steps) ends with a checkpoint, given rank 0's `overdue` at this log step."""
        return step % self.every == 0 or step == self.steps or (self.is_log_step(step) and rank0_overdue)

    def checkpointed(self) -> None:
        self.last = self.clock()


class SkipGuard:
    """Counts steps skipped in a row for non-finite losses or gradients; stops the run after `limit`.

    Each skip is logged with its step; the error says what to look at. All ranks skip the same
    steps (`dpe.train_step` decides on values reduced across workers), so all stop together.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.total = 0

    def record(self, step: int, skipped: bool) -> None:
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        LOG.warning("step %d skipped: non-finite loss or gradient (%d in a row, %d in this run's session)",
                    step, self.in_a_row, self.total)
        if self.in_a_row >= self.limit:
            raise NonFiniteTraining(f"{self.in_a_row} steps in a row (up to step {step}) had non-finite losses or "
                                    f"gradients; the last checkpoint holds finite weights. Lower the learning rate, "
                                    f"give --grad-clip, or check the data of these steps (--max-skipped-steps "
                                    f"{self.limit})")


def _probe_statistics(probes) -> dict[str, list]:
    return {name: buffer.tolist() for name, buffer in probes.named_buffers()}


def _restore_probe_statistics(probes, saved: list[dict[str, list]], rank: int) -> None:
    """Each rank's own running target statistics (rank 0's when the run had fewer ranks before)."""
    import torch

    if not saved:
        return
    statistics = saved[rank] if rank < len(saved) else saved[0]
    for name, buffer in probes.named_buffers():
        buffer.copy_(torch.tensor(statistics[name], dtype=buffer.dtype))


class _Interval:
    """Losses and timings of the steps since the last log: `step_s` sums the steps themselves (pairs
    drawn + `train_step`), the wall time since `began` also holds logging, grids, evaluations and
    checkpoints. Losses stay on the device as running sums, read once by `means`."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.steps = 0
        self.skipped = 0
        self.data_s = 0.0
        self.step_s = 0.0
        self.began = time.perf_counter()

    def add(self, logs: dict[str, Any], data_s: float, step_s: float) -> None:
        self.steps += 1
        self.data_s += data_s
        self.step_s += step_s
        if bool(logs["skipped"]):  # a CPU value: reading it costs no wait; its losses are not averaged in
            self.skipped += 1
            return
        for name, value in logs.items():
            if name in ("skipped", "overflow"):
                continue
            self.sums[name] = self.sums[name] + value if name in self.sums else value
            self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        import torch

        names = list(self.sums)
        values = torch.stack([self.sums[name].float() for name in names]).tolist() if names else []
        means = {name: total / self.counts[name] for name, total in zip(names, values)}
        return {**means, "skipped_steps": float(self.skipped)}


def _gather(local: dict[str, Any], world_size: int) -> list[dict[str, Any]]:
    """Every rank's `local` (a collective: all ranks call it at the same steps)."""
    import torch.distributed as dist

    if world_size == 1 or not dist.is_initialized():
        return [local]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, local)
    return gathered


def _log(outputs, state, settings: TrainSettings, step: int, interval: _Interval, gathered: list[dict]) -> None:
    names = sorted({name for part in gathered for name in part["losses"]})
    losses = {name: float(np.mean([p["losses"][name] for p in gathered if name in p["losses"]])) for name in names}
    wall = time.perf_counter() - interval.began
    pairs = settings.batch * interval.steps
    values = {**losses, "pairs_per_s": pairs / max(interval.step_s, 1e-9), "pairs_per_s_wall": pairs / max(wall, 1e-9),
              "data_fraction": interval.data_s / max(interval.step_s, 1e-9),
              **{f"lr_{name}": optimizer.param_groups[0]["lr"] for name, optimizer in state.optimizers().items()}}
    eta_s = (settings.steps - step) * wall / interval.steps if interval.steps else None
    outputs.log(step, values, eta_s)
    for part in gathered:
        outputs.skip(part["skipped"])
    LOG.info("step %d/%d (%.0f%%) g_total %.4f d_gan %.4f | %.2f pairs/s | ETA %s", step, settings.steps,
             100 * step / settings.steps, losses.get("g_total", float("nan")), losses.get("d_gan", float("nan")),
             values["pairs_per_s"], _duration(eta_s))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class BackgroundVisuals:
    """Rank 0's grids and evaluations, made on a copy of the evaluated generator by a helper thread.

    They used to run between steps while every other rank waited at the next collective; now rank 0
    copies the weights (one `load_state_dict`), hands the work to the thread and trains on. The copy
    is an uncompiled generator of the same configuration, so the numbers are those of evaluating the
    generator itself at that step. Results are written by the training thread (`collect`, between
    steps), so `RunOutputs` is never used from two threads; a new request first waits for the one
    before (evaluations come every `--eval-every` steps, far apart), and `close` waits for the last.
    """

    def __init__(self, outputs, evaluator, model_config, device) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import torch

        from dpe.model import DPEGenerator

        self.outputs, self.evaluator = outputs, evaluator
        self.copy = DPEGenerator(model_config).to(device).requires_grad_(False)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evaluation")
        self.pending = None
        # On a GPU the copy is evaluated on a stream of its own, beside the training kernels.
        self.stream = torch.cuda.Stream(device) if torch.device(device).type == "cuda" else None

    def submit(self, generator, step: int, *, grid: bool, evaluate: bool) -> None:
        if not (grid or evaluate):
            return
        import torch

        self.collect(wait=True)
        with torch.no_grad():
            self.copy.load_state_dict(generator.state_dict())
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))  # the copy is complete
        self.pending = self.executor.submit(self._run, step, grid, evaluate)

    def _run(self, step: int, grid: bool, evaluate: bool) -> tuple[int, bytes | None, dict | None]:
        import contextlib

        import torch

        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            return _visuals(self.evaluator, self.copy, step, grid, evaluate)

    def collect(self, wait: bool = False) -> None:
        """Write the finished request's grid and evaluation (waiting for it with `wait`)."""
        if self.pending is None or not (wait or self.pending.done()):
            return
        step, png, metrics = self.pending.result()
        self.pending = None
        if png is not None:
            self.outputs.grid(step, png)
        if metrics is not None:
            self.outputs.evaluation(step, metrics)

    def close(self) -> None:
        self.collect(wait=True)
        self.executor.shutdown()


def _visuals(evaluator, generator, step: int, grid: bool, evaluate: bool) -> tuple[int, bytes | None, dict | None]:
    from pipelines.train.evaluation import grid_png, transfers

    images = transfers(generator, evaluator.pairs) if evaluator.pairs else None
    png = grid_png(images) if grid and images is not None else None
    return step, png, evaluator.evaluate(generator, images) if evaluate else None


def _checkpoint(state, settings: TrainSettings, plan: ModelPlan, step: int, rank: int, world_size: int,
                upload, outputs) -> None:
    """Save and report a checkpoint (rank 0 writes it; every rank reports, as Ray Train requires)."""
    import ray.train
    from ray.train import CheckpointUploadMode

    from dpe.checkpoint import save_checkpoint

    statistics = [part["probes"] for part in _gather({"probes": _probe_statistics(state.probes)}, world_size)]
    metrics = {"step": step}
    dir_name = runs.checkpoint_dir_name(step)
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    extra = {"train_config": asdict(state.train_config), "settings": settings.to_dict(),
             "sampler": {"seed": settings.seed, "world_size": world_size, "pairs_per_rank": settings.per_worker_batch,
                         "next_step": step, "frame_window": settings.effective_frame_window},
             "probe_statistics": statistics, "data": {"uri": settings.data, "split": settings.train_split},
             "init": {"file": settings.init, "kind": plan.init_kind}}
    nonfinite = nonfinite_values(state)
    if nonfinite:  # cannot happen while train_step skips non-finite updates: refuse rather than save
        raise NonFiniteTraining(f"refusing to checkpoint step {step}: non-finite values in {', '.join(nonfinite[:5])}")
    # Staged without fsync in a folder Ray deletes after the upload; the upload (atomic, in the run) goes on
    # in the background while every rank trains on.
    folder = tempfile.mkdtemp(prefix="checkpoint-")
    save_checkpoint(Path(folder) / runs.CHECKPOINT_FILE, models=state.modules(), optimizers=state.optimizers(),
                    step=step, config=state.model_config, extra=extra, durable=False)
    # the rows up to this step reach the run folder before the checkpoint can be registered: a node lost
    # between the two would otherwise leave a registered checkpoint whose logged rows were never uploaded
    outputs.checkpointed()
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=dir_name,
                     checkpoint_upload_fn=upload, checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                     delete_local_checkpoint_after_upload=True)
    LOG.info("checkpoint %s staged; uploading in the background", dir_name)


def nonfinite_values(state) -> list[str]:
    """Names of the checkpoint's tensors that hold a NaN or an infinity (one wait for the device)."""
    import torch

    named = list(_checkpoint_tensors(state))
    finite = torch.stack([tensor.isfinite().all().cpu() for _, tensor in named]).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


def _checkpoint_tensors(state):
    """(name, tensor) of every floating-point tensor a checkpoint holds (weights, buffers, optimiser moments)."""
    for owner, module in state.modules().items():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                yield f"{owner}.{name}", tensor
    for owner, optimizer in state.optimizers().items():
        for index, values in optimizer.state_dict().get("state", {}).items():
            for key, value in values.items():
                if hasattr(value, "is_floating_point") and value.is_floating_point():
                    yield f"{owner}.state.{index}.{key}", value
