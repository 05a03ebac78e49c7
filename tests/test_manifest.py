"""Parquet manifest: atomic parts, latest-row-wins state, resume semantics, summaries."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pyarrow.parquet as pq
import pytest

from pipelines.dataset.layout import MANIFEST_PATH
from pipelines.dataset.manifest import (
    FAILED,
    OK,
    TIMING_COLUMNS,
    ManifestRow,
    consolidate,
    load_state,
    next_attempt,
    read_parts,
    read_states,
    rows_to_table,
    summary,
    table_summary,
    write_part,
)
from pipelines.errors import DUPLICATE_CLIP
from pipelines.prepare.job import Plan, pending, record_parse_failures
from pipelines.prepare.requests import ClipRequest, manifest_row
from pipelines.prepare.settings import PrepareSettings
from pipelines.prepare.sources import ParseFailure
from pipelines.storage import OutputStore

TIMINGS = {"download_s": 1.5, "analyse_s": 0.25, "encode_s": 0.5, "total_s": 0.8, "probe_s": 0.01}


def request(name: str, video: str = "-video0001") -> ClipRequest:
    return ClipRequest(
        clip_id=f"id1/{video}/{name}", video_id=video, url=f"https://y/{video}", identity="id1", start_s=1.0, end_s=3.0
    )


def row_ok(req: ClipRequest, shard: str, frames: int, seconds: float, timings=TIMINGS, attempt: int = 1) -> ManifestRow:
    return manifest_row(req, status=OK, attempt=attempt, timings=timings, shard=shard, frames=frames, seconds=seconds)


def row_failed(req: ClipRequest, failure_class: str, message: str, timings=None, attempt: int = 1) -> ManifestRow:
    return manifest_row(req, status=FAILED, attempt=attempt, timings=timings, failure_class=failure_class,
                        message=message)


def parse_failure_rows(store: OutputStore, *failures: ParseFailure) -> list[ManifestRow]:
    plan = Plan(run_id="r1", detector="dlib", requested=0, already_done=0, redone=0, parse_failures=failures,
                batches=())
    record_parse_failures(plan, PrepareSettings(output=store.uri))
    return [row for row in read_parts(store) if row.clip_id in {f.record_id for f in failures}]


@pytest.fixture
def store(tmp_path) -> OutputStore:
    return OutputStore(tmp_path / "out")


def test_part_round_trips_every_column(store):
    rows = [
        row_ok(request("a"), "train/b-0000.tar", 50, 2.0, attempt=2),
        row_failed(request("b"), "no_face", "no face in 50 frames", {"download_s": 0.5}),
    ]
    relpath = write_part(store, "batch-1", rows)
    assert relpath == "manifest/parts/batch-1.parquet"
    assert read_parts(store) == rows
    ok = rows[0]
    assert (ok.download_s, ok.analyse_s, ok.encode_s, ok.total_s) == (1.5, 0.25, 0.5, 0.8)
    assert '"probe_s": 0.01' in ok.timings_json
    assert rows[1].download_s == 0.5 and rows[1].encode_s is None
    assert [p.name for p in store.local_path().rglob("*.part")] == []


def test_an_ok_row_must_carry_every_timing_column_and_a_failure_a_registered_class():
    for missing in TIMING_COLUMNS:
        with pytest.raises(ValueError, match=missing):
            row_ok(request("a"), "s.tar", 1, 0.04, timings={k: 1.0 for k in TIMING_COLUMNS if k != missing})
    with pytest.raises(KeyError, match="no_such_class"):
        row_failed(request("a"), "no_such_class", "")
    with pytest.raises(ValueError, match="status"):
        manifest_row(request("a"), status="maybe", attempt=1)


def test_batch_names_are_checked_and_never_reused(store):
    write_part(store, "b1", [row_ok(request("a"), "train/b1-0000.tar", 1, 0.04)])
    with pytest.raises(FileExistsError, match="b1"):
        write_part(store, "b1", [])
    write_part(store, "b1", [row_failed(request("a"), "timeout", "")], replace=True)  # a retry of batch b1
    assert [row.status for row in read_parts(store)] == [FAILED]
    with pytest.raises(ValueError, match="batch name"):
        write_part(store, "../b2", [])


def test_a_part_that_fails_half_way_leaves_nothing(store, monkeypatch):
    def write_half_then_fail(table, where, **kwargs):
        where.write(b"PAR1 half a parquet file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_part(store, "b1", [row_ok(request("a"), "s.tar", 1, 0.04)])
    assert store.list(include_temporaries=True) == []
    assert load_state(store) == {}


def test_latest_row_per_clip_wins(store):
    earlier = datetime(2026, 1, 1, tzinfo=timezone.utc)
    first = row_failed(request("a"), "timeout", "slow", attempt=1)
    second = row_ok(request("a"), "train/z-0000.tar", 10, 0.4, attempt=2)
    # Part names sort against time: "a-later" holds the newer row, "z-earlier" the older.
    write_part(store, "z-earlier", [ManifestRow(**{**first.__dict__, "updated_at": earlier})])
    write_part(store, "a-later", [ManifestRow(**{**second.__dict__, "updated_at": earlier + timedelta(hours=1)})])
    state = load_state(store)
    assert state["id1/-video0001/a"].status == OK and state["id1/-video0001/a"].attempt == 2
    assert next_attempt(state, "id1/-video0001/a") == 3 and next_attempt(state, "never") == 1
    latest = read_states(store).latest  # the same rule, counted in Arrow
    assert latest["status"].to_pylist() == [OK] and latest["attempt"].to_pylist() == [2]

    consolidate(store)
    table = pq.read_table(store.local_path(MANIFEST_PATH))
    assert table.num_rows == 1 and table.column("status").to_pylist() == [OK]


def test_rerun_does_only_what_is_missing(store):
    done, slow, gone, killed, new = (request(n) for n in ("done", "slow", "gone", "killed", "new"))
    write_part(
        store,
        "b1",
        [
            row_ok(done, "train/b1-0000.tar", 10, 0.4),
            row_failed(slow, "timeout", "read timed out"),
            row_failed(gone, "not_found", "HTTP 404"),
            row_failed(killed, "worker_failed", "SIGKILL"),
        ],
    )
    state = load_state(store)
    everything = [done, slow, gone, killed, new]
    assert pending(everything, *read_states(store).attempts()) == [slow, killed, new]  # transient and machine failures come back
    assert pending(everything, *read_states(store).attempts(retry_all=True)) == [slow, gone, killed, new]

    write_part(store, "b2", [row_ok(slow, "train/b2-0000.tar", 10, 0.4, attempt=next_attempt(state, slow.clip_id))])
    attempts, again = read_states(store).attempts()
    assert pending(everything, attempts, again) == [killed, new]
    assert attempts[slow.clip_id] == 2 and load_state(store)[slow.clip_id].attempt == 2


def test_parse_failures_never_clobber_real_clips(store):
    kept = request("a")
    duplicate = ParseFailure("t.csv:3", f"clip {kept.clip_id!r} repeats ...", DUPLICATE_CLIP)
    write_part(store, "b1", [row_ok(kept, "train/b1-0000.tar", 10, 0.4)])
    (row,) = parse_failure_rows(store, duplicate)
    assert row.origin == "t.csv:3" and row.key.startswith("k")
    state = load_state(store)
    assert state[kept.clip_id].status == OK
    assert state[duplicate.record_id].failure_class == DUPLICATE_CLIP
    assert pending([kept], *read_states(store).attempts()) == []


def test_summary_counts_by_status_and_failure_class():
    rows = [row_ok(request(f"ok{i}"), "s.tar", 25, 1.0) for i in range(3)]
    rows += [row_failed(request(f"nf{i}"), "no_face", "") for i in range(2)]
    rows += [row_failed(request("t"), "timeout", ""), row_failed(request("x"), "bad_metadata", "bad")]
    result = summary(rows)
    assert result.total == 7
    assert result.by_status == {OK: 3, FAILED: 4}
    assert result.by_failure_class == {"no_face": 2, "timeout": 1, "bad_metadata": 1}
    assert result.ok_seconds == pytest.approx(3.0)
    assert result.as_dict()["by_status"] == {OK: 3, FAILED: 4}
    lines = result.table().splitlines()
    assert lines[0].split() == ["clips", "7"]
    assert lines.index("  no_face" + " " * 15 + "2".rjust(10)) < lines.index("  timeout" + " " * 15 + "1".rjust(10))
    assert summary([]).total == 0
    assert table_summary(rows_to_table(rows)) == result, "the Arrow count (finalize's) agrees"


def test_a_later_attempt_wins_even_when_its_host_clock_is_behind(tmp_path):
    store = OutputStore(str(tmp_path))
    now = datetime.now(timezone.utc)
    failed = row_failed(request("a"), "timeout", "slow", attempt=1)
    retried = row_ok(request("a"), "train/b-0000.tar", 10, 0.4, attempt=2)
    write_part(store, "a", [ManifestRow(**{**failed.__dict__, "updated_at": now})])
    write_part(store, "b", [ManifestRow(**{**retried.__dict__, "updated_at": now - timedelta(hours=2)})])
    assert load_state(store)["id1/-video0001/a"].status == OK
