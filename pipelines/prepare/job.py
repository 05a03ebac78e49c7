"""Dataset preparation as plain functions: plan -> run batches -> finalize.

reader (`pipelines.prepare.sources`) -> downloader and processor (`pipelines.prepare.worker`, one Ray task
per video via `pipelines.prepare.runner`) -> writer (`pipelines.dataset.shards`, `pipelines.dataset.manifest`). The
Prefect flow in `flows/prepare_flow.py` only sequences these calls.

Resume: a batch commits its shards first and its manifest part last; a rerun skips clips whose
latest manifest row is ok and deletes shards that no part references (left by an interrupted
batch), so no clip is ever in two shards.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from pipelines.dataset import manifest
from pipelines.prepare.requests import ClipRequest, safe_key
from pipelines.prepare.download import DownloadOptions, is_permanent
from pipelines.media.faces import make_detector
from pipelines.prepare.runner import map_videos
from pipelines.runtime import ensure_ray
from pipelines.dataset.shards import ClipSample, ShardWriter
from pipelines.prepare.sources import ParseFailure, SplitPolicy, parse_sources
from pipelines.storage import OutputStore
from pipelines.media.tracking import TrackingConfig
from pipelines.prepare.worker import ClipOutcome, WorkerSettings

LOG = logging.getLogger(__name__)

RETRIED_ON_RERUN = frozenset({"worker_failed", "internal_error", "encode_failed", "corrupt_video", "refused_scheme"})
"""Failures a plain rerun tries again besides transient download errors: they come from the
machine (a killed worker, a full disk, a truncated download) or from settings the user may have
changed (--allow-file-urls), not from the video itself."""

SUMMARY_PATH = "summary.json"
SHARD_INDEX_PATH = "shards.json"


@dataclass(frozen=True)
class PrepareSettings:
    """Everything a preparation run needs besides its inputs (plain data: Prefect records it as a
    flow parameter; workers get only `worker_settings()`)."""

    output: str
    workdir: str
    detector: str = "auto"
    detect_every: int | None = None
    shard_bytes: int = 256 * 2**20
    videos_per_batch: int = 8
    test_fraction: float = 0.0
    retry_failed: bool = False
    download: DownloadOptions = field(default_factory=DownloadOptions)
    ray_address: str | None = None

    def worker_settings(self) -> WorkerSettings:
        tracking = TrackingConfig()
        if self.detect_every:
            tracking = replace(tracking, detect_stride=self.detect_every)
        return WorkerSettings(download_dir=str(Path(self.workdir) / "downloads"), detector=self.detector,
                              download=self.download, tracking=tracking)


@dataclass(frozen=True)
class Batch:
    """A few videos prepared together: one Prefect task, one manifest part, its own shards."""

    name: str
    groups: tuple[tuple[ClipRequest, ...], ...]
    attempts: dict[str, int]

    @property
    def clips(self) -> int:
        return sum(len(group) for group in self.groups)


@dataclass(frozen=True)
class Plan:
    run_id: str
    requested: int
    already_done: int
    parse_failures: tuple[ParseFailure, ...]
    batches: tuple[Batch, ...]

    def describe(self) -> str:
        todo = sum(b.clips for b in self.batches)
        videos = sum(len(b.groups) for b in self.batches)
        return (f"{self.requested} clips requested, {self.already_done} already prepared or finally failed, "
                f"{todo} to do from {videos} videos in {len(self.batches)} batches; "
                f"{len(self.parse_failures)} input lines rejected")


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def group_by_video(requests: list[ClipRequest]) -> list[tuple[ClipRequest, ...]]:
    """Clips of one video go together so the video is downloaded once (input order is kept)."""
    groups: dict[tuple[str, str], list[ClipRequest]] = defaultdict(list)
    for request in requests:
        groups[(request.video_id, request.url)].append(request)
    return [tuple(group) for group in groups.values()]


def plan(inputs: list[str], settings: PrepareSettings, run_id: str | None = None) -> Plan:
    """Parse the inputs, clean up after interrupted runs, and batch what is still to do.

    The detector is built once here first, so a wrong name or missing weights stop the run with
    one clear error instead of failing every video on the workers.
    """
    make_detector(settings.detector)
    store = OutputStore(settings.output)
    rows = manifest.read_parts(store)
    removed = manifest.remove_orphan_shards(store, rows)
    if removed:
        LOG.warning("removed %d shard(s) of an interrupted run (their clips will be redone): %s",
                    len(removed), ", ".join(removed[:5]))
    store.remove_temporaries()
    requests, failures = parse_sources(inputs, url_template=settings.download.url_template,
                                       splits=SplitPolicy(test_fraction=settings.test_fraction))
    state = manifest.latest_rows(rows)
    todo = manifest.pending(requests, state, retry_failed=True, retry_permanent=settings.retry_failed,
                            is_permanent=lambda failure: failure not in RETRIED_ON_RERUN and is_permanent(failure))
    new_failures = tuple(f for f in failures if f.record_id not in state)
    run_id = run_id or new_run_id()
    groups = group_by_video(todo)
    size = max(1, settings.videos_per_batch)
    batches = tuple(
        Batch(name=f"{run_id}-{index:04d}", groups=tuple(groups[start:start + size]),
              attempts={r.clip_id: manifest.next_attempt(state, r.clip_id) for g in groups[start:start + size] for r in g})
        for index, start in enumerate(range(0, len(groups), size))
    )
    return Plan(run_id=run_id, requested=len(requests) + len(failures), already_done=len(requests) - len(todo),
                parse_failures=new_failures, batches=batches)


def record_parse_failures(plan_: Plan, settings: PrepareSettings) -> None:
    """Input lines that never became clips get manifest rows too, so nothing is silently dropped."""
    if plan_.parse_failures:
        rows = [manifest.row_for_parse_failure(f) for f in plan_.parse_failures]
        manifest.write_part(OutputStore(settings.output), f"{plan_.run_id}-inputs", rows)
        for failure in plan_.parse_failures:
            LOG.warning("input rejected (%s) %s: %s", failure.failure_class, failure.origin, failure.message)


class _BatchWriter:
    """Routes prepared clips to one shard writer per split and builds the batch's manifest rows."""

    def __init__(self, batch: Batch, store: OutputStore, shard_bytes: int) -> None:
        self.batch = batch
        self.store = store
        self.shard_bytes = shard_bytes
        self.writers: dict[str, ShardWriter] = {}
        self.rows: list[manifest.ManifestRow] = []

    def add(self, outcome: ClipOutcome) -> None:
        request = outcome.request
        attempt = self.batch.attempts[request.clip_id]
        if not outcome.ok:
            LOG.warning("clip %s failed (%s): %s", request.clip_id, outcome.failure_class, outcome.message)
            self.rows.append(manifest.row_failed(request, outcome.failure_class or "unknown", outcome.message,
                                                 outcome.timings, attempt))
            return
        clip = outcome.processed
        sample = ClipSample(request=request, mp4=clip.mp4_bytes, boxes=clip.boxes, landmarks=clip.landmarks,
                            pose=clip.pose, expression=clip.expression, detector=clip.detector)
        writer = self.writers.get(request.split)
        if writer is None:
            writer = self.writers[request.split] = ShardWriter(self.store, "", request.split, self.shard_bytes,
                                                               self.batch.name)
        shard = writer.write(sample)
        self.rows.append(manifest.row_ok(request, shard, sample.frames, sample.seconds, outcome.timings, attempt))

    def commit(self) -> None:
        """Commit the open shards, then the manifest part that makes them count."""
        for writer in self.writers.values():
            writer.close()
        manifest.write_part(self.store, self.batch.name, self.rows)

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()


