"""Executing the editing stages: a Ray Data job, or the same stages one after another in this process.

Ray Data pipeline (rows are jobs, then chunks of videos; never frames):

    jobs --analyse (CPU task: probe, track, plan chunks)--> chunks
         --crop (CPU task)--> --model (actor pool: one generator per actor, GPU or CPU threads)-->
         --paste + encode (CPU task)--> chunk results streamed back to the driver
    driver: when every chunk of a job is back, a Ray task joins its segments with the audio,
            checks the output and writes previews; the job's results row is recorded.

CPU stages and the model stage scale separately: `model_actors` actors (each holding a GPU when
the cluster has them) against as many CPU tasks as the cluster has cores.

Ray Data 2.60 defaults this is designed against (read from its source): any exception raised in
a UDF fails the whole dataset (`max_errored_blocks == 0`), and a task or actor whose process dies
is retried without limit. So every stage catches its own errors per chunk and passes a failed
chunk on as a status; and every stage asks an `AttemptLedger` actor before working on a chunk:
a chunk that was begun `max_chunk_attempts` times without finishing (its worker died each time:
killed, out of memory, a crash in native code) is recorded as `worker_failed` instead of being
run again, so one poisoned video cannot loop forever and the rest of the archive completes.
"""

from __future__ import annotations

import functools
import logging
import pickle
from typing import Callable, Iterable

import numpy as np
from tqdm import tqdm

from pipelines import errors
from pipelines.edit.analyse import analyse_job
from pipelines.edit.assemble import finish_job
from pipelines.edit.chunks import ChunkWork, JobWork
from pipelines.edit.compose import cached_detector, compose_chunk
from pipelines.edit.crops import crop_chunk
from pipelines.edit.results import ResultRow
from pipelines.edit.settings import EditSettings
from pipelines.edit.stage_io import from_columns, to_columns
from pipelines.errors import RecordedFailure
from pipelines.storage import OutputStore

LOG = logging.getLogger(__name__)


class AttemptLedger:
    """Counts, per stage and chunk, attempts that began and never finished (their worker died).

    A job one of whose chunks gave up is abandoned: its other chunks are recorded without being run,
    so a video that crashes every worker it touches costs `max_chunk_attempts` crashes, not that
    many per chunk.
    """

    def __init__(self) -> None:
        self._open: dict[str, int] = {}
        self._abandoned: dict[str, str] = {}

    def begin(self, key: str, job_id: str) -> tuple[int, str | None]:
        """Record an attempt at `key`: (earlier attempts that died unfinished, why the job was abandoned)."""
        if job_id in self._abandoned:
            return 0, self._abandoned[job_id]
        crashed = self._open.get(key, 0)
        self._open[key] = crashed + 1
        return crashed, None

    def end(self, key: str) -> None:
        self._open.pop(key, None)

    def abandon(self, job_id: str, reason: str) -> None:
        self._abandoned.setdefault(job_id, reason)


def _pack(items: Iterable[object]) -> dict[str, np.ndarray]:
    return to_columns(items)


def _unpack(batch: dict[str, np.ndarray]) -> list:
    return from_columns(batch)


def guarded(stage: str, chunk: ChunkWork, work: Callable[[ChunkWork], ChunkWork], ledger=None,
            max_attempts: int = 2) -> ChunkWork:
    """Run one stage on one chunk: errors become the chunk's recorded failure, crashes are bounded."""
    if not chunk.ok:
        return chunk
    key = f"{stage}/{chunk.job.job_id}/{chunk.index}"
    if ledger is not None:
        import ray

        crashed, abandoned = ray.get(ledger.begin.remote(key, chunk.job.job_id))
        if abandoned:
            return chunk.fail(errors.WORKER_FAILED, f"{chunk.label}: not run: {abandoned}")
        if crashed >= max_attempts:
            message = (f"{chunk.label}: the worker process died {crashed} times in the {stage} stage (killed, out "
                       "of memory, or a crash in native code); not tried again in this run")
            LOG.error(message)
            ledger.abandon.remote(chunk.job.job_id, message)
            return chunk.fail(errors.WORKER_FAILED, message)
    try:
        result = work(chunk)
    except RecordedFailure as error:
        result = chunk.fail(error.failure_class, f"{chunk.label}: {error.message}")
    except Exception as error:  # a bug or the machine: recorded, and retried by a rerun
        LOG.exception("%s: %s stage failed", chunk.label, stage)
        result = chunk.fail(errors.INTERNAL_ERROR, f"{chunk.label}: {stage} stage: {type(error).__name__}: {error}")
    if ledger is not None:
        ledger.end.remote(key)
    return result


