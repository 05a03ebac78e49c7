"""Dataset preparation as plain functions: plan -> run batches -> finalize.

reader (`pipelines.prepare.sources`) -> downloader and processor (`pipelines.prepare.worker`, one
Ray task per video via `pipelines.prepare.runner`) -> writer (`pipelines.dataset.shards`,
`pipelines.dataset.manifest`). The Prefect flow in `flows/prepare_flow.py` only sequences these.

Scale: the plan is a stream (`Planner`): metadata is read one video at a time and batched as it
is read; the driver holds a window of batches and the ids of the clips it has seen, never the
requests of the whole run, and each batch's Prefect task gets that batch and the small `Run`. What
a rerun skips comes from the manifest's deciding columns (`manifest.read_states`), and `finalize`
consolidates and counts in Arrow: no row object per clip on the driver.

Safety and resume: planning first claims the output (`dataset.layout.claim_output`: an empty folder
or a dataset prepared with the same sample settings, nothing else), then checks every clip the
manifest calls ok against its shard (`dataset.integrity`); each window of batches is recorded in a
run record before any of them starts. A batch commits its shards first and its manifest part last; a
rerun skips clips whose latest row is ok, redoes lost ones, and deletes shards of batches that
never committed, so no clip is ever in two shards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import defaultdict
from collections.abc import Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import errors
from pipelines.dataset import integrity, manifest
from pipelines.dataset.layout import SHARD_INDEX_PATH, SUMMARY_PATH, claim_output
from pipelines.dataset.schema import safe_key
from pipelines.media.faces import make_detector
from pipelines.prepare.batch import Batch, VideoWork
from pipelines.prepare.requests import ClipRequest, manifest_row
from pipelines.prepare.runner import Stopped, WorkerLost, run_on_workers
from pipelines.prepare.settings import PrepareSettings
from pipelines.prepare.sources import ParseFailure, SourceInputs, SplitPolicy, stream_videos
from pipelines.prepare.worker import WorkerSettings, clip_label
from pipelines.storage import OutputStore

LOG = logging.getLogger(__name__)


PLAN_WINDOW = 64
"""Batches planned ahead of the work: their run record is committed before the first of them
starts, and only they (not the whole plan) are held in memory."""


@dataclass(frozen=True)
class Run:
    """What every batch of one run shares: small, so it travels whole with each batch's task."""

    run_id: str
    detector: str

    def worker_settings(self, settings: PrepareSettings) -> WorkerSettings:
        """Workers use the detector the plan resolved ("auto" never means two things in one run)."""
        return WorkerSettings(download_dir=str(settings.work_path / "downloads"), detector=self.detector,
                              download=settings.download, sample_format=settings.sample_format)


@dataclass(frozen=True)
class Plan(Run):
    """A whole plan held at once (`plan`): for tests and small inputs; runs stream with `Planner`."""

    requested: int = 0
    already_done: int = 0
    redone: int = 0
    parse_failures: tuple[ParseFailure, ...] = ()
    batches: tuple[Batch, ...] = ()


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def pending(requests: list[ClipRequest], attempts: Mapping[str, int], again: AbstractSet[str]) -> list[ClipRequest]:
    """The requests a rerun still has to do: never tried (not in `attempts`), or in `again` (see
    `manifest.ClipStates.attempts`)."""
    return [request for request in requests if request.clip_id not in attempts or request.clip_id in again]