def run_batch(batch: Batch, settings: PrepareSettings) -> dict[str, int]:
    """Prepare one batch on Ray, write its shards, then commit its manifest part (the commit point)."""
    ensure_ray(settings.ray_address)
    output = _BatchWriter(batch, OutputStore(settings.output), settings.shard_bytes)
    with tqdm(total=batch.clips, desc=f"batch {batch.name}", unit="clip") as progress:
        def record(outcomes: list[ClipOutcome]) -> None:
            for outcome in outcomes:
                output.add(outcome)
                progress.update(1)

        try:
            map_videos([list(group) for group in batch.groups], settings.worker_settings(), record)
            output.commit()
        except BaseException:
            output.abort()
            raise
    ok = sum(row.status == manifest.OK for row in output.rows)
    LOG.info("batch %s: %d clips ok, %d failed", batch.name, ok, len(output.rows) - ok)
    return {"ok": ok, "failed": len(output.rows) - ok}


def finalize(settings: PrepareSettings) -> dict:
    """Consolidate the manifest, index the shards per split, and write and return the summary."""
    store = OutputStore(settings.output)
    rows = manifest.read_parts(store)
    manifest.remove_orphan_shards(store, rows)
    state = manifest.latest_rows(rows)
    manifest.consolidate(store, state)
    shards: dict[str, set[str]] = defaultdict(set)
    for row in state.values():
        if row.status == manifest.OK and row.shard:
            shards[row.split].add(row.shard)
    store.write_bytes_atomic(SHARD_INDEX_PATH, json.dumps({k: sorted(v) for k, v in sorted(shards.items())},
                                                          indent=1).encode())
    counts = manifest.summary(state.values())
    result = {
        "output": settings.output,
        "requested": counts.total,
        "ok": counts.by_status.get(manifest.OK, 0),
        "failed": counts.by_status.get(manifest.FAILED, 0),
        "ok_seconds": round(counts.ok_seconds, 3),
        "by_failure_class": dict(sorted(counts.by_failure_class.items())),
        "shards": {split: len(paths) for split, paths in sorted(shards.items())},
    }
    store.write_bytes_atomic(SUMMARY_PATH, json.dumps(result, indent=1).encode())
    return result


