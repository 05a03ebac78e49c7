"""The Parquet manifest: one row per requested clip, the record that makes reruns resumable.

Each batch commits one part file (`layout.part_path`) atomically, after its shards are
committed; `consolidate` merges all parts into ``manifest.parquet`` (latest row per clip wins).
Parts are never rewritten, except by a retry of the same batch, so the manifest is an append-only
log: `load_state` replays it to learn each clip's latest status.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.dataset.layout import MANIFEST_PATH, PARTS_PREFIX, part_path
from pipelines.errors import REGISTRY
from pipelines.errors import failure_class as registered
from pipelines.storage import OutputStore

OK = "ok"
FAILED = "failed"
TIMING_COLUMNS = ("download_s", "analyse_s", "encode_s", "total_s")
"""Seconds per stage of an ok clip, as columns; every stage the worker measures is also in
`timings_json`. An ok row must carry all of them (a renamed stage fails loudly, not as nulls)."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class ManifestRow:
    """The outcome of one attempt at one clip (or one unparsable input, keyed by its origin).

    `start_s`/`end_s` is the span requested (seconds of the source video, None for the whole video);
    `delivered_start_s`/`delivered_end_s` the span the prepared frames cover (the face track can be
    shorter, and a span past the end of the video is shortened: the message then says so).
    """

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
    delivered_start_s: float | None = None
    delivered_end_s: float | None = None
    download_s: float | None = None
    analyse_s: float | None = None
    encode_s: float | None = None
    total_s: float | None = None
    timings_json: str = "{}"
    attempt: int = 1
    source: str = ""
    origin: str = ""
    updated_at: datetime = field(default_factory=_now)

    def __post_init__(self) -> None:
        if self.status == FAILED:
            registered(self.failure_class or "")
        elif self.status != OK:
            raise ValueError(f"clip {self.clip_id!r}: status must be {OK!r} or {FAILED!r}, got {self.status!r}")


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
        ("delivered_start_s", pa.float64()),
        ("delivered_end_s", pa.float64()),
        ("download_s", pa.float64()),
        ("analyse_s", pa.float64()),
        ("encode_s", pa.float64()),
        ("total_s", pa.float64()),
        ("timings_json", pa.string()),
        ("attempt", pa.int32()),
        ("source", pa.string()),
        ("origin", pa.string()),
        ("updated_at", pa.timestamp("us", tz="UTC")),
    ]
)
assert SCHEMA.names == [f.name for f in fields(ManifestRow)], "SCHEMA and ManifestRow must list the same columns"


def timing_columns(timings: Mapping[str, float] | None, *, required: bool) -> dict[str, object]:
    """`TIMING_COLUMNS` and ``timings_json`` of a row; `required` (ok rows) makes a missing stage an error."""
    timings = {name: float(value) for name, value in (timings or {}).items()}
    missing = [column for column in TIMING_COLUMNS if column not in timings]
    if required and missing:
        raise ValueError(f"timings lack {missing} (have {sorted(timings)}); the manifest records {TIMING_COLUMNS}")
    columns: dict[str, object] = {column: timings.get(column) for column in TIMING_COLUMNS}
    columns["timings_json"] = json.dumps(dict(sorted(timings.items())))
    return columns


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
    """The latest row per clip id over every committed part (as row objects: for small datasets and
    tests; a run reads `read_states`)."""
    return latest_rows(read_parts(store))


DECIDING_COLUMNS = ("clip_id", "key", "split", "status", "failure_class", "shard", "attempt", "updated_at")
"""The columns that decide what a rerun does with a clip and where its sample should be."""


PARTS_PER_CHUNK = 256
"""Parts read into one Arrow chunk: tens of thousands of small tables held at once cost far more
than their data (each keeps its own buffers and schema)."""


def read_table(store: OutputStore, columns: Sequence[str] | None = None) -> pa.Table:
    """Every committed part as one Arrow table (part-name order), only `columns` decoded."""
    names = list(columns or SCHEMA.names)
    chunks: list[pa.Table] = [SCHEMA.empty_table().select(names)]
    parts: list[pa.Table] = []
    for relpath in store.list(PARTS_PREFIX):
        if relpath.endswith(".parquet"):
            part = pq.ParquetFile(pa.BufferReader(store.read_bytes(relpath))).read(columns=names, use_threads=False)
            parts.append(part.replace_schema_metadata(None))
        if len(parts) == PARTS_PER_CHUNK:
            chunks.append(pa.concat_tables(parts).combine_chunks())
            parts = []
    return pa.concat_tables([*chunks, *parts])


