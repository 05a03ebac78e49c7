"""A real 2-node Ray cluster whose worker node does not share the driver's disk: local paths are checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
