"""Check a dataset folder against its own records, and clean up only what the dataset wrote.

A rerun trusts nothing it has not checked: every clip the manifest calls ok must sit in a shard
that exists and whose stats list exactly the clips recorded for it (and whose size the stats
state). A clip whose shard is missing or disagrees is *lost*: the caller records it as
`shard_lost` and prepares it again. A disagreeing shard is deleted first, so no clip can end up
in two shards.

Clean-up knows what the dataset wrote from its records alone: run records name the batches a
run planned (written before any of them starts), and shards are named after their batch
(`layout.shard_path`). Only such shards, their stats, and temporaries of atomic writes in the
folders the dataset writes to are ever deleted; nothing is matched by pattern over the whole
output.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from pipelines.dataset import manifest
from pipelines.dataset.layout import PARTS_PREFIX, RUNS_PREFIX, run_path, shard_batch, stats_path
from pipelines.dataset.shards import read_stats
from pipelines.storage import OutputStore

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunRecord:
    """The batches a run planned and the splits they write to."""

    run_id: str
    batches: tuple[str, ...]
    splits: tuple[str, ...]


def write_run_record(store: OutputStore, record: RunRecord) -> None:
    """Commit a run's plan before its batches start, so clean-up can tell its shards from others'."""
    store.write_bytes_atomic(run_path(record.run_id), json.dumps(
        {"run_id": record.run_id, "batches": list(record.batches), "splits": list(record.splits)}, indent=1).encode())


def read_run_records(store: OutputStore) -> list[RunRecord]:
    records = []
    for relpath in store.list(RUNS_PREFIX):
        data = json.loads(store.read_bytes(relpath))
        records.append(RunRecord(data["run_id"], tuple(data["batches"]), tuple(data["splits"])))
    return records


@dataclass
class Reconciliation:
    """What `reconcile` found: clips to redo (clip id -> why) and the files it deleted or would delete."""

    lost: dict[str, str] = field(default_factory=dict)
    removed_shards: list[str] = field(default_factory=list)
    removed_temporaries: list[str] = field(default_factory=list)
    missing_shards: list[str] = field(default_factory=list)


def reconcile(store: OutputStore, states: manifest.ClipStates, runs: list[RunRecord], *,
              repair: bool) -> Reconciliation:
    """Check every ok clip's shard, find shards of batches that never committed, and (with `repair`)
    delete those shards, disagreeing shards and stale temporaries. Without `repair` nothing is
    deleted (for `portrait inspect`). `states` is the manifest as `manifest.read_states` reads it."""
    result = Reconciliation()
    batches = {batch for run in runs for batch in run.batches} | {shard_batch(shard) for shard in states.named_shards}
    splits = {split for run in runs for split in run.splits} | states.shard_splits
    present: dict[str, int] = {}
    for split in sorted(splits):
        present.update({path: size for path, size in store.file_sizes(split).items()
                        if shard_batch(path) in batches})
    ok_by_shard = states.ok_keys_by_shard()

    doomed: list[str] = []
    for shard, shard_clips in sorted(ok_by_shard.items()):
        reason = _disagreement(store, shard, [key for _, key in shard_clips], present)
        if reason is None:
            continue
        if shard in present:
            doomed.append(shard)
        else:
            result.missing_shards.append(shard)
        for clip_id, _ in shard_clips:
            result.lost[clip_id] = reason
    doomed += [shard for shard in present if shard not in ok_by_shard]  # batches that never committed
    if repair:
        for shard in sorted(doomed):
            store.delete(shard)
            store.delete(stats_path(shard), missing_ok=True)
            result.removed_shards.append(shard)
        for shard in result.missing_shards:  # stats left without their shard would describe nothing
            store.delete(stats_path(shard), missing_ok=True)
        for folder in ["", PARTS_PREFIX, RUNS_PREFIX, *sorted(splits)]:
            result.removed_temporaries += store.remove_temporaries(folder)
    else:
        result.removed_shards = sorted(doomed)
    return result


def _disagreement(store: OutputStore, shard: str, keys: list[str], present: dict[str, int]) -> str | None:
    """Why the clips recorded in `shard` cannot be trusted, or None when shard and records agree."""
    if shard not in present:
        return f"its shard {shard} is missing"
    stats = read_stats(store, shard)
    if stats is None:
        return f"its shard {shard} has no readable stats file"
    recorded = sorted(keys)
    if sorted(stats.keys) != recorded:
        return (f"its shard {shard} holds {stats.samples} samples but the manifest records {len(recorded)} "
                "there (keys differ)")
    if stats.bytes != present[shard]:
        return f"its shard {shard} has {present[shard]} bytes where its stats say {stats.bytes}"
    return None