def latest_table(table: pa.Table) -> pa.Table:
    """The latest row per clip id by the rule of `latest_rows` (highest attempt, then newest, then
    last seen), computed in Arrow: no row objects. Only clips with several rows are sorted; a
    table without any is returned as it is (a first run's manifest)."""
    ids = table["clip_id"]
    counts = pc.value_counts(ids)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if len(repeated) == 0:
        return table
    several = pc.is_in(ids, value_set=repeated)
    ranked = table.filter(several).append_column("_order", pa.array(np.flatnonzero(several.to_numpy(
        zero_copy_only=False)))).sort_by(
        [("clip_id", "ascending"), ("attempt", "descending"), ("updated_at", "descending"), ("_order", "descending")])
    ranked_ids = ranked.column("clip_id").combine_chunks()
    first = np.ones(ranked.num_rows, dtype=bool)
    first[1:] = pc.not_equal(ranked_ids[1:], ranked_ids[:-1]).to_numpy(zero_copy_only=False)
    return pa.concat_tables([table.filter(pc.invert(several)), ranked.filter(pa.array(first)).drop_columns(["_order"])])


@dataclass(frozen=True)
class ClipStates:
    """What a rerun needs from the manifest, read column-wise (`DECIDING_COLUMNS`): at 1.1M clips
    about 0.6 GB of driver memory where `ManifestRow` objects took 1.4 GB (`bench_prepare_scale.py`)."""

    latest: pa.Table
    """The latest row of each clip, `DECIDING_COLUMNS` only."""
    named_shards: frozenset[str]
    """Every shard any row names (earlier attempts too)."""
    shard_splits: frozenset[str]
    """The splits of those rows."""

    def ok_keys_by_shard(self) -> dict[str, list[tuple[str, str]]]:
        """Shard -> (clip id, key) of the clips whose latest row is ok there."""
        ok = self.latest.filter(pc.and_(pc.equal(self.latest["status"], OK), pc.is_valid(self.latest["shard"])))
        grouped: dict[str, list[tuple[str, str]]] = {}
        for shard, clip_id, key in zip(ok["shard"].to_pylist(), ok["clip_id"].to_pylist(), ok["key"].to_pylist()):
            grouped.setdefault(shard, []).append((clip_id, key))
        return grouped

    def attempts(self, *, retry_all: bool = False) -> tuple[dict[str, int], set[str]]:
        """(clip id -> latest attempt) for every clip, and the clips a rerun tries again: failed with
        a class a rerun retries (`errors.retried_on_rerun`), or failed at all with `retry_all`."""
        latest = self.latest
        failed = pc.equal(latest["status"], FAILED)
        if not retry_all:
            retried = pa.array([name for name, cls in REGISTRY.items() if cls.retried_on_rerun], pa.string())
            failed = pc.and_(failed, pc.is_in(latest["failure_class"], value_set=retried))
        again = set(latest.filter(failed)["clip_id"].to_pylist())
        return dict(zip(latest["clip_id"].to_pylist(), latest["attempt"].to_pylist())), again


def read_states(store: OutputStore) -> ClipStates:
    """The manifest as a rerun needs it (`ClipStates`), from the deciding columns of every part."""
    table = read_table(store, DECIDING_COLUMNS)
    named = table.filter(pc.and_(pc.is_valid(table["shard"]), pc.not_equal(table["shard"], "")))
    return ClipStates(latest_table(table), frozenset(pc.unique(named["shard"]).to_pylist()),
                      frozenset(pc.unique(named["split"]).to_pylist()))


def consolidate(store: OutputStore, latest: pa.Table | None = None) -> str:
    """Write ``manifest.parquet``: the latest row per clip sorted by clip id (`latest`, a
    `latest_table` of every column, else read)."""
    latest = latest_table(read_table(store)) if latest is None else latest
    _write_table(store, MANIFEST_PATH, latest.select(SCHEMA.names).sort_by("clip_id"))
    return MANIFEST_PATH


def next_attempt(state: Mapping[str, ManifestRow], clip_id: str) -> int:
    """The attempt number for the next try at `clip_id` (1 for a clip never tried)."""
    row = state.get(clip_id)
    return 1 if row is None else row.attempt + 1


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


def table_summary(latest: pa.Table) -> Summary:
    """`summary` of a `latest_table`, counted in Arrow."""
    status, failure = latest["status"], pc.fill_null(latest["failure_class"], "unknown")
    by_status = {row["values"]: row["counts"] for row in pc.value_counts(status).to_pylist()}
    failed = pc.equal(status, FAILED)
    by_class = {row["values"]: row["counts"] for row in pc.value_counts(failure.filter(failed)).to_pylist()}
    ok_seconds = pc.sum(pc.fill_null(latest["seconds"].filter(pc.equal(status, OK)), 0.0)).as_py()
    return Summary(total=latest.num_rows, by_status=by_status, by_failure_class=by_class,
                   ok_seconds=float(ok_seconds or 0.0))
