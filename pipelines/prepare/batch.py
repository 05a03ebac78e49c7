"""One batch on one worker (the img2dataset pattern): its videos one after another, its clips into
the batch's own shards on the output store, and only its manifest rows back to the driver.

No clip byte passes through the driver, which commits the rows as the batch's manifest part (the
commit point: shards first, part last). A worker that dies mid-shard leaves at most a temporary
(`storage.AtomicOutput`) or a committed shard of a batch that never committed; both are removed by
the next reconciliation (`dataset.integrity`), which knows the batch from its run record.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable

from pipelines.dataset import manifest
from pipelines.dataset.layout import MARKER_PATH
from pipelines.dataset.shards import ShardWriter
from pipelines.prepare.requests import ClipRequest, manifest_row
from pipelines.prepare.worker import ClipOutcome, WorkerSettings, prepare_video
from pipelines.storage import OutputStore, require_visible

LOG = logging.getLogger(__name__)

VideoWork = Callable[[list[ClipRequest], WorkerSettings], list[ClipOutcome]]


@dataclass(frozen=True)
class Batch:
    """A few videos prepared together: one Prefect task, one Ray task, one manifest part, its own shards."""

    name: str
    groups: tuple[tuple[ClipRequest, ...], ...]
    attempts: dict[str, int]

    @property
    def clips(self) -> int:
        return sum(len(group) for group in self.groups)


class BatchWriter:
    """Routes prepared clips to one shard writer per split and builds the batch's manifest rows;
    shards are named after `writer_name` (the batch's name unless its videos are run one by one)."""

    def __init__(self, batch: Batch, store: OutputStore, shard_bytes: int, writer_name: str) -> None:
        self.batch = batch
        self.store = store
        self.shard_bytes = shard_bytes
        self.writer_name = writer_name
        self.writers: dict[str, ShardWriter] = {}
        self.rows: list[manifest.ManifestRow] = []

    def add(self, outcome: ClipOutcome) -> None:
        request = outcome.request
        attempt = self.batch.attempts[request.clip_id]
        if outcome.sample is None:
            LOG.warning("clip %s failed (%s): %s", request.clip_id, outcome.failure_class, outcome.message)
            self.rows.append(manifest_row(request, status=manifest.FAILED, attempt=attempt, timings=outcome.timings,
                                          failure_class=outcome.failure_class, message=outcome.message))
            return
        writer = self.writers.get(request.split)
        if writer is None:
            writer = self.writers[request.split] = ShardWriter(self.store, request.split, self.shard_bytes,
                                                               self.writer_name)
        shard = writer.write(outcome.sample)
        start, end = outcome.sample.meta.span
        self.rows.append(manifest_row(request, status=manifest.OK, attempt=attempt, timings=outcome.timings,
                                      shard=shard, frames=outcome.sample.frames, seconds=outcome.sample.seconds,
                                      delivered_start_s=start, delivered_end_s=end, message=outcome.message))

    def close(self) -> None:
        """Commit the open shards (the driver commits the manifest part that makes them count)."""
        for writer in self.writers.values():
            writer.close()

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()


def prepare_batch(batch: Batch, settings: WorkerSettings, output: str, shard_bytes: int,
                  writer_name: str | None = None, work: VideoWork | None = None) -> list[manifest.ManifestRow]:
    """Prepare the videos of `batch` here, write their clips into its shards on `output`, and return
    the manifest rows (the Ray task of one batch). `work` is the per-video function (tests swap in
    one that kills its worker).

    Interrupted (`ray.cancel` without force, which the driver sends when asked to stop), the batch
    ends after the video in hand: its shards are committed and the rows returned cover only the
    videos it finished, so the driver commits those and a rerun does the rest.
    """
    store = OutputStore(output)
    require_visible(output, MARKER_PATH, "--output")
    writer = BatchWriter(batch, store, shard_bytes, writer_name or batch.name)
    with _interrupt_ends_after_the_video() as interrupted:
        try:
            for done, group in enumerate(batch.groups):
                if interrupted():
                    LOG.warning("batch %s: stopping after %d of %d videos", batch.name, done, len(batch.groups))
                    break
                for outcome in (work or prepare_video)(list(group), settings):
                    writer.add(outcome)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    return writer.rows


@contextlib.contextmanager
def _interrupt_ends_after_the_video() -> Iterator[Callable[[], bool]]:
    """While the block runs, an interrupt of this thread (Ray delivers a non-forced `ray.cancel` as
    SIGINT to the task's main thread) only sets a flag, read between videos: a KeyboardInterrupt in
    the middle of a clip being written would lose the finished videos with it."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted.is_set
        return
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    try:
        yield interrupted.is_set
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
