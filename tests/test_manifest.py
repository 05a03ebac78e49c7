"""Parquet manifest: atomic parts, latest-row-wins state, resume semantics, orphan shards, summaries."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pyarrow.parquet as pq
import pytest

from pipelines.prepare.requests import ClipRequest
from pipelines.dataset.manifest import (
    FAILED,
    MANIFEST_PATH,
    OK,
    ManifestRow,
    consolidate,
    load_state,
    next_attempt,
    orphan_shards,
    pending,
    read_parts,
    remove_orphan_shards,
    row_failed,
    row_for_parse_failure,
    row_ok,
    summary,
    write_part,
)
from pipelines.dataset.shards import ShardWriter, stats_path
from pipelines.prepare.sources import DUPLICATE_CLIP, ParseFailure
from pipelines.storage import OutputStore
from tests.test_shards import make_sample


def request(name: str, video: str = "-video0001") -> ClipRequest:
    return ClipRequest(
        clip_id=f"id1/{video}/{name}", video_id=video, url=f"https://y/{video}", identity="id1", start_s=1.0, end_s=3.0
    )


def transient_only(failure_class: str) -> bool:
    return failure_class not in {"timeout", "network"}


@pytest.fixture
def store(tmp_path) -> OutputStore:
    return OutputStore(tmp_path / "out")


def test_part_round_trips_every_column(store):
    rows = [
        row_ok(request("a"), "train/b-0000.tar", 50, 2.0, {"download_s": 1.5, "detect": 0.25, "mux_s": 0.1}, attempt=2),
        row_failed(request("b"), "no_face", "no face in 50 frames", {"download_s": 0.5}),
        row_for_parse_failure(ParseFailure("list.txt:3", "not a URL")),
    ]
    relpath = write_part(store, "batch-1", rows)
    assert relpath == "manifest/parts/batch-1.parquet"
    assert read_parts(store) == rows
    ok = rows[0]
    assert (ok.download_s, ok.detect_s, ok.encode_s) == (1.5, 0.25, None)
    assert '"mux_s": 0.1' in ok.timings_json
    assert [p.name for p in store.local_path().rglob("*.part")] == []


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

    consolidate(store)
    table = pq.read_table(store.local_path(MANIFEST_PATH))
    assert table.num_rows == 1 and table.column("status").to_pylist() == [OK]


def test_rerun_does_only_what_is_missing(store):
    done, slow, gone, new = (request(n) for n in ("done", "slow", "gone", "new"))
    write_part(
        store,
        "b1",
        [
            row_ok(done, "train/b1-0000.tar", 10, 0.4),
            row_failed(slow, "timeout", "read timed out"),
            row_failed(gone, "not_found", "HTTP 404"),
        ],
    )
    state = load_state(store)
    everything = [done, slow, gone, new]
    assert pending(everything, state, is_permanent=transient_only) == [new]
    assert pending(everything, state, retry_failed=True, is_permanent=transient_only) == [slow, new]
    assert pending(everything, state, retry_permanent=True, is_permanent=transient_only) == [slow, gone, new]

    write_part(store, "b2", [row_ok(slow, "train/b2-0000.tar", 10, 0.4, attempt=next_attempt(state, slow.clip_id))])
    state = load_state(store)
    assert pending(everything, state, retry_failed=True, is_permanent=transient_only) == [new]
    assert state[slow.clip_id].attempt == 2


def test_default_permanence_follows_the_download_module(store):
    write_part(store, "b1", [row_failed(request("gone"), "not_found", "404"), row_failed(request("slow"), "timeout", "")])
    todo = pending([request("gone"), request("slow")], load_state(store), retry_failed=True)
    assert [r.clip_id for r in todo] == [request("slow").clip_id]


def test_parse_failures_never_clobber_real_clips(store):
    kept = request("a")
    duplicate = ParseFailure("t.csv:3", f"clip {kept.clip_id!r} repeats ...", DUPLICATE_CLIP)
    write_part(store, "b1", [row_ok(kept, "train/b1-0000.tar", 10, 0.4), row_for_parse_failure(duplicate)])
    state = load_state(store)
    assert state[kept.clip_id].status == OK
    assert state[duplicate.record_id].failure_class == DUPLICATE_CLIP
    assert pending([kept], state) == []


def write_batch(store: OutputStore, batch: str, indices: range) -> list[ManifestRow]:
    rows = []
    with ShardWriter(store, "", "train", 30_000, batch) as writer:
        for i in indices:
            sample = make_sample(i, mp4_bytes=6000)
            shard = writer.write(sample)
            rows.append(row_ok(sample.request, shard, sample.frames, sample.seconds))
    return rows


def test_orphan_shards_from_a_crash_before_the_manifest_commit(store):
    rows = write_batch(store, "b1", range(0, 6))
    write_part(store, "b1", rows)
    write_batch(store, "b2", range(6, 12))  # crash here: shards committed, manifest part never written
    orphans = orphan_shards(store)
    assert orphans and all(p.startswith("train/b2-") for p in orphans)
    assert set(orphans) == {p for p in store.list() if p.startswith("train/b2-") and p.endswith(".tar")}

    assert remove_orphan_shards(store) == orphans
    assert not any(p.startswith("train/b2-") for p in store.list())
    assert orphan_shards(store) == []
    all_requests = [make_sample(i).request for i in range(12)]
    assert pending(all_requests, load_state(store)) == all_requests[6:]
    assert all(store.exists(stats_path(r.shard)) for r in rows)


def test_summary_counts_by_status_and_failure_class():
    rows = [row_ok(request(f"ok{i}"), "s.tar", 25, 1.0) for i in range(3)]
    rows += [row_failed(request(f"nf{i}"), "no_face", "") for i in range(2)]
    rows += [row_failed(request("t"), "timeout", ""), row_for_parse_failure(ParseFailure("x:1", "bad"))]
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


def test_a_later_attempt_wins_even_when_its_host_clock_is_behind(tmp_path):
    store = OutputStore(str(tmp_path))
    now = datetime.now(timezone.utc)
    failed = row_failed(request("a"), "timeout", "slow", attempt=1)
    retried = row_ok(request("a"), "train/b-0000.tar", 10, 0.4, attempt=2)
    write_part(store, "a", [ManifestRow(**{**failed.__dict__, "updated_at": now})])
    write_part(store, "b", [ManifestRow(**{**retried.__dict__, "updated_at": now - timedelta(hours=2)})])
    assert load_state(store)["id1/-video0001/a"].status == OK