def analyse_guarded(work: JobWork, settings: EditSettings, store: OutputStore, ledger=None) -> list[ChunkWork]:
    """The analysis stage for one job under the same guard (a job-level failure is one failed chunk)."""
    placeholder = ChunkWork(work, index=-1, total=0)
    produced: list[ChunkWork] = []

    def analyse(chunk: ChunkWork) -> ChunkWork:
        produced.extend(analyse_job(work, settings, cached_detector(settings.detector), store))
        return chunk

    outcome = guarded("analyse", placeholder, analyse, ledger, settings.max_chunk_attempts)
    if not outcome.ok:
        outcome.visited()
        return [outcome]
    return produced


def _analyse_batch(batch: dict[str, np.ndarray], settings: EditSettings, ledger) -> dict[str, np.ndarray]:
    _limit_threads()
    store = OutputStore(settings.output)
    return _pack(chunk for work in _unpack(batch) for chunk in analyse_guarded(work, settings, store, ledger))


def _crop_batch(batch: dict[str, np.ndarray], settings: EditSettings, ledger,
                crop: Callable[[ChunkWork, EditSettings], ChunkWork]) -> dict[str, np.ndarray]:
    _limit_threads()
    return _pack(guarded("crop", chunk, lambda c: crop(c, settings), ledger, settings.max_chunk_attempts)
                 for chunk in _unpack(batch))


def _compose_batch(batch: dict[str, np.ndarray], settings: EditSettings, ledger) -> dict[str, np.ndarray]:
    _limit_threads()
    store = OutputStore(settings.output)
    return _pack(guarded("paste", chunk, lambda c: compose_chunk(c, settings, store), ledger,
                         settings.max_chunk_attempts).slim() for chunk in _unpack(batch))


class _ModelStage:
    """One generator per actor, loaded once from the weights in the object store."""

    def __init__(self, settings: EditSettings, ledger, weights_ref: list) -> None:
        import ray

        from pipelines.edit.model import CropEditor

        self.settings, self.ledger = settings, ledger
        self.editor = CropEditor(ray.get(weights_ref[0]), settings.precision, settings.model_batch,
                                 threads=max(1, int(settings.model_cpus)))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipelines.edit.model import edit_chunk

        return _pack(guarded("model", chunk, lambda c: edit_chunk(c, self.editor), self.ledger,
                             self.settings.max_chunk_attempts) for chunk in _unpack(batch))


def _task_retries(retries: int) -> dict:
    """Remote arguments of the CPU stages' tasks (a function: Ray Data takes `max_retries` only this way)."""
    return {"max_retries": retries}


def _limit_threads() -> None:
    """CPU stages run one per core: keep OpenCV from spawning a thread per core in each of them."""
    import cv2

    cv2.setNumThreads(1)


def _model_gpus(settings: EditSettings) -> float:
    if settings.model_gpus >= 0:
        return settings.model_gpus
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


class JobCollector:
    """Gathers chunk results per job on the driver and finishes each job once all its chunks are back."""

    def __init__(self, finish: Callable[[list[ChunkWork]], object]) -> None:
        self.finish = finish
        self.groups: dict[str, list[ChunkWork]] = {}

    def add(self, chunk: ChunkWork) -> object | None:
        """Add a chunk; returns what `finish` returned when this completed its job."""
        group = self.groups.setdefault(chunk.job.job_id, [])
        group.append(chunk)
        if chunk.index == -1 or len(group) == chunk.total:
            del self.groups[chunk.job.job_id]
            return self.finish(group)
        return None


def run_local(works: list[JobWork], weights, settings: EditSettings, model: str,
              record: Callable[[ResultRow], None]) -> None:
    """Every stage in this process, one chunk at a time (bounded memory, no parallelism)."""
    from pipelines.edit.model import CropEditor, edit_chunk

    store = OutputStore(settings.output)
    editor = CropEditor(weights, settings.precision, settings.model_batch, threads=max(1, int(settings.model_cpus)))
    with tqdm(total=len(works), desc="edit", unit="video") as progress:
        for work in works:
            done = []
            for chunk in analyse_guarded(work, settings, store):
                chunk = guarded("crop", chunk, lambda c: crop_chunk(c, settings))
                chunk = guarded("model", chunk, lambda c: edit_chunk(c, editor))
                chunk = guarded("paste", chunk, lambda c: compose_chunk(c, settings, store))
                done.append(chunk.slim())
            record(_finish_guarded(done, settings, store, model))
            progress.update(1)