class Planner:
    """A run's plan as a stream: the metadata is read one video at a time and batched as it is
    read, so the first batch starts after a window of batches is planned, whatever the size of
    the metadata, and the driver holds a window of batches, never the whole plan.

    Made on the driver: the detector is built first, so a wrong name or missing weights stop the
    run with one clear error instead of failing every video on the workers (and its resolved name
    is what the dataset's marker records); then the output is claimed (`claim_output`) and checked
    against its records, and only then are the inputs read.
    """

    def __init__(self, inputs: SourceInputs, settings: PrepareSettings, run_id: str | None = None) -> None:
        detector = make_detector(settings.detector).name
        self.store = OutputStore(settings.output)
        claim_output(self.store, settings.sample_format.record(detector))
        self.run = Run(run_id or new_run_id(), detector)
        states = manifest.read_states(self.store)
        lost = _reconcile(self.store, states, self.run.run_id, "verify")
        self._attempts, self._again = states.attempts(retry_all=settings.retry_failed)
        del states
        for row in lost.values():  # recorded as shard_lost: prepared again
            self._attempts[row.clip_id] = row.attempt
            self._again.add(row.clip_id)
        self.inputs, self.settings = inputs, settings
        self.redone = len(lost)
        self.requested = self.already_done = self.clips = self.videos = self.batch_count = 0
        self.parse_failures: list[ParseFailure] = []

    @property
    def run_id(self) -> str:
        return self.run.run_id

    def batches(self, window: int = PLAN_WINDOW) -> Iterator[Batch]:
        """The batches still to do, in input order; each window's run record is committed before
        the first batch of that window is handed out (clean-up tells their shards from others')."""
        held: list[Batch] = []
        for batch in self._plan_batches():
            held.append(batch)
            if len(held) >= window:
                yield from self._hand_out(held)
                held = []
        yield from self._hand_out(held)

    def _hand_out(self, batches: list[Batch]) -> Iterator[Batch]:
        if not batches:
            return
        splits = sorted({request.split for batch in batches for group in batch.groups for request in group})
        integrity.write_run_record(self.store, integrity.RunRecord(f"{batches[0].name}-window",
                                                                   tuple(b.name for b in batches), tuple(splits)))
        yield from batches

    def _plan_batches(self) -> Iterator[Batch]:
        size = max(1, self.settings.videos_per_batch)
        groups: list[tuple[ClipRequest, ...]] = []
        for requests, failures in stream_videos(self.inputs, url_template=self.settings.download.url_template,
                                                splits=SplitPolicy(test_fraction=self.settings.test_fraction)):
            self.requested += len(requests) + len(failures)
            self.parse_failures += [f for f in failures if f.record_id not in self._attempts]
            todo = pending(requests, self._attempts, self._again)
            self.already_done += len(requests) - len(todo)
            if todo:
                groups.append(tuple(todo))
            if len(groups) == size:
                yield self._batch(groups)
                groups = []
        if groups:
            yield self._batch(groups)

    def _batch(self, groups: list[tuple[ClipRequest, ...]]) -> Batch:
        batch = Batch(name=f"{self.run_id}-{self.batch_count:05d}", groups=tuple(groups),
                      attempts={r.clip_id: self._attempts.get(r.clip_id, 0) + 1 for g in groups for r in g})
        self.batch_count += 1
        self.videos += len(groups)
        self.clips += batch.clips
        return batch

    def describe(self) -> str:
        """The plan so far (all of it once `batches` is exhausted)."""
        return (f"{self.requested} clips requested, {self.already_done} already prepared or finally failed, "
                f"{self.clips} to do from {self.videos} videos in {self.batch_count} batches "
                f"({self.redone} redone because their shard was lost); "
                f"{len(self.parse_failures)} input lines rejected; detector {self.run.detector}")


def plan(inputs: SourceInputs, settings: PrepareSettings, run_id: str | None = None) -> Plan:
    """The whole plan at once (see `Planner`, which runs use)."""
    planner = Planner(inputs, settings, run_id)
    batches = tuple(planner.batches())
    return Plan(run_id=planner.run_id, detector=planner.run.detector, requested=planner.requested,
                already_done=planner.already_done, redone=planner.redone,
                parse_failures=tuple(planner.parse_failures), batches=batches)


def _reconcile(store: OutputStore, states: manifest.ClipStates, run_id: str,
               part: str) -> dict[str, manifest.ManifestRow]:
    """Check the dataset against its records, clean up after interrupted batches, and record every
    clip whose shard was lost as `shard_lost` (so it is prepared again); returns those rows."""
    check = integrity.reconcile(store, states, integrity.read_run_records(store), repair=True)
    if check.removed_shards:
        LOG.warning("removed %d shard(s) this dataset wrote that no committed batch holds (an interrupted run, or "
                    "a shard that disagreed with its records): %s", len(check.removed_shards),
                    ", ".join(check.removed_shards[:5]))
    if not check.lost:
        return {}
    table = manifest.read_table(store)  # whole rows, of the lost clips only
    latest = manifest.latest_table(table.filter(pc.is_in(table["clip_id"], value_set=pa.array(sorted(check.lost)))))
    lost = {}
    for row in manifest.rows_from_table(latest):
        reason = check.lost[row.clip_id]
        LOG.warning("clip %s was recorded as prepared but %s: it will be prepared again", row.clip_id, reason)
        lost[row.clip_id] = dataclasses.replace(
            row, status=manifest.FAILED, failure_class=errors.SHARD_LOST, message=f"clip {row.clip_id}: {reason}",
            shard=None, frames=None, seconds=None, delivered_start_s=None, delivered_end_s=None,
            attempt=row.attempt + 1, updated_at=datetime.now(timezone.utc),
            **manifest.timing_columns(None, required=False))
    manifest.write_part(store, f"{run_id}-{part}", list(lost.values()))
    return lost


def record_parse_failures(plan_: Plan | Planner, settings: PrepareSettings) -> None:
    """Input lines that never became clips get manifest rows too, so nothing is silently dropped."""
    if not plan_.parse_failures:
        return
    rows = [manifest.ManifestRow(clip_id=f.record_id, key=safe_key(f.record_id), video_id="", url="", identity="",
                                 split="", start_s=None, end_s=None, status=manifest.FAILED,
                                 failure_class=f.failure_class, message=f.message, origin=f.origin)
            for f in plan_.parse_failures]
    manifest.write_part(OutputStore(settings.output), f"{plan_.run_id}-inputs", rows)
    for failure in plan_.parse_failures:
        LOG.warning("input rejected (%s) %s: %s", failure.failure_class, failure.origin, failure.message)