def summary_text(summary: dict) -> str:
    """The end-of-run report printed on the command line."""
    lines = [f"prepared dataset: {summary['output']}",
             f"  {'clips requested':<22}{summary['requested']:>6}",
             f"  {'ok':<22}{summary['ok']:>6}  ({summary['ok_seconds']:.1f} s of video)",
             f"  {'failed':<22}{summary['failed']:>6}"]
    lines += [f"    {name:<20}{count:>6}" for name, count in summary["by_failure_class"].items()]
    lines += [f"  {f'shards[{split}]':<22}{count:>6}" for split, count in summary["shards"].items()]
    lines.append(f"  manifest: {summary['output'].rstrip('/')}/{manifest.MANIFEST_PATH}")
    return "\n".join(lines)


def summary_markdown(summary: dict) -> str:
    """The same report as a Prefect artifact."""
    rows = ["| status / failure class | clips |", "|---|---:|",
            f"| ok | {summary['ok']} |", f"| failed | {summary['failed']} |"]
    rows += [f"| failed: `{name}` | {count} |" for name, count in summary["by_failure_class"].items()]
    shards = ", ".join(f"{split}: {n}" for split, n in summary["shards"].items()) or "none"
    return (f"## Dataset preparation\n\nOutput `{summary['output']}`; {summary['ok_seconds']:.1f} s of "
            f"prepared video; shards {shards}.\n\n" + "\n".join(rows))


def parse_rate(text: str | None) -> int | None:
    """'2M' -> 2097152 bytes/s (yt-dlp's notation); None stays None."""
    if not text:
        return None
    from yt_dlp.utils import parse_bytes

    value = parse_bytes(text)
    if value is None:
        raise ValueError(f"cannot read rate limit {text!r}: use a number of bytes/s with an optional K, M or G")
    return int(value)


def default_workdir(output: str, workdir: str | None) -> Path:
    """Scratch for downloads, absolute (workers resolve it on their own nodes), and kept across runs
    so the download cache serves reruns: the given one, else OUTPUT/.work for a local output,
    else a per-output folder under ~/.cache/dpe-portrait."""
    if workdir:
        return Path(workdir).expanduser().resolve()
    store = OutputStore(output)
    if store.is_local:
        return store.local_path(".work")
    return Path.home() / ".cache" / "dpe-portrait" / safe_key(output)


@contextlib.contextmanager
def sample_inputs(workdir: Path, settings: PrepareSettings, extra_inputs: list[str]
                  ) -> Iterator[tuple[list[str], PrepareSettings]]:
    """Serve the bundled sample on loopback while the run lasts; yield its inputs and matching settings."""
    from pipelines.sample.media import SAMPLE_PORT, make_sample_media
    from pipelines.sample.server import serve_directory
    from pipelines.sample.metadata import sample_url_template, write_sample_inputs

    directory = workdir / "sample"
    media = make_sample_media(directory / "media")
    with serve_directory(next(iter(media.values())).parent, port=SAMPLE_PORT) as server:
        written = write_sample_inputs(directory, server.base_url)
        download = replace(settings.download, url_template=sample_url_template(server.base_url))
        inputs = [str(written[k]) for k in ("vox1", "vox2", "clips", "urls")] + list(extra_inputs)
        yield inputs, replace(settings, download=download)
