"""Executing the editing stages: a Ray Data job, or the same stages one after another in this process.

Ray Data pipeline (rows are jobs, then bundles of chunks of videos; never frames):

    the plan, window by window as it is planned (`WorkFeed`: a thread of the driver plans and hands each
    window, split into groups of jobs, to a queue actor) --read task on the driver's node: a group per block-->
         --analyse (CPU task: probe, track, plan chunks; chunks packed into bundles, one block each)-->
         --crop (CPU task)--> --model (actor pool: one generator per actor, GPU or CPU threads)-->
         --paste + encode (CPU task)--> bundles streamed back to the driver
    driver: when every chunk of a job is back, a Ray task joins its segments with the audio,
            checks the output and writes previews (several jobs per task, at most one task per CPU
            of the cluster in flight: the driver stops pulling chunks meanwhile); the job's results
            row is recorded.

Planning streams into the run, so the first jobs start as soon as their window is planned, whatever the
archive's size; at most `WINDOWS_AHEAD` windows wait, so planning goes no faster than the run takes work.
Blocks are sized by work, not by job (`block_sizes`, from the jobs planned so far): Ray Data's
driver-side scheduling costs a few ms per block and stage, more than a short video's work. A small
run (few jobs per CPU) has one job
per analysis block and one chunk per bundle, so it spreads over the whole cluster; a long queue has
several jobs per analysis task and short chunks packed into bundles of about one chunk's worth of
frames (`chunks.bundle_chunks`), while a full chunk of a long video is still a bundle of its own.
Every stage's output block is one row (a group of jobs, then a bundle), so a window's jobs and a
long video's chunks spread over many tasks from the start, as they stream (no barrier). CPU stages and the model stage scale separately: an
actor pool that, with GPUs, grows from one actor to one per GPU share of the cluster as work waits
(`model_pool`), against as many CPU tasks as the cluster has cores; on a cluster too small for one
task of every stage at once the CPU stages ask for a share of a CPU (`stage_cpus`), since Ray Data
reserves each stage's minimum upstream first and would otherwise hold the later stages back until
analysis had drained the queue (the first result would wait for nearly all the work); the crop stage
asks for a hair less than the others (`crop_cpus`), or Ray Data would fuse it into the analysis task
or the model actors. A stop request (`runtime.request_stop`, from the command's signal handlers)
stops planning and pulling chunks: the dataset's
execution is shut down, the jobs being joined are recorded, and the rest waits for a rerun.

Ray Data 2.60 defaults this is designed against (read from its source): any exception raised in
a UDF fails the whole dataset (`max_errored_blocks == 0`), and a task or actor whose process dies
is retried without limit. So every stage catches its own errors per chunk and passes a failed
chunk on as a status; and every stage asks an `AttemptLedger` actor before working on a chunk:
a chunk that was begun `max_chunk_attempts` times without finishing (its worker died each time:
killed, out of memory, a crash in native code) is recorded as `worker_failed` instead of being
run again, so one poisoned video cannot loop forever and the rest of the archive completes. The
ledger lives on the driver's node (the head of a cluster) and is restarted if its process dies, so
losing a worker node never fails the run (its counts start afresh: at worst a chunk gets its
attempts again). The ledger is also the only bound on a CPU task's retries after worker deaths (Ray
Data 2.60 deprecates per-stage `max_retries`): a process that dies outside a guarded stage is retried
without limit. The read task and the queue it takes from live on the driver's node too; the run
checks that every job handed to the dataset came back.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from pipelines import errors
from pipelines.edit.analyse import analyse_job
from pipelines.edit.assemble import finish_job
from pipelines.edit.chunks import ChunkBundle, ChunkWork, JobGroup, JobWork, bundle_chunks
from pipelines.edit.compose import cached_detector, compose_chunk
from pipelines.edit.crops import crop_chunk
from pipelines.edit.results import ResultRow
from pipelines.edit.settings import EditSettings
from pipelines.edit.stage_io import from_columns, payload_table, to_columns
from pipelines.errors import RecordedFailure
from pipelines.runtime import stop_requested
from pipelines.storage import OutputStore, store_environment

if TYPE_CHECKING:
    from ray.data import ActorPoolStrategy

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


def _chunks(batch: dict[str, np.ndarray]) -> list[ChunkWork]:
    """Every chunk of a batch of bundles."""
    return [chunk for bundle in _unpack(batch) for chunk in bundle.unbundle()]


def _each_chunk(batch: dict[str, np.ndarray], stage: Callable[[ChunkWork], ChunkWork]) -> dict[str, np.ndarray]:
    """A batch of bundles with `stage` applied to each chunk, bundled as they came."""
    return _pack(ChunkBundle.of([stage(chunk) for chunk in bundle.unbundle()]) for bundle in _unpack(batch))


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
    """Groups of jobs in, their chunks out in bundles of about each group's `bundle_frames` frames of work."""
    _limit_threads()
    store = OutputStore(settings.output)
    return _pack(bundle for group in _unpack(batch)
                 for bundle in bundle_chunks((chunk for work in group.works
                                              for chunk in analyse_guarded(work, settings, store, ledger)),
                                             group.bundle_frames))


