"""A real 2-node Ray cluster whose worker node does not share the driver's disk: local paths are checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from process_support import session_prefect_env

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import sys, ray
from pipelines.runtime import LocationNotShared, require_shared
ray.init(address=sys.argv[1], log_to_driver=False)
for location, output in [(sys.argv[2], True), (sys.argv[3], True), (sys.argv[4], False), ("s3://bucket/x", True)]:
    try:
        require_shared(location, "--output" if output else "--source", output=output)
        print("shared", location)
    except LocationNotShared as error:
        print("refused", error)
"""


@pytest.mark.slow
def test_a_local_path_some_node_cannot_see_is_refused_and_a_shared_one_passes(two_node_cluster, tmp_path):
    hidden = two_node_cluster.private / "out"
    (tmp_path / "source.mp4").write_bytes(b"video")
    done = subprocess.run([sys.executable, "-c", PROBE, two_node_cluster.address, str(hidden), str(tmp_path / "out"),
                           str(tmp_path / "source.mp4")], cwd=REPO, env=two_node_cluster.env(), capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"refused --output {hidden}: a local path that 1 of the cluster's 2 nodes")
    assert "object-store location" in lines[0]
    assert lines[1:] == [f"shared {tmp_path / 'out'}", f"shared {tmp_path / 'source.mp4'}", "shared s3://bucket/x"]
    assert not list(hidden.iterdir()), "the marker is removed after the check"


@pytest.mark.slow
def test_prepare_on_two_nodes_writes_shards_from_the_workers_and_refuses_a_folder_one_node_lacks(
        two_node_cluster, prefect_harness, tmp_path):
    """The head runs no work, so every shard is written by the worker node: into a folder both nodes see
    it lands on the user's disk; a folder the worker node cannot see is refused before any work."""
    import json

    base = [sys.executable, "-m", "flows.cli", "prepare", "--sample", "--detector", "dlib", "--retries", "0",
            "--workdir", str(tmp_path / "work")]
    env = session_prefect_env(two_node_cluster.env())
    hidden = two_node_cluster.private / "dataset"
    refused = subprocess.run([*base, "--output", str(hidden)], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
    lines = [line for line in refused.stderr.splitlines() if line.startswith("portrait prepare:")]
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-3000:]
    assert f"--output {hidden}: a local path that 1 of the cluster's 2 nodes" in lines[0]

    shared = tmp_path / "dataset"
    done = subprocess.run([*base, "--output", str(shared)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((shared / "summary.json").read_text())
    assert summary["ok"] >= 4 and sum(summary["shards"].values()) >= 2
    index = json.loads((shared / "shards.json").read_text())
    assert all((shared / shard).is_file() for shards in index.values() for shard in shards)
