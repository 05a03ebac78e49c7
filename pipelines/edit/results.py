"""The results table: `results.parquet` in the output folder, one row per job, and what a rerun redoes.

Every job of every run gets a row: `ok` with its output, frame counts, input and output timing
and seconds per stage, or `failed` with a registered failure class and a message naming the
input. While a run goes, its rows are appended as parts (`results.parts/<run>-<n>.parquet`, one
per `PART_ROWS` rows or `FLUSH_INTERVAL_S` seconds, each written atomically), so an interrupted
run keeps what it finished and the driver keeps no rows; the run's end compacts the table and its
parts into `results.parquet` once. Readers (`read_results`, `read_state`, `portrait inspect`)
read the table and then the parts in order, a later row of a job replacing an earlier one.

A rerun (`pending`) redoes a job when it has no row, when its spec (inputs, options, model and
output-deciding settings) changed, when its row is ok but the output file is gone (one listing of
the output folder, not a lookup per job), or when it failed with a class a rerun retries
(`errors.retried_on_rerun`: failures of the machine, not of the input); `retry_failed` retries
every failure. Rows of jobs not in this run are kept.
"""

from __future__ import annotations

import threading
import time
import typing
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import errors
from pipelines.edit.chunks import STAGE_TIMINGS
from pipelines.edit.job_table import EditJob
from pipelines.storage import OutputStore

RESULTS_PATH = "results.parquet"
PARTS_PATH = "results.parts"
OK = "ok"
FAILED = "failed"
FLUSH_INTERVAL_S = 30.0
PART_ROWS = 1000
MAX_LISTED_FAILURES = 50
"""Failed rows a run keeps in memory for its report (the table has them all)."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class ResultRow:
    """The outcome of the latest attempt at one job."""

    job_id: str
    source: str
    driving: str
    output: str
    """The output file's full path or URI."""
    mode: str
    strength: float
    motion: str
    """As applied: 'relative' or 'absolute' ('auto' resolved)."""
    driving_policy: str
    face: str
    status: str
    failure_class: str | None = None
    message: str = ""
    frames: int | None = None
    frames_edited: int | None = None
    frames_passed_through: int | None = None
    chunks: int | None = None
    width: int | None = None
    """Display width (after rotation), as the source and the output show."""
    height: int | None = None
    rotation: int | None = None
    input_fps: str = ""
    """Average frame rate as an exact fraction ('30000/1001')."""
    output_fps: str = ""
    input_duration_s: float | None = None
    output_duration_s: float | None = None
    audio_streams: int | None = None
    output_codec: str = ""
    """The edited video's codec and pixel format ('h264 yuv420p'): the source's unless `format_notes` says why not."""
    scan: str = ""
    """'progressive', or how an interlaced source was edited (its field order, and --deinterlace's choice)."""
    streams_copied: int | None = None
    """Other streams of the source (audio, subtitles, data, attachments) copied unchanged."""
    streams_dropped: str = ""
    """Streams the output container could not hold, each with the reason ('; ' between them)."""
    format_notes: str = ""
    """Every way the output departs from the source's format, and why ('; ' between them)."""
    model: str = ""
    preview_video: str = ""
    preview_sheet: str = ""
    probe_s: float | None = None
    decode_s: float | None = None
    track_s: float | None = None
    crop_s: float | None = None
    model_s: float | None = None
    paste_s: float | None = None
    encode_s: float | None = None
    join_s: float | None = None
    preview_s: float | None = None
    total_s: float | None = None
    """Sum of the stage seconds (work done, over all workers)."""
    wall_s: float | None = None
    """Seconds from the job's first stage starting to its output being written."""
    worker: str = ""
    """host:pid of every process that ran a stage of the job."""
    attempt: int = 1
    spec: str = ""
    origin: str = ""
    updated_at: datetime = field(default_factory=_now)

    def __post_init__(self) -> None:
        if self.status == FAILED:
            errors.failure_class(self.failure_class or "")
        elif self.status != OK:
            raise ValueError(f"job {self.job_id!r}: status must be {OK!r} or {FAILED!r}, got {self.status!r}")