def _crop_batch(batch: dict[str, np.ndarray], settings: EditSettings, ledger,
                crop: Callable[[ChunkWork, EditSettings], ChunkWork]) -> dict[str, np.ndarray]:
    _limit_threads()
    return _each_chunk(batch, lambda chunk: guarded("crop", chunk, lambda c: crop(c, settings), ledger,
                                                    settings.max_chunk_attempts))


def _compose_batch(batch: dict[str, np.ndarray], settings: EditSettings, ledger) -> dict[str, np.ndarray]:
    _limit_threads()
    store = OutputStore(settings.output)
    return _each_chunk(batch, lambda chunk: guarded("paste", chunk, lambda c: compose_chunk(c, settings, store),
                                                    ledger, settings.max_chunk_attempts).slim())


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

        return _each_chunk(batch, lambda chunk: guarded("model", chunk, lambda c: edit_chunk(c, self.editor),
                                                        self.ledger, self.settings.max_chunk_attempts))


def _store_access() -> dict:
    """Remote arguments that let a stage reach object stores as the driver does: sources, drivers and the
    output may each lie in one, and a cluster's workers were started without the user's AWS_* / GCS
    variables (`storage.store_environment`)."""
    environment = store_environment()
    return {"runtime_env": environment} if environment else {}


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
    """Gathers chunk results per job on the driver: a job is complete once all its chunks are back."""

    def __init__(self) -> None:
        self.groups: dict[str, list[ChunkWork]] = {}

    def add(self, chunk: ChunkWork) -> list[ChunkWork] | None:
        """Add a chunk; returns its job's chunks when this completed them."""
        group = self.groups.setdefault(chunk.job.job_id, [])
        group.append(chunk)
        if chunk.index == -1 or len(group) == chunk.total:
            del self.groups[chunk.job.job_id]
            return group
        return None


def run_local(windows: Iterable[list[JobWork]], total: int, weights, settings: EditSettings, model: str,
              record: Callable[[ResultRow], None]) -> None:
    """Every stage in this process, one chunk at a time (bounded memory, no parallelism), each window of work
    as it is planned (`total`: the jobs known before; the progress bar counts those planned so far); a stop
    request ends the run after the job in hand."""
    from pipelines.edit.model import CropEditor, edit_chunk

    store = OutputStore(settings.output)
    editor = CropEditor(weights, settings.precision, settings.model_batch, threads=max(1, int(settings.model_cpus)))
    with tqdm(total=total, desc="edit", unit="video") as progress:
        for work in _counted(windows, progress, total):
            if stop_requested():
                return
            done = []
            for chunk in analyse_guarded(work, settings, store):
                chunk = guarded("crop", chunk, lambda c: crop_chunk(c, settings))
                chunk = guarded("model", chunk, lambda c: edit_chunk(c, editor))
                chunk = guarded("paste", chunk, lambda c: compose_chunk(c, settings, store))
                done.append(chunk.slim())
            record(_finish_guarded(done, settings, store, model))
            progress.update(1)


