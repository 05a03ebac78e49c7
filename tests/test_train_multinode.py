"""Training on a real 2-node Ray cluster whose worker node does not share the driver's disk, and the
loop's stop after non-finite steps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.train.loop import NonFiniteTraining, SkipGuard
from train_support import write_dataset

REPO = Path(__file__).resolve().parents[1]
TRAIN = """
import sys, ray
from pipelines.runtime import LocationNotShared
from pipelines.train.job import run_training
from pipelines.train.settings import TrainSettings
ray.init(address=sys.argv[1], log_to_driver=False)
settings = TrainSettings(data=sys.argv[2], run_dir=sys.argv[3], name="run", steps=2, size=32, perceptual="off",
                         batch=2, eval_split="train")
try:
    run_training(settings)
    print("trained")
except LocationNotShared as error:
    print("refused", error)
"""


@pytest.mark.slow
def test_a_local_run_dir_some_node_cannot_see_is_refused_before_any_worker(two_node_cluster, carphone_frames,
                                                                           tmp_path):
    clips = {"a": ("id0", "train", 0, 40), "b": ("id1", "train", 40, 40)}
    data = write_dataset(tmp_path / "data", carphone_frames, clips)
    hidden = two_node_cluster.private / "runs"
    done = subprocess.run([sys.executable, "-c", TRAIN, two_node_cluster.address, str(data), str(hidden)], cwd=REPO,
                          env=two_node_cluster.env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"refused --run-dir {hidden}: a local path that 1 of the cluster's 2 nodes"), \
        done.stdout + done.stderr[-2000:]
    assert not (hidden / "run").exists(), "nothing of the run is written before the check"


def test_the_guard_stops_after_k_skipped_steps_in_a_row_and_forgives_isolated_ones(caplog):
    guard = SkipGuard(limit=3)
    with caplog.at_level("WARNING"):
        for step, skipped in enumerate([True, True, False, True, True]):
            guard.record(step, skipped)
    assert "step 4 skipped" in caplog.text and guard.total == 4
    with pytest.raises(NonFiniteTraining, match="3 steps in a row .up to step 5.*--max-skipped-steps 3"):
        guard.record(5, True)