def _finish_guarded(chunks: list[ChunkWork], settings: EditSettings, store: OutputStore, model: str) -> ResultRow:
    try:
        return finish_job(chunks, settings, store, model)
    except Exception as error:  # a bug: the job is recorded as failed, the run goes on
        LOG.exception("%s: finishing failed", chunks[0].job.source)
        failed = chunks[0].fail(errors.INTERNAL_ERROR, f"{chunks[0].job.source}: joining the output failed: "
                                                       f"{type(error).__name__}: {error}")
        return finish_job([failed], settings, store, model)


def run_ray(works: list[JobWork], weights, settings: EditSettings, model: str, record: Callable[[ResultRow], None],
            crop: Callable[[ChunkWork, EditSettings], ChunkWork] = crop_chunk) -> None:
    """The Ray Data job (see the module docstring); `record` receives each job's results row.

    `crop` is the crop stage's per-chunk function (tests swap in one that kills its worker).
    """
    import ray
    from ray.data import ActorPoolStrategy

    store = OutputStore(settings.output)
    ledger = ray.remote(num_cpus=0)(AttemptLedger).remote()
    weights_ref = [ray.put(weights)]
    gpus = _model_gpus(settings)
    model_resources = {"num_gpus": gpus} if gpus else {}
    dataset = ray.data.from_items([{"payload": pickle.dumps(w, protocol=5)} for w in works],
                                  override_num_blocks=max(1, len(works)))
    common = dict(batch_size=1, batch_format="numpy", zero_copy_batch=True)
    # CPU tasks: enough retries after worker deaths for the ledger to turn the last one into a record,
    # still bounded if a process dies outside a guarded stage. (Differing from the model stage's
    # arguments, this also keeps Ray Data from fusing the crop stage into the model actors on CPU-only
    # clusters, where their resources would be equal, so CPU work would run inside the model pool.)
    cpu = dict(num_cpus=1, ray_remote_args_fn=functools.partial(_task_retries, 4 * settings.max_chunk_attempts),
               **common)
    stage_args = {"settings": settings, "ledger": ledger}
    dataset = dataset.map_batches(_analyse_batch, fn_kwargs=stage_args, **cpu)
    dataset = dataset.map_batches(_crop_batch, fn_kwargs={**stage_args, "crop": crop}, **cpu)
    dataset = dataset.map_batches(_ModelStage, fn_constructor_args=(settings, ledger, weights_ref),
                                  compute=ActorPoolStrategy(size=settings.model_actors),
                                  num_cpus=settings.model_cpus, **model_resources, **common)
    dataset = dataset.map_batches(_compose_batch, fn_kwargs=stage_args, **cpu)

    finisher = ray.remote(num_cpus=1, max_retries=1)(_finish_guarded)
    in_flight: dict = {}

    def finish(chunks: list[ChunkWork]):
        in_flight[finisher.remote(chunks, settings, store, model)] = chunks[0]
        return None

    collector = JobCollector(finish)

    def collect(wait: bool, progress: tqdm) -> None:
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=len(in_flight) if wait else 1, timeout=None if wait else 0)
            if not ready:
                return
            for ref in ready:
                chunk = in_flight.pop(ref)
                try:
                    row = ray.get(ref)
                except Exception as error:  # the finishing worker died twice
                    row = finish_job([chunk.fail(errors.WORKER_FAILED, f"{chunk.job.source}: joining the output: "
                                                                       f"{type(error).__name__}: {error}")],
                                     settings, store, model)
                record(row)
                progress.update(1)

    with tqdm(total=len(works), desc="edit", unit="video") as progress:
        for batch in dataset.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=1):
            for chunk in _unpack(batch):
                collector.add(chunk)
                progress.set_postfix_str(f"{chunk.job.source.rsplit('/', 1)[-1]} chunk "
                                         f"{chunk.index + 1}/{max(chunk.total, 1)}")
            collect(False, progress)
        collect(True, progress)
    if collector.groups:
        raise RuntimeError(f"chunks of {len(collector.groups)} job(s) never all came back: "
                           f"{sorted(collector.groups)[:5]}")
