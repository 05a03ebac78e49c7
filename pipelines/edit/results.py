"""The results table: `results.parquet` in the output folder, one row per job, and what a rerun redoes.

Every job of every run gets a row: `ok` with its output, frame counts, input and output timing
and seconds per stage, or `failed` with a registered failure class and a message naming the
input. The table is rewritten atomically while the run goes (at most every `FLUSH_INTERVAL_S`
seconds) and at its end, so an interrupted run keeps what it finished.

A rerun (`pending`) redoes a job when it has no row, when its spec (inputs, options, model and
output-deciding settings) changed, when its row is ok but the output file is gone, or when it
failed with a class a rerun retries (`errors.retried_on_rerun`: failures of the machine, not of
the input); `retry_failed` retries every failure. Rows of jobs not in this run are kept.
"""

from __future__ import annotations

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
OK = "ok"
FAILED = "failed"
FLUSH_INTERVAL_S = 30.0


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


def read_results(store: OutputStore) -> dict[str, ResultRow]:
    """The table's rows by job id (empty when there is no table yet)."""
    if not store.exists(RESULTS_PATH):
        return {}
    table = pq.read_table(pa.BufferReader(store.read_bytes(RESULTS_PATH)))
    known = [name for name in SCHEMA.names if name in table.column_names]
    return {record["job_id"]: ResultRow(**record) for record in table.select(known).to_pylist()}


def write_results(store: OutputStore, rows: dict[str, ResultRow]) -> None:
    """Rewrite `results.parquet` atomically, rows sorted by job id."""
    table = pa.Table.from_pylist([asdict(rows[key]) for key in sorted(rows)], schema=SCHEMA)
    with store.open_output_atomic(RESULTS_PATH) as output:
        pq.write_table(table, output.file)


@dataclass
class Pending:
    """What a run has to do, and what it skips."""

    todo: list[tuple[EditJob, str, int]]
    """(job, spec, attempt) to run."""
    done: int = 0
    recorded_failures: int = 0
    changed: int = 0
    missing_outputs: int = 0


def pending(jobs: list[EditJob], specs: dict[str, str], state: dict[str, ResultRow], store: OutputStore,
            retry_failed: bool) -> Pending:
    """Split jobs into those to run and those an earlier run settled (see the module docstring)."""
    result = Pending(todo=[])
    for job in jobs:
        row = state.get(job.job_id)
        spec = specs[job.job_id]
        if row is None:
            result.todo.append((job, spec, 1))
            continue
        attempt = row.attempt + 1
        if row.spec != spec:
            result.changed += 1
            result.todo.append((job, spec, attempt))
        elif row.status == OK:
            if store.exists(job.output):
                result.done += 1
            else:
                result.missing_outputs += 1
                result.todo.append((job, spec, attempt))
        elif retry_failed or errors.retried_on_rerun(row.failure_class or ""):
            result.todo.append((job, spec, attempt))
        else:
            result.recorded_failures += 1
    return result


class ResultsTable:
    """The rows of one output folder, written back atomically now and then and at the end."""

    def __init__(self, store: OutputStore) -> None:
        self.store = store
        self.rows = read_results(store)
        self._dirty = False
        self._written = time.monotonic()

    def record(self, row: ResultRow) -> None:
        self.rows[row.job_id] = row
        self._dirty = True
        if time.monotonic() - self._written >= FLUSH_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        if self._dirty:
            write_results(self.store, self.rows)
            self._dirty = False
        self._written = time.monotonic()


def summary(rows: list[ResultRow], skipped: Pending | None = None, output: str = "") -> dict:
    """Counts of a run's rows: by status and failure class, frames and seconds of video edited."""
    ok = [r for r in rows if r.status == OK]
    failed = [r for r in rows if r.status == FAILED]
    result = {
        "output": output,
        "jobs": len(rows),
        "ok": len(ok),
        "failed": len(failed),
        "by_failure_class": dict(sorted(Counter(r.failure_class for r in failed).items())),
        "frames": sum(r.frames or 0 for r in ok),
        "frames_edited": sum(r.frames_edited or 0 for r in ok),
        "frames_passed_through": sum(r.frames_passed_through or 0 for r in ok),
        "seconds_of_video": round(sum(r.output_duration_s or 0.0 for r in ok), 3),
    }
    if skipped is not None:
        result.update(already_done=skipped.done, recorded_failures_kept=skipped.recorded_failures)
    return result


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
    missing = [r.job_id for r in rows if r.status == OK and not store.exists(r.job_id)]  # an ok job's id: its relpath
    for job_id in missing:
        print(f"  MISSING output of {job_id} (recorded as ok; a rerun makes it again)")
    return 1 if missing else 0