def _counted(windows: Iterable[list[JobWork]], progress: tqdm, known: int) -> Iterator[JobWork]:
    """Each job of each window as it is planned; the progress bar's total follows the jobs planned so far."""
    planned = 0
    for works in windows:
        planned += len(works)
        progress.total = max(known, planned)
        progress.refresh()
        yield from works


def _finish_guarded(chunks: list[ChunkWork], settings: EditSettings, store: OutputStore, model: str) -> ResultRow:
    try:
        return finish_job(chunks, settings, store, model)
    except Exception as error:  # a bug: the job is recorded as failed, the run goes on
        LOG.exception("%s: finishing failed", chunks[0].job.source)
        failed = chunks[0].fail(errors.INTERNAL_ERROR, f"{chunks[0].job.source}: joining the output failed: "
                                                       f"{type(error).__name__}: {error}")
        return finish_job([failed], settings, store, model)


def _finish_jobs(groups: list[list[ChunkWork]], settings: EditSettings, store: OutputStore,
                 model: str) -> list[ResultRow]:
    """One finishing task's work: several finished jobs joined one after another (one task per job would
    cost the driver a task per short video)."""
    return [_finish_guarded(chunks, settings, store, model) for chunks in groups]


JOBS_PER_CPU_UNPACKED = 8
"""Below this many queued jobs per CPU of the cluster every job and chunk gets its own block."""
MAX_JOBS_PER_BLOCK = 16
"""Jobs one analysis task takes at most (and one finishing task joins at most)."""