def run_batch(batch: Batch, run: Run, settings: PrepareSettings, work: VideoWork | None = None) -> dict[str, int]:
    """Prepare one batch as one Ray task, which writes its shards; then commit its manifest part here
    (the commit point). Ray is connected by the flow.

    When the task's worker dies (after a retry), each of its videos is run alone, so a video that
    kills its worker takes no other video with it: it is recorded as `worker_failed`. A stopped
    batch commits the videos it finished (their rows, after their shards); the rest have no row, so
    a rerun prepares them. A stop that outlasts the grace period commits nothing for the batch; its
    shards are removed at the end of the run. A retry of the same batch rewrites its shards under
    the same names.
    """
    store = OutputStore(settings.output)
    worker = run.worker_settings(settings)
    try:
        (result,) = run_on_workers([batch], worker, settings.output, settings.shard_bytes, work=work)
        if isinstance(result, WorkerLost):
            LOG.warning("batch %s: its worker died (%s); running its videos one by one", batch.name, result)
            result = _one_by_one(batch, worker, settings, store, work)
    except Stopped:
        result = Stopped()
    if isinstance(result, Stopped):
        LOG.warning("batch %s: stopped before it could commit a video; nothing of it is committed", batch.name)
        return {"ok": 0, "failed": 0, "stopped": 1}
    if isinstance(result, Exception):
        raise result
    stopped = len(result) < batch.clips
    if result:
        manifest.write_part(store, batch.name, result)
    ok = sum(row.status == manifest.OK for row in result)
    LOG.info("batch %s: %d clips ok, %d failed%s", batch.name, ok, len(result) - ok,
             f"; stopped, {batch.clips - len(result)} clips left for a rerun" if stopped else "")
    return {"ok": ok, "failed": len(result) - ok, **({"stopped": 1} if stopped else {})}


def _one_by_one(batch: Batch, worker: WorkerSettings, settings: PrepareSettings, store: OutputStore,
                work: VideoWork | None) -> list[manifest.ManifestRow]:
    """Each video of `batch` as its own task, writing shards under its own recorded name."""
    singles = [Batch(batch.name, (group,), {r.clip_id: batch.attempts[r.clip_id] for r in group})
               for group in batch.groups]
    names = [f"{batch.name}v{index:03d}" for index in range(len(singles))]
    splits = sorted({r.split for group in batch.groups for r in group})
    integrity.write_run_record(store, integrity.RunRecord(f"{batch.name}-one-by-one", tuple(names), tuple(splits)))
    results = run_on_workers(singles, worker, settings.output, settings.shard_bytes, writer_names=names,
                             max_retries=0, work=work)
    rows: list[manifest.ManifestRow] = []
    for single, result in zip(singles, results):
        if isinstance(result, WorkerLost):
            (group,) = single.groups
            LOG.error("video %s: worker failed: %s", group[0].video_id, result)
            rows += [manifest_row(r, status=manifest.FAILED, attempt=single.attempts[r.clip_id],
                                  failure_class=errors.WORKER_FAILED, message=f"{clip_label(r)}: {result}") for r in group]
        elif isinstance(result, Stopped):  # never started: a rerun prepares it
            continue
        elif isinstance(result, Exception):
            raise result
        else:
            rows += result
    return rows


def finalize(run: Run | Planner, settings: PrepareSettings) -> dict:
    """Clean up after failed batches, consolidate the manifest, index the shards per split, and
    write and return the summary (all from Arrow columns: no row objects, whatever the size)."""
    store = OutputStore(settings.output)
    _reconcile(store, manifest.read_states(store), run.run_id, "final-check")
    latest = manifest.latest_table(manifest.read_table(store))  # shard_lost rows outrank what they replace
    manifest.consolidate(store, latest)
    ok = latest.filter(pc.and_(pc.equal(latest["status"], manifest.OK), pc.is_valid(latest["shard"])))
    shards: dict[str, set[str]] = defaultdict(set)
    for split, shard in zip(ok["split"].to_pylist(), ok["shard"].to_pylist()):
        shards[split].add(shard)
    store.write_bytes_atomic(SHARD_INDEX_PATH, json.dumps({k: sorted(v) for k, v in sorted(shards.items())},
                                                          indent=1).encode())
    counts = manifest.table_summary(latest)
    result = {
        "output": store.uri,
        "requested": counts.total,
        "ok": counts.by_status.get(manifest.OK, 0),
        "failed": counts.by_status.get(manifest.FAILED, 0),
        "ok_seconds": round(counts.ok_seconds, 3),
        "by_failure_class": dict(sorted(counts.by_failure_class.items())),
        "shards": {split: len(paths) for split, paths in sorted(shards.items())},
    }
    store.write_bytes_atomic(SUMMARY_PATH, json.dumps(result, indent=1).encode())
    return result