assert set(STAGE_TIMINGS) <= {f.name for f in fields(ResultRow)}, "every stage timing needs its column"

_ARROW_TYPES = {str: pa.string(), float: pa.float64(), int: pa.int64(), datetime: pa.timestamp("us", tz="UTC")}


def _schema() -> pa.Schema:
    hints = typing.get_type_hints(ResultRow)
    columns = []
    for item in fields(ResultRow):
        kind = hints[item.name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        columns.append((item.name, _ARROW_TYPES[base]))
    return pa.schema(columns)


SCHEMA = _schema()


def base_row(job: EditJob, output_uri: str, job_id: str | None = None, **values: object) -> ResultRow:
    """A row for `job` (under `job_id` when given) with its inputs and options filled in."""
    return ResultRow(job_id=job_id or job.job_id, source=job.source, driving=job.driving, output=output_uri,
                     mode=job.mode, strength=job.strength, motion=job.resolved_motion(),
                     driving_policy=job.driving_policy, face=job.face,
                     origin=job.origin, **values)


def _tables(store: OutputStore, columns: list[str] | None = None) -> typing.Iterator[pa.Table]:
    """The compacted table, then every part in the order written (later rows of a job win)."""
    paths = [RESULTS_PATH] if store.exists(RESULTS_PATH) else []
    paths += [path for path in store.list(PARTS_PATH) if path.endswith(".parquet")]
    for path in paths:
        table = pq.ParquetFile(pa.BufferReader(store.read_bytes(path)))
        known = [name for name in (columns or SCHEMA.names) if name in table.schema_arrow.names]
        yield table.read(columns=known)  # only the columns asked for are decoded


def has_results(store: OutputStore) -> bool:
    """Whether `store` is an editing output folder (a compacted table, or parts of an unfinished run)."""
    return store.exists(RESULTS_PATH) or bool(store.list(PARTS_PATH))


def read_results(store: OutputStore) -> dict[str, ResultRow]:
    """The table's rows by job id, parts included (empty when there is no table yet)."""
    rows: dict[str, ResultRow] = {}
    for table in _tables(store):
        rows.update((record["job_id"], ResultRow(**record)) for record in table.to_pylist())
    return rows


@dataclass(frozen=True)
class Settled:
    """What a rerun needs of an earlier row (a few fields, not the row: a million of them fit in memory)."""

    spec: str
    status: str
    failure_class: str | None
    attempt: int
    frames: int
    frames_edited: int
    frames_passed_through: int
    output_duration_s: float


def read_state(store: OutputStore) -> dict[str, Settled]:
    """The earlier rows by job id, as `Settled` (only the columns a rerun decides by are read)."""
    names = ["job_id", *(f.name for f in fields(Settled))]
    state: dict[str, Settled] = {}
    for table in _tables(store, names):
        columns = {name: table.column(name).to_pylist() for name in table.column_names}
        for index, job_id in enumerate(columns["job_id"]):
            state[job_id] = Settled(*(columns[name][index] if name in columns else None for name in names[1:]))
    return state


def write_results(store: OutputStore, rows: dict[str, ResultRow]) -> None:
    """Rewrite `results.parquet` atomically, rows sorted by job id."""
    table = pa.Table.from_pylist([asdict(rows[key]) for key in sorted(rows)], schema=SCHEMA)
    with store.open_output_atomic(RESULTS_PATH) as output:
        pq.write_table(table, output.file)


def compact(store: OutputStore) -> int:
    """Fold the parts into `results.parquet` (once, at a run's end) and delete them; returns the rows."""
    parts = [path for path in store.list(PARTS_PATH) if path.endswith(".parquet")]
    if not parts:
        return -1
    merged = pa.concat_tables([_conform(table) for table in _tables(store)])
    # the last row of each job wins: keep each job id's last position, then sort by job id
    ids = merged.column("job_id").to_pylist()
    last = {job_id: index for index, job_id in enumerate(ids)}
    order = sorted(last.values(), key=lambda index: ids[index])
    merged = merged.take(pa.array(order, type=pa.int64()))
    with store.open_output_atomic(RESULTS_PATH) as output:
        pq.write_table(merged, output.file)
    for path in parts:
        store.delete(path, missing_ok=True)
    return len(merged)


def _conform(table: pa.Table) -> pa.Table:
    """`table` with every column of `SCHEMA` (nulls where an older table lacks one), in its order and types."""
    columns = [table.column(field.name).cast(field.type) if field.name in table.column_names
               else pa.nulls(len(table), field.type) for field in SCHEMA]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def output_listing(store: OutputStore) -> set[str]:
    """Every file in the output folder, listed once (what a rerun checks ok outputs against)."""
    return set(store.list())


@dataclass
class Pending:
    """What a run has to do, and what it skips (counts: the jobs themselves stream past)."""

    todo: int = 0
    done: int = 0
    recorded_failures: int = 0
    changed: int = 0
    missing_outputs: int = 0


def pending_attempt(job: EditJob, spec: str, settled: Settled | None, outputs: set[str] | typing.Container[str],
                    retry_failed: bool, counts: Pending) -> int | None:
    """The attempt number to run `job` as, or None when an earlier run settled it (counted in `counts`)."""
    if settled is None:
        counts.todo += 1
        return 1
    attempt = settled.attempt + 1
    if settled.spec != spec:
        counts.changed += 1
    elif settled.status == OK:
        if job.output in outputs:
            counts.done += 1
            return None
        counts.missing_outputs += 1
    elif not (retry_failed or errors.retried_on_rerun(settled.failure_class or "")):
        counts.recorded_failures += 1
        return None
    counts.todo += 1
    return attempt


class Tally:
    """A run's counts by status and failure class, frames and seconds, and its first failures: the summary
    without keeping a row per job."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.by_failure_class: Counter = Counter()
        self.failures: list[ResultRow] = []

    def add(self, status: str, failure_class: str | None = None, frames: int | None = 0,
            frames_edited: int | None = 0, frames_passed_through: int | None = 0,
            output_duration_s: float | None = 0.0) -> None:
        self.counts["jobs"] += 1
        if status == OK:
            self.counts["ok"] += 1
            self.counts["frames"] += frames or 0
            self.counts["frames_edited"] += frames_edited or 0
            self.counts["frames_passed_through"] += frames_passed_through or 0
            self.counts["seconds_of_video"] += output_duration_s or 0.0
        else:
            self.counts["failed"] += 1
            self.by_failure_class[failure_class] += 1

    def add_row(self, row: ResultRow) -> None:
        self.add(row.status, row.failure_class, row.frames, row.frames_edited, row.frames_passed_through,
                 row.output_duration_s)
        if row.status == FAILED and len(self.failures) < MAX_LISTED_FAILURES:
            self.failures.append(row)

    def add_settled(self, settled: Settled) -> None:
        self.add(settled.status, settled.failure_class, settled.frames, settled.frames_edited,
                 settled.frames_passed_through, settled.output_duration_s)

    def merge(self, other: Tally) -> None:
        self.counts.update(other.counts)
        self.by_failure_class.update(other.by_failure_class)
        self.failures = (self.failures + other.failures)[:MAX_LISTED_FAILURES]

    def summary(self, skipped: Pending | None = None, output: str = "") -> dict:
        """Counts of the tallied rows: by status and failure class, frames and seconds of video edited."""
        c = self.counts
        result = {"output": output, "jobs": c["jobs"], "ok": c["ok"], "failed": c["failed"],
                  "by_failure_class": dict(sorted(self.by_failure_class.items())), "frames": c["frames"],
                  "frames_edited": c["frames_edited"], "frames_passed_through": c["frames_passed_through"],
                  "seconds_of_video": round(c["seconds_of_video"], 3)}
        if skipped is not None:
            result.update(already_done=skipped.done, recorded_failures_kept=skipped.recorded_failures)
        return result


class ResultsTable:
    """Appends a run's rows to the output folder as parts (atomically, every `PART_ROWS` rows or
    `FLUSH_INTERVAL_S` seconds, and at the end); keeps only the rows not yet written and a `Tally`.
    Thread-safe: planning records the rows that can never run while the run records finished jobs."""

    def __init__(self, store: OutputStore, run_id: str) -> None:
        self.store, self.run_id = store, run_id
        self.tally = Tally()
        self._buffer: list[dict] = []
        self._parts = 0
        self._written = time.monotonic()
        self._lock = threading.Lock()

    def record(self, row: ResultRow) -> None:
        with self._lock:
            self.tally.add_row(row)
            self._buffer.append(asdict(row))
            if len(self._buffer) >= PART_ROWS or time.monotonic() - self._written >= FLUSH_INTERVAL_S:
                self._flush()

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            table = pa.Table.from_pylist(self._buffer, schema=SCHEMA)
            with self.store.open_output_atomic(f"{PARTS_PATH}/{self.run_id}-{self._parts:06d}.parquet") as output:
                pq.write_table(table, output.file)
            self._parts += 1
            self._buffer = []
        self._written = time.monotonic()


def summary(rows: typing.Iterable[ResultRow], skipped: Pending | None = None, output: str = "") -> dict:
    """Counts of rows: by status and failure class, frames and seconds of video edited."""
    tally = Tally()
    for row in rows:
        tally.add_row(row)
    return tally.summary(skipped, output)


def summary_text(result: dict) -> str:
    """The end-of-run report printed on the command line (and by `portrait inspect` of a results folder)."""
    lines = [f"edited videos: {result['output']}",
             f"  {'jobs':<24}{result['jobs']:>7}",
             f"  {'ok':<24}{result['ok']:>7}  ({result['seconds_of_video']:.1f} s of video, "
             f"{result['frames_edited']} of {result['frames']} frames edited)",
             f"  {'failed':<24}{result['failed']:>7}"]
    lines += [f"    {name:<22}{count:>7}" for name, count in result["by_failure_class"].items()]
    if "already_done" in result:
        lines.append(f"  {'skipped (done before)':<24}{result['already_done']:>7}")
        lines.append(f"  {'skipped (failed before)':<24}{result['recorded_failures_kept']:>7}"
                     + ("  (--retry-failed retries them)" if result["recorded_failures_kept"] else ""))
    lines.append(f"  results: {result['output'].rstrip('/')}/{RESULTS_PATH}")
    return "\n".join(lines)


def summary_markdown(result: dict, rows: list[ResultRow]) -> str:
    """The same report as a Prefect artifact, with the failures listed."""
    table = ["| status / failure class | jobs |", "|---|---:|", f"| ok | {result['ok']} |",
             f"| failed | {result['failed']} |"]
    table += [f"| failed: `{name}` | {count} |" for name, count in result["by_failure_class"].items()]
    failures = [f"- `{r.job_id}`: `{r.failure_class}`: {r.message}" for r in rows if r.status == FAILED][:50]
    return (f"## Video editing\n\nOutput `{result['output']}`: {result['seconds_of_video']:.1f} s of video, "
            f"{result['frames_edited']} of {result['frames']} frames edited.\n\n" + "\n".join(table)
            + ("\n\n### Failures\n\n" + "\n".join(failures) if failures else ""))


def inspect_results(output: str) -> int:
    """Print what an editing output folder holds: the summary of every job in its results table, each
    failure with its message, and ok jobs whose output file is missing (exit status 1 if any)."""
    store = OutputStore(output)
    rows = list(read_results(store).values())
    if not rows:
        print(f"{output}: no {RESULTS_PATH}; not an editing output folder")
        return 1
    print(summary_text(summary(rows, output=output)))
    for row in sorted((r for r in rows if r.status == FAILED), key=lambda r: (r.failure_class or "", r.job_id)):
        print(f"  FAILED {row.job_id}: {row.failure_class}: {row.message}")
    listed = output_listing(store)
    missing = [r.job_id for r in rows if r.status == OK and r.job_id not in listed]  # an ok job's id: its relpath
    for job_id in missing:
        print(f"  MISSING output of {job_id} (recorded as ok; a rerun makes it again)")
    return 1 if missing else 0
