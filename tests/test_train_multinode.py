"""Training on a real 2-node Ray cluster whose worker node does not share the driver's disk (a local
run dir refused; an object-store run that loses a node mid-run), and the loop's stop after
non-finite steps."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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


LOST_STEPS = 8
TRAIN_ON_STORE = """
import json, sys, threading, time, ray
from pipelines.storage import OutputStore
from pipelines.train.job import run_training
from pipelines.train.settings import TrainSettings
ray.init(address=sys.argv[1], log_to_driver=False)

def train(name, cpus_per_worker):  # 1 or 1.5 CPUs: one torch thread per rank either way, the same numbers
    settings = TrainSettings(data=sys.argv[2], run_dir=sys.argv[3], name=name, steps=int(sys.argv[4]), size=16,
                             perceptual="off", batch=2, workers=2, cpus_per_worker=cpus_per_worker,
                             loader_workers=0, eval_split="train", eval_pairs=1, checkpoint_every=2, log_every=2,
                             grid_every=1000, eval_every=1000, max_failures=2)
    print(json.dumps({name: run_training(settings)}), flush=True)

# 1.5 CPUs per rank: no node holds two ranks of the run that loses a node, so they are spread over both
lost = threading.Thread(target=train, args=("lost", 1.5))
lost.start()
# The uninterrupted run starts once the other's ranks hold their nodes (its first checkpoint), so that it
# cannot take their place; it waits for CPUs that free up when the node is lost or that the replacement brings.
while lost.is_alive() and not OutputStore(sys.argv[3]).exists("lost/checkpoint_00000002/model.pt"):
    time.sleep(0.1)
train("straight", 1.0)
lost.join()
"""


def _registered_step(store, name: str) -> int:
    """The step of the newest checkpoint Ray Train registered for run `name` (0 when none yet)."""
    try:
        snapshot = json.loads(store.read_bytes(f"{name}/checkpoint_manager_snapshot.json"))
    except (OSError, ValueError):  # not written yet, or read while Ray writes it
        return 0
    return int(((snapshot.get("latest_checkpoint_result") or {}).get("metrics") or {}).get("step", 0))


@pytest.mark.slow
def test_an_object_store_run_that_loses_a_node_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_run(
        s3_server, two_node_cluster, carphone_frames, tmp_path):
    import pyarrow.fs as pafs
    import torch

    from dpe.checkpoint import load_checkpoint
    from pipelines.storage import OutputStore

    clips = {"a": ("id0", "train", 0, 40), "b": ("id1", "train", 40, 40)}
    local = write_dataset(tmp_path / "data", carphone_frames, clips)
    bucket = s3_server.bucket("multinode-train")
    pafs.copy_files(str(local), f"{bucket}/data")
    runs = OutputStore(f"{bucket}/runs")
    log = open(tmp_path / "driver.log", "w+")
    driver = subprocess.Popen([sys.executable, "-c", TRAIN_ON_STORE, two_node_cluster.address, f"{bucket}/data",
                               f"{bucket}/runs", str(LOST_STEPS)], cwd=REPO, env=two_node_cluster.env(),
                              stdout=subprocess.PIPE, stderr=log, text=True)
    lost_node = replacement = None
    try:
        lost_node = two_node_cluster.add_node(num_cpus=2)  # joins while the driver starts; the ranks wait for it
        deadline = time.monotonic() + 300
        while not 0 < (registered := _registered_step(runs, "lost")) < LOST_STEPS:
            assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.05)
        two_node_cluster.remove_node(lost_node)  # a lost machine: its raylet and its rank die at once
        # As an autoscaler would bring one back: room for the restarted ranks and the uninterrupted run's.
        replacement = two_node_cluster.add_node(num_cpus=4)
        out, _ = driver.communicate(timeout=400)
    finally:
        if driver.poll() is None:
            driver.kill()
        for node in (lost_node, replacement):
            if node is not None and node.poll() is None:
                two_node_cluster.remove_node(node)
    assert driver.returncode == 0, (tmp_path / "driver.log").read_text()[-3000:]
    summaries = {name: summary for line in out.splitlines() if line.startswith("{")
                 for name, summary in json.loads(line).items()}
    lost, straight = summaries["lost"], summaries["straight"]
    assert lost["step"] == straight["step"] == LOST_STEPS
    starts = [start["step"] for start in json.loads(runs.read_bytes("lost/starts.json"))]
    assert len(starts) == 2 and starts[0] == 0 and registered <= starts[1] < LOST_STEPS, starts
    rows, straight_rows = (list(csv.DictReader(io.StringIO(runs.read_bytes(f"{name}/metrics.csv").decode())))
                           for name in ("lost", "straight"))
    assert [int(row["step"]) for row in rows] == list(range(2, LOST_STEPS + 1, 2)), "every logged step once"
    for name in ("g_total", "d_gan", "l1_self_pose"):
        np.testing.assert_allclose([float(r[name]) for r in rows], [float(r[name]) for r in straight_rows],
                                   rtol=1e-5, err_msg=name)
    models = []
    for name in ("lost", "straight"):
        file = tmp_path / f"{name}.pt"
        file.write_bytes(runs.read_bytes(f"{name}/checkpoint_{LOST_STEPS:08d}/model.pt"))
        models.append(load_checkpoint(file)["models"])
    for network in ("generator", "discriminator", "probes"):
        for key, value in models[1][network].items():
            torch.testing.assert_close(models[0][network][key], value, rtol=1e-5, atol=1e-6, msg=f"{network}.{key}")
