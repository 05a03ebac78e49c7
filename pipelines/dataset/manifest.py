"""The Parquet manifest: one row per requested clip, the record that makes reruns resumable.

Each batch commits one part file ``manifest/parts/<batch_name>.parquet`` atomically, after its
shards are committed; `consolidate` merges all parts into ``manifest.parquet`` (latest row per
clip wins). Parts are never rewritten, so the manifest is an append-only log: `load_state`
replays it to learn each clip's latest status, `pending` picks what a rerun still has to do,
and `orphan_shards` finds shards a crash left without a manifest part (delete them before
resuming, or the rerun would add the same clips twice).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.prepare.requests import ClipRequest, safe_key
from pipelines.dataset.shards import stats_path
from pipelines.prepare.sources import ParseFailure
from pipelines.storage import OutputStore

OK = "ok"
FAILED = "failed"
PARTS_PREFIX = "manifest/parts"
MANIFEST_PATH = "manifest.parquet"
TIMING_COLUMNS = ("download_s", "detect_s", "encode_s")

_BATCH = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class ManifestRow:
    """The outcome of one attempt at one clip (or one unparsable input, keyed by its origin)."""

    clip_id: str
    key: str
    video_id: str
    url: str
    identity: str
    split: str
    start_s: float | None
    end_s: float | None
    status: str
    failure_class: str | None = None
    message: str = ""
    shard: str | None = None
    frames: int | None = None
    seconds: float | None = None
    download_s: float | None = None
    detect_s: float | None = None
    encode_s: float | None = None
    timings_json: str = "{}"
    attempt: int = 1
    source: str = ""
    origin: str = ""
    updated_at: datetime = field(default_factory=_now)


SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("key", pa.string()),
        ("video_id", pa.string()),
        ("url", pa.string()),
        ("identity", pa.string()),
        ("split", pa.string()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("status", pa.string()),
        ("failure_class", pa.string()),
        ("message", pa.string()),
        ("shard", pa.string()),
        ("frames", pa.int64()),
        ("seconds", pa.float64()),
        ("download_s", pa.float64()),
        ("detect_s", pa.float64()),
        ("encode_s", pa.float64()),
        ("timings_json", pa.string()),
        ("attempt", pa.int32()),
        ("source", pa.string()),
        ("origin", pa.string()),
        ("updated_at", pa.timestamp("us", tz="UTC")),
    ]
)
assert SCHEMA.names == [f.name for f in fields(ManifestRow)], "SCHEMA and ManifestRow must list the same columns"


def _timing_columns(timings: Mapping[str, float] | None) -> dict[str, object]:
    """The three main timings as columns (``download``/``download_s`` both accepted), all as JSON."""
    timings = dict(timings or {})
    columns: dict[str, object] = {}
    for column in TIMING_COLUMNS:
        value = timings.get(column, timings.get(column.removesuffix("_s")))
        columns[column] = None if value is None else float(value)
    columns["timings_json"] = json.dumps({k: float(v) for k, v in sorted(timings.items())})
    return columns


def _request_columns(request: ClipRequest) -> dict[str, object]:
    return {
        "clip_id": request.clip_id,
        "key": request.key,
        "video_id": request.video_id,
        "url": request.url,
        "identity": request.identity,
        "split": request.split,
        "start_s": request.start_s,
        "end_s": request.end_s,
        "source": request.source,
        "origin": request.origin,
    }


def row_ok(
    request: ClipRequest,
    shard: str,
    frames: int,
    seconds: float,
    timings: Mapping[str, float] | None = None,
    attempt: int = 1,
) -> ManifestRow:
    """A clip written to `shard`."""
    return ManifestRow(
        **_request_columns(request),  # type: ignore[arg-type]
        status=OK,
        shard=shard,
        frames=frames,
        seconds=seconds,
        attempt=attempt,
        **_timing_columns(timings),  # type: ignore[arg-type]
    )


def row_failed(
    request: ClipRequest,
    failure_class: str,
    message: str,
    timings: Mapping[str, float] | None = None,
    attempt: int = 1,
) -> ManifestRow:
    """A clip that failed with a stable `failure_class` and a message for people."""
    if not failure_class:
        raise ValueError(f"clip {request.clip_id!r}: a failed row needs a failure class")
    return ManifestRow(
        **_request_columns(request),  # type: ignore[arg-type]
        status=FAILED,
        failure_class=failure_class,
        message=message,
        attempt=attempt,
        **_timing_columns(timings),  # type: ignore[arg-type]
    )


def row_for_parse_failure(failure: ParseFailure, attempt: int = 1) -> ManifestRow:
    """An input line or file that never became a clip; keyed by its origin."""
    return ManifestRow(
        clip_id=failure.record_id,
        key=safe_key(failure.record_id),
        video_id="",
        url="",
        identity="",
        split="",
        start_s=None,
        end_s=None,
        status=FAILED,
        failure_class=failure.failure_class,
        message=failure.message,
        attempt=attempt,
        origin=failure.origin,
    )


def part_path(batch_name: str) -> str:
    if not _BATCH.fullmatch(batch_name):
        raise ValueError(f"batch name {batch_name!r} must be letters, digits, '_' and '-' (it names a file)")
    return f"{PARTS_PREFIX}/{batch_name}.parquet"


def rows_to_table(rows: Iterable[ManifestRow]) -> pa.Table:
    return pa.Table.from_pylist([asdict(row) for row in rows], schema=SCHEMA)


def rows_from_table(table: pa.Table) -> list[ManifestRow]:
    return [ManifestRow(**record) for record in table.select(SCHEMA.names).to_pylist()]


def _write_table(store: OutputStore, relpath: str, table: pa.Table) -> None:
    with store.open_output_atomic(relpath) as output:
        pq.write_table(table, output.file)


def write_part(store: OutputStore, batch_name: str, rows: Sequence[ManifestRow], *, replace: bool = False) -> str:
    """Commit the rows of one batch as a part file.

    An existing part is an error unless `replace` is set: only a retry of the same batch, which
    rewrote that batch's shards under the same names, may replace its part (shards the retry
    no longer wrote then show up in `orphan_shards`).
    """
    relpath = part_path(batch_name)
    if store.exists(relpath) and not replace:
        raise FileExistsError(
            f"{store.uri}/{relpath} exists: batch name {batch_name!r} was used before; "
            "pick a new one, or pass replace=True when retrying that same batch"
        )
    _write_table(store, relpath, rows_to_table(rows))
    return relpath


def read_parts(store: OutputStore) -> list[ManifestRow]:
    """All rows of all committed parts, in part-name order."""
    rows: list[ManifestRow] = []
    for relpath in store.list(PARTS_PREFIX):
        if relpath.endswith(".parquet"):
            rows.extend(rows_from_table(pq.read_table(pa.BufferReader(store.read_bytes(relpath)))))
    return rows


def latest_rows(rows: Iterable[ManifestRow]) -> dict[str, ManifestRow]:
    """The latest row per clip id: highest attempt, then newest `updated_at`, then last seen.

    Attempts only grow (`next_attempt`), so they order rows even when the hosts that wrote them
    disagree about the time.
    """
    latest: dict[str, ManifestRow] = {}
    for row in rows:
        current = latest.get(row.clip_id)
        if current is None or (row.attempt, row.updated_at) >= (current.attempt, current.updated_at):
            latest[row.clip_id] = row
    return latest


def load_state(store: OutputStore) -> dict[str, ManifestRow]:
    """The latest row per clip id over every committed part."""
    return latest_rows(read_parts(store))


def consolidate(store: OutputStore, state: Mapping[str, ManifestRow] | None = None) -> str:
    """Write ``manifest.parquet``: the latest row per clip (`state`, else read), sorted by clip id."""
    state = load_state(store) if state is None else state
    _write_table(store, MANIFEST_PATH, rows_to_table(state[c] for c in sorted(state)))
    return MANIFEST_PATH


def _default_is_permanent(failure_class: str) -> bool:
    from pipelines.prepare.download import is_permanent

    return is_permanent(failure_class)


def pending(
    requests: Iterable[ClipRequest],
    state: Mapping[str, ManifestRow],
    *,
    retry_failed: bool = False,
    retry_permanent: bool = False,
    is_permanent: Callable[[str], bool] | None = None,
) -> list[ClipRequest]:
    """The requests a rerun still has to do.

    Done (status ok) clips are skipped; failed ones are retried only with `retry_failed`, and
    failures that retrying cannot fix (not_found, private, no_face, ... as judged by
    `is_permanent`, by default `pipelines.prepare.download.is_permanent`) only with `retry_permanent`,
    which retries every failure.
    """
    permanent = is_permanent or _default_is_permanent
    todo = []
    for request in requests:
        row = state.get(request.clip_id)
        if row is None:
            todo.append(request)
        elif row.status == FAILED and (retry_permanent or (retry_failed and not permanent(row.failure_class or ""))):
            todo.append(request)
    return todo


def next_attempt(state: Mapping[str, ManifestRow], clip_id: str) -> int:
    """The attempt number for the next try at `clip_id` (1 for a clip never tried)."""
    row = state.get(clip_id)
    return 1 if row is None else row.attempt + 1


def orphan_shards(store: OutputStore, rows: Iterable[ManifestRow] | None = None) -> list[str]:
    """Committed shards (``*.tar`` outside ``manifest/``) that no manifest part references.

    They are what a crash between a shard commit and its batch's manifest commit leaves
    behind; their clips are still pending, so a rerun would write them again. `rows` are all
    parts' rows when the caller has read them already.
    """
    rows = read_parts(store) if rows is None else rows
    referenced = {row.shard for row in rows if row.shard}
    shards = [p for p in store.list() if p.endswith(".tar") and not p.startswith("manifest/")]
    return [p for p in shards if p not in referenced]


def remove_orphan_shards(store: OutputStore, rows: Iterable[ManifestRow] | None = None) -> list[str]:
    """Delete orphan shards and their stats files; return the shards removed."""
    orphans = orphan_shards(store, rows)
    for shard in orphans:
        store.delete(shard)
        store.delete(stats_path(shard), missing_ok=True)
    return orphans


@dataclass(frozen=True)
class Summary:
    """Counts of a set of manifest rows, by status and by failure class."""

    total: int
    by_status: dict[str, int]
    by_failure_class: dict[str, int]
    ok_seconds: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def table(self) -> str:
        """A plain-text table for logs and the command line."""
        lines = [f"{'clips':<24}{self.total:>10}", f"{'hours of ok video':<24}{self.ok_seconds / 3600:>10.2f}"]
        lines += [f"{'status ' + status:<24}{count:>10}" for status, count in sorted(self.by_status.items())]
        ordered = sorted(self.by_failure_class.items(), key=lambda item: (-item[1], item[0]))
        lines += [f"{'  ' + name:<24}{count:>10}" for name, count in ordered]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def summary(rows: Iterable[ManifestRow]) -> Summary:
    """Count rows by status and failed rows by failure class (pass `load_state(...).values()` for latest)."""
    rows = list(rows)
    return Summary(
        total=len(rows),
        by_status=dict(Counter(row.status for row in rows)),
        by_failure_class=dict(Counter(row.failure_class or "unknown" for row in rows if row.status == FAILED)),
        ok_seconds=sum(row.seconds or 0.0 for row in rows if row.status == OK),
    )