def block_sizes(todo: int, cpus: int, chunk_frames: int) -> tuple[int, int]:
    """(jobs per analysis block, frames of work per later block; 0: one chunk per block).

    With few jobs per CPU, every job and every chunk is a block of its own, so a small run spreads over
    the whole cluster. With a long queue, Ray Data's per-block costs (a few ms of the driver's scheduling
    loop per block and stage) would outweigh short videos' work: an analysis task then takes several jobs
    and short chunks travel packed up to one chunk's worth of frames (`chunks.bundle_chunks`); a full
    chunk of a long video is still a block of its own, so long videos spread over tasks as before.
    """
    jobs = max(1, min(MAX_JOBS_PER_BLOCK, todo // (JOBS_PER_CPU_UNPACKED * max(1, cpus))))
    return jobs, (chunk_frames if jobs > 1 else 0)


def stage_cpus(cpus: int, settings: EditSettings) -> float:
    """CPUs each CPU stage's task asks for: one, except on a cluster too small to run a task of each of the
    three CPU stages beside a model actor at once, where each asks for the share that fits.

    Ray Data reserves each stage's minimum resources, upstream stages first: with whole CPUs on such a
    cluster the later stages would get nothing until analysis had drained the whole queue (the first
    result after nearly all the work). A task asking for half a CPU still runs on one core; the
    operating system shares the cores between the stages.
    """
    spare = cpus - settings.model_cpus
    if spare >= 3 or spare <= 0:
        return 1.0
    return max(0.01, math.floor(100 * spare / 3) / 100)


def crop_cpus(share: float, model_cpus: float) -> float:
    """The crop stage's CPU request: a hair below the other CPU stages' `share`, and never the model actor's.

    Ray Data 2.60 fuses consecutive stages whose remote arguments are equal: the crop would run inside the
    analysis task (a whole task's chunks cropped by one process, a long video's among them) or, without
    GPUs, inside the model actors. Distinct CPU requests are the documented way to keep stages apart
    (ray-project/ray#54433); the OS shares a core the same way whatever the fraction asked.
    """
    cpus = round(share * 0.99, 4)
    return cpus if cpus != model_cpus else round(share * 0.98, 4)


def model_pool(settings: EditSettings) -> tuple[ActorPoolStrategy, dict]:
    """The model stage's actor pool and each actor's resources: with GPUs, an autoscaling pool from one
    actor up to one per GPU share of the whole cluster (or `model_actors` when set); without, a fixed
    pool of `model_actors` (default one)."""
    import ray
    from ray.data import ActorPoolStrategy

    gpus = _model_gpus(settings)
    if not gpus:
        return ActorPoolStrategy(size=settings.model_actors or 1), {}
    most = settings.model_actors or max(1, int(ray.cluster_resources().get("GPU", 0) // gpus))
    return ActorPoolStrategy(min_size=1, max_size=most), {"num_gpus": gpus}


def _head_pinned(restartable: bool = True) -> dict:
    """Options that keep an actor on the driver's node (the head of a cluster), restarted if its process dies
    (`restartable`): losing a worker node never loses it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    restarts = dict(max_restarts=-1, max_task_retries=-1) if restartable else {}
    return dict(num_cpus=0, **restarts,
                scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False))


WINDOWS_AHEAD = 2
"""Windows of planned work waiting for the Ray Data job at most (planning goes no faster than the run)."""


class WorkQueue:
    """The plan's windows in the order planned, handed out by position (an async actor on the driver's node).

    By position, not popped: if Ray re-runs the read task (to rebuild a block lost with a node), it reads the
    same windows in the same order and rebuilds the same blocks (so the windows stay in the object store until
    the run ends, about 0.5 KB per job, as when the whole plan was made first). `put` waits while `WINDOWS_AHEAD` windows
    are planned but not yet asked for, so planning goes no faster than the run.
    """

    def __init__(self) -> None:
        import asyncio

        self.windows: list = []
        self.ended = False
        self.asked = 0
        self.changed = asyncio.Condition()

    async def put(self, window: list) -> None:
        """Append a window (`[object ref]`: the reference stays a reference) once fewer than `WINDOWS_AHEAD` wait."""
        async with self.changed:
            await self.changed.wait_for(lambda: len(self.windows) - self.asked < WINDOWS_AHEAD)
            self.windows.append(window[0])
            self.changed.notify_all()

    async def end(self) -> None:
        async with self.changed:
            self.ended = True
            self.changed.notify_all()

    async def get(self, position: int) -> list | None:
        """The window at `position` (`[object ref]`) once planned, or None after the last."""
        async with self.changed:
            self.asked = max(self.asked, position + 1)
            self.changed.notify_all()
            await self.changed.wait_for(lambda: position < len(self.windows) or self.ended)
            return [self.windows[position]] if position < len(self.windows) else None


class WorkFeed:
    """Plans while the Ray Data job runs: the first window's jobs start as soon as it is planned, whatever the
    archive's size.

    A thread of the driver iterates the plan (each window's work, `job.Planner`), splits each window into
    groups of jobs sized by the jobs planned so far (`block_sizes`: the queue a long archive builds is known
    as it is planned), and hands each window as one object to a `WorkQueue` actor, which the dataset's read
    task (`work_source`) reads. A stop request ends planning after the window in hand; an error while
    planning (an unreadable part of a table, a local folder a node cannot see) ends the feed and is raised
    by `raise_error`.
    """

    def __init__(self, windows: Iterable[list[JobWork]], known: int, cpus: int, chunk_frames: int) -> None:
        import threading

        import ray

        self.queue = ray.remote(WorkQueue).options(**_head_pinned(restartable=False)).remote()
        self.windows, self.known, self.cpus, self.chunk_frames = windows, known, cpus, chunk_frames
        self.planned = 0
        """Jobs handed to the dataset so far."""
        self.error: BaseException | None = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._feed, name="plan-feed", daemon=True)
        self._thread.start()

    def sizes(self) -> tuple[int, int]:
        """`block_sizes` for the queue as known now (the jobs planned so far, or known before the run)."""
        return block_sizes(max(self.known, self.planned), self.cpus, self.chunk_frames)

    def _feed(self) -> None:
        import ray

        try:
            for works in self.windows:
                if self._closed.is_set() or stop_requested():
                    break
                if not works:
                    continue
                self.planned += len(works)
                jobs, frames = self.sizes()
                groups = [JobGroup(works[start:start + jobs], frames) for start in range(0, len(works), jobs)]
                # in a list: the queue keeps the reference
                self._wait(self.queue.put.remote([ray.put(payload_table(groups))]))
        except BaseException as error:  # raised on the driver's main thread by `raise_error`
            self.error = error
        finally:
            self._wait(self.queue.end.remote())

    def _wait(self, call) -> None:
        """Wait for a call to the queue, unless the feed is closed meanwhile."""
        import ray
        from ray.exceptions import GetTimeoutError

        while not self._closed.is_set():
            try:
                return ray.get(call, timeout=0.5)
            except GetTimeoutError:
                continue

    def close(self) -> None:
        """End planning (if still going) and release the queue and its windows."""
        import ray

        self._closed.set()
        self._thread.join()
        ray.kill(self.queue)

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


def _read_queue(queue) -> Iterator:
    """The read task: each group of jobs of each window of the queue, as a one-row block, until the end."""
    import ray

    position = 0
    while (window := ray.get(queue.get.remote(position))) is not None:
        table = ray.get(window[0])
        for row in range(table.num_rows):
            yield table.slice(row, 1)
        position += 1


def work_source(feed: WorkFeed):
    """The Ray Data datasource that reads a `WorkFeed`'s queue: one read task, on the driver's node."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class WorkQueueSource(Datasource):
        def estimate_inmemory_data_size(self) -> None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            return [ReadTask(functools.partial(_read_queue, feed.queue),
                             BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None))]

    return WorkQueueSource()


def run_ray(windows: Iterable[list[JobWork]], total: int, weights, settings: EditSettings, model: str,
            record: Callable[[ResultRow], None],
            crop: Callable[[ChunkWork, EditSettings], ChunkWork] = crop_chunk) -> None:
    """The Ray Data job (see the module docstring) over the work of each window of the plan, planned as the
    job runs (`WorkFeed`: iterating `windows` plans them); `total` is the jobs known before the run (0 when
    planning streams with it: the progress bar's total is then the jobs planned so far); `record` receives
    each job's results row.

    A stop request (`runtime.request_stop`) stops planning and feeding work: no further chunk is taken from
    the dataset, the jobs whose chunks are all back are finished and recorded, and the function returns.
    `crop` is the crop stage's per-chunk function (tests swap in one that kills its worker).
    """
    import ray

    store = OutputStore(settings.output)
    ledger = ray.remote(AttemptLedger).options(**_head_pinned()).remote()
    weights_ref = [ray.put(weights)]
    compute, model_resources = model_pool(settings)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    feed = WorkFeed(windows, total, cpus, settings.chunk_frames)
    dataset = ray.data.read_datasource(work_source(feed), num_cpus=0,
                                       label_selector={"ray.io/node-id": ray.get_runtime_context().get_node_id()})
    # every stage's output block is one row (a group of jobs, then a bundle of chunks): the next stage's
    # task takes a row, not a whole window or a whole analysis task's output, so jobs and the chunks of a
    # long video spread over tasks from the start, without a repartition stage (whose streaming tasks
    # would each hold a CPU while waiting for their output to be taken)
    dataset.context.target_max_block_size = 1
    access = _store_access()
    common = dict(batch_size=1, batch_format="numpy", zero_copy_batch=True, **access)  # a block is one row
    # CPU tasks whose worker dies are retried by Ray Data without limit: the ledger turns the attempt after
    # `max_chunk_attempts` crashes into a record (Ray Data 2.60 deprecates per-stage `max_retries`)
    share = stage_cpus(cpus, settings)
    stage_args = {"settings": settings, "ledger": ledger}
    dataset = dataset.map_batches(_analyse_batch, fn_kwargs=stage_args, num_cpus=share, **common)
    dataset = dataset.map_batches(_crop_batch, fn_kwargs={**stage_args, "crop": crop},
                                  num_cpus=crop_cpus(share, settings.model_cpus), **common)
    dataset = dataset.map_batches(_ModelStage, fn_constructor_args=(settings, ledger, weights_ref),
                                  compute=compute, num_cpus=settings.model_cpus, **model_resources, **common)
    dataset = dataset.map_batches(_compose_batch, fn_kwargs=stage_args, num_cpus=share, **common)

    finisher = ray.remote(num_cpus=1, max_retries=1, **access)(_finish_jobs)
    in_flight: dict = {}  # finishing task -> the first chunk of each of its jobs
    waiting: list[list[ChunkWork]] = []  # jobs whose chunks are all back, not yet handed to a finishing task
    most_in_flight = max(2, cpus)
    collector = JobCollector()
    recorded = 0

    def submit() -> None:
        """Hand waiting jobs to finishing tasks, as many at most each as an analysis task takes, while fewer
        than `most_in_flight` run (the first job is handed over as soon as it is complete)."""
        per_task = feed.sizes()[0]
        while waiting and len(in_flight) < most_in_flight:
            taken = waiting[:per_task]
            del waiting[:per_task]
            in_flight[finisher.remote(taken, settings, store, model)] = [group[0] for group in taken]

    def collect(wait: bool, progress: tqdm) -> None:
        """Record finished jobs: those ready now, or (wait) at least one finishing task's."""
        nonlocal recorded
        if not in_flight:
            return
        ready, _ = ray.wait(list(in_flight), num_returns=1 if wait else len(in_flight),
                            timeout=None if wait else 0)
        for ref in ready:
            firsts = in_flight.pop(ref)
            try:
                rows = ray.get(ref)
            except Exception as error:  # the finishing worker died twice
                rows = [finish_job([chunk.fail(errors.WORKER_FAILED, f"{chunk.job.source}: joining the output: "
                                                                     f"{type(error).__name__}: {error}")],
                                   settings, store, model) for chunk in firsts]
            for row in rows:
                record(row)
            recorded += len(rows)
            progress.total = max(total, feed.planned)
            progress.update(len(rows))

    batches = iter(dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1))  # a generator
    with tqdm(total=total, desc="edit", unit="video") as progress:
        try:
            for batch in batches:
                for chunk in _chunks(batch):
                    complete = collector.add(chunk)
                    if complete:
                        waiting.append(complete)
                collect(False, progress)
                submit()
                while len(waiting) >= feed.sizes()[0] * most_in_flight:  # finishing is bounded: the dataset waits
                    collect(True, progress)
                    submit()
                if stop_requested() or feed.error:
                    LOG.warning("%s: no further work is started; finishing %d job(s) in hand",
                                "stop requested" if stop_requested() else "planning failed",
                                len(waiting) + sum(len(firsts) for firsts in in_flight.values()))
                    break
        finally:
            batches.close()  # ends the dataset's execution: its tasks and actors are released
            feed.close()
        while in_flight or waiting:
            submit()
            collect(True, progress)
    feed.raise_error()
    if stop_requested():
        return
    if collector.groups:
        raise RuntimeError(f"chunks of {len(collector.groups)} job(s) never all came back: "
                           f"{sorted(collector.groups)[:5]}")
    if recorded < feed.planned:
        raise RuntimeError(f"{feed.planned - recorded} of the {feed.planned} job(s) handed to the dataset never came "
                           "back (a rerun does them)")
