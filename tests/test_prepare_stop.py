"""Stopping `portrait prepare` with a real SIGTERM: it ends within 20 s, leaves nothing half-written,
says how to resume, and the rerun completes with no clip in two shards."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from process_support import session_prefect_env, sigterm_and_wait

from flows.cli import main
from pipelines.dataset import integrity, manifest
from pipelines.dataset.layout import PARTS_PREFIX
from pipelines.dataset.shards import read_store_samples
from pipelines.storage import OutputStore, is_temporary

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _batch_parts(store: OutputStore) -> list[str]:
    return [p for p in store.list(PARTS_PREFIX) if not p.endswith(("-inputs.parquet", "-verify.parquet"))]


def test_sigterm_stops_within_20_s_and_the_rerun_resumes_exactly(tmp_path, ray_cluster, prefect_harness):
    output = tmp_path / "out"
    argv = ["prepare", "--sample", "--output", str(output), "--detector", "dlib", "--videos-per-batch", "1",
            "--batches-in-flight", "1", "--retries", "0", "--workdir", str(tmp_path / "work")]
    # On the session's Ray and Prefect API: starting embedded ones would only add seconds (the embedded
    # services' own end is tested in test_prepare_mistakes and by the README).
    env = session_prefect_env({**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address})
    stderr = tmp_path / "stderr.txt"
    command = subprocess.Popen([sys.executable, "-m", "flows.cli", *argv], env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=open(stderr, "w"))
    store = OutputStore(str(output))
    deadline = time.monotonic() + 240
    while command.poll() is None and time.monotonic() < deadline and not (output.exists() and _batch_parts(store)):
        time.sleep(0.2)
    assert command.poll() is None, stderr.read_text()[-3000:]
    committed_before = _batch_parts(store)
    code, seconds = sigterm_and_wait(command, stderr, 20)
    assert seconds < 20
    lines = [line for line in stderr.read_text().splitlines() if line.startswith("portrait prepare: stopped")]
    assert code == 130 and len(lines) == 1 and "run the same command again to resume" in lines[0], \
        stderr.read_text()[-3000:]

    rows = manifest.read_parts(store)
    check = integrity.reconcile(store, manifest.read_states(store), integrity.read_run_records(store), repair=False)
    assert check.lost == {} and check.missing_shards == [], "every clip recorded ok is in its shard"
    assert [p for p in store.list(include_temporaries=True) if is_temporary(p.rsplit("/", 1)[-1])] == [], "nothing half-written"
    stopped_state = manifest.latest_rows(rows)
    assert set(committed_before) <= set(_batch_parts(store))

    assert main(argv) == 0
    state = manifest.load_state(store)
    assert set(stopped_state) < set(state), "the rerun prepared what the stopped run had not"
    assert all(state[clip].attempt == row.attempt for clip, row in stopped_state.items()), "nothing redone"
    ok = sorted(row.key for row in state.values() if row.status == manifest.OK)
    shards = [p for p in store.list() if p.endswith(".tar")]
    assert sorted(sample.key for sample in read_store_samples(store, sorted(shards))) == ok, \
        "every ok clip is in exactly one shard"
