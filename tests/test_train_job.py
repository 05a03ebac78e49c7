"""The training job end to end on the prepared sample (4 train clips in 1 shard, 2 workers, a real Ray).

Two runs of the same settings on the sample, damaged as archives get damaged: its one train shard
(4 clips) holds a fifth sample whose video is cut short, and an unreadable second shard is listed,
so two workers share one readable shard:

* `straight`: 12 steps through `portrait train` (the Prefect flow), uninterrupted;
* `interrupted`: a real `portrait train` process with 12 steps, stopped with SIGTERM after its first
  step (it checkpoints the step it is at and exits 130 saying how to resume), then the same run again
  (a rerun resumes), during which one worker process is killed with SIGKILL once Ray Train has
  registered checkpoint 6 or a later one before the end (it then restarts the group from that
  checkpoint).

The interrupted run must end with the same weights and the same per-step losses as the straight
one: resume is exact, in weights and in data order.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from process_support import sigterm_and_wait
from train_support import add_damage, copy_dataset, prepared_sample  # noqa: F401 (a fixture)

from dpe.checkpoint import config_from_checkpoint, load_checkpoint
from flows.cli import main
from pipelines.runs import checkpoint_steps
from pipelines.train.clips import load_catalogue
from pipelines.train.job import RunRefused, run_training
from pipelines.train.settings import TrainSettings

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

STEPS = 12
KILL_AFTER = 6
OPTIONS = {"size": 32, "workers": 2, "batch": 4, "checkpoint_every": 2, "keep_checkpoints": 3, "log_every": 1,
           "grid_every": 6, "eval_every": 6, "eval_pairs": 2, "seed": 0}


@pytest.fixture(scope="module")
def train_data(prepared_sample, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    folder = copy_dataset(prepared_sample, tmp_path_factory.mktemp("train-job") / "data")
    return folder, add_damage(folder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def _settings(data: Path, runs: Path, name: str, steps: int) -> TrainSettings:
    return TrainSettings(data=str(data), run_dir=str(runs), name=name, steps=steps, **OPTIONS)


@pytest.fixture(scope="module")
def straight(train_data, runs) -> Path:
    data, _ = train_data
    assert main(_argv(data, runs, "straight")) == 0
    return runs / "straight"


def _descendants_named(marker: str) -> list[int]:
    """Processes below this one (Ray's raylet starts the workers) whose command line holds `marker`, not
    counting their own children (a worker's loader processes are forked with its command line)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry))
    found, pending = [], [os.getpid()]
    while pending:
        for child in children[pending.pop()]:
            try:
                if marker in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
                    found.append(child)
                    continue
            except OSError:
                continue
            pending.append(child)
    return found


def _registered_step(run: Path) -> int:
    """The step of the newest checkpoint Ray Train has registered (a restarted worker group resumes
    from it; a checkpoint folder alone may not be registered yet), 0 when none."""
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or read while Ray writes it
        return 0
    return int(((snapshot.get("latest_checkpoint_result") or {}).get("metrics") or {}).get("step", 0))


def _argv(data: Path, runs: Path, name: str) -> list[str]:
    argv = ["train", "--data", str(data), "--run-dir", str(runs), "--name", name, "--steps", str(STEPS)]
    for option, value in OPTIONS.items():
        argv += [f"--{option.replace('_', '-')}", str(value)]
    return argv


def _stop_with_sigterm(data: Path, runs: Path, tmp_path: Path) -> dict:
    """Run `portrait train` as its own process (on the session's Ray and Prefect API), send it SIGTERM
    once its first step is logged; returns its exit code, seconds from the signal to its exit and stderr."""
    import ray
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as errors:
        command = subprocess.Popen([sys.executable, "-m", "flows.cli", *_argv(data, runs, "interrupted")],
                                   cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=errors)
    progress = runs / "interrupted" / "progress.json"
    deadline = time.monotonic() + 300
    while command.poll() is None and not (progress.exists() and json.loads(progress.read_text())["step"] >= 1):
        assert time.monotonic() < deadline, stderr.read_text()[-3000:]
        time.sleep(0.05)
    assert command.poll() is None, stderr.read_text()[-3000:]
    code, seconds = sigterm_and_wait(command, stderr, 60)
    return {"code": code, "seconds": seconds, "stderr": stderr.read_text()}


@pytest.fixture(scope="module")
def interrupted(train_data, runs, tmp_path_factory) -> dict:
    data, _ = train_data
    stopped = _stop_with_sigterm(data, runs, tmp_path_factory.mktemp("stopped"))
    found = re.search(r"portrait train: stopped at step (\d+) ", stopped["stderr"])
    assert found, stopped["stderr"][-3000:]
    stopped_step = int(found.group(1))
    assert 1 <= stopped_step < KILL_AFTER, "the stop came at the first log step after the signal"
    outcome: dict = {"stopped": stopped, "stopped_step": stopped_step}
    rerun = threading.Thread(target=lambda: outcome.update(summary=run_training(_settings(data, runs, "interrupted",
                                                                                          STEPS))))
    rerun.start()
    deadline = time.monotonic() + 600
    while not KILL_AFTER <= (registered := _registered_step(runs / "interrupted")) < STEPS:
        assert rerun.is_alive() and time.monotonic() < deadline, "the rerun ended before checkpoint 6 was registered"
        time.sleep(0.05)
    workers = _descendants_named("RayTrainWorker")
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    outcome.update(killed=workers[-1], registered=registered)
    rerun.join(timeout=600)
    assert not rerun.is_alive()
    return {**outcome, "run": runs / "interrupted"}


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_two_workers_write_losses_checkpoints_grids_and_events(straight, train_data):
    train = load_catalogue(str(train_data[0]), "train")
    assert len(train.shards) == 2 and len({clip.shard for clip in train.clips if clip.key != "kbroken"}) == 1
    rows = _rows(straight)
    assert [int(row["step"]) for row in rows] == list(range(1, STEPS + 1))
    for row in rows:
        assert all(math.isfinite(float(row[name])) for name in ("g_total", "d_gan", "l1_self_pose", "readout"))
        assert float(row["pairs_per_s"]) > 0
    assert sorted(checkpoint_steps(str(straight.parent), "straight")) == [8, 10, 12]  # keep 3
    assert os.readlink(straight / "latest") == "checkpoint_00000012"
    payload = load_checkpoint(straight / "latest" / "model.pt")
    assert config_from_checkpoint(payload).size == 32 and payload["step"] == STEPS
    assert set(payload["models"]) == {"generator", "discriminator", "probes"} == set(payload["optimizers"])
    assert payload["extra"]["sampler"]["world_size"] == 2 and len(payload["extra"]["probe_statistics"]) == 2
    grids = sorted(path.name for path in (straight / "grids").iterdir())
    assert grids == ["grid_00000000.png", "grid_00000006.png", "grid_00000012.png"]
    assert (straight / "grids" / grids[-1]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = list((straight / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 1000
    assert (straight / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    final = json.loads((straight / "metrics.json").read_text())
    assert final["step"] == STEPS and final["last_evaluation"]["step"] == STEPS
    assert {"l1", "psnr", "ssim", "train_self_l1"} <= set(final["last_evaluation"])
    assert [e["step"] for e in json.loads((straight / "evaluations.json").read_text())] == [0, 6, 12]
    assert [s["step"] for s in json.loads((straight / "starts.json").read_text())] == [0]


def test_a_damaged_sample_and_an_unreadable_shard_are_skipped_counted_and_named(straight, train_data):
    _, expected = train_data
    skipped = json.loads((straight / "skipped.json").read_text())
    assert {key: record["failure_class"] for key, record in skipped["samples"].items()} == expected
    assert skipped["counts"] == {"bad_sample": 1, "unreadable_shard": 1}
    assert json.loads((straight / "metrics.json").read_text())["skipped"] == skipped["counts"]


def test_the_flow_records_a_summary_artifact(straight):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        summaries = ArtifactFilter(key=ArtifactFilterKey(any_=["train-model-summary"]))
        artifacts = client.read_artifacts(artifact_filter=summaries)
    # The session's one Prefect server holds every test's runs (the demo trains too), in no set order.
    ours = [a.data for a in artifacts if f"# Training run `{straight}`" in a.data]
    assert len(ours) == 1, [a.data.splitlines()[0] for a in artifacts]
    text = ours[0]
    assert "samples/s" in text and f"steps: {STEPS} of {STEPS}" in text
    assert "Last evaluation (step 12)" in text


def test_sigterm_checkpoints_the_step_reached_and_exits_saying_how_to_resume(interrupted):
    stopped = interrupted["stopped"]
    lines = [line for line in stopped["stderr"].splitlines() if line.startswith("portrait train: stopped")]
    assert stopped["code"] == 130 and len(lines) == 1, stopped["stderr"][-3000:]
    assert stopped["seconds"] < 20, "the run ends within 20 s of SIGTERM"
    step = interrupted["stopped_step"]
    assert lines[0] == (f"portrait train: stopped at step {step} of {STEPS}; newest checkpoint "
                        f"{interrupted['run']}/checkpoint_{step:08d}/model.pt: run the same command again to resume "
                        "from it")
    starts = [start["step"] for start in json.loads((interrupted["run"] / "starts.json").read_text())]
    assert starts[:2] == [0, step], "the rerun resumed from the stop's checkpoint"


def test_a_killed_worker_is_replaced_and_the_run_finishes_from_its_last_checkpoint(interrupted):
    run = interrupted["run"]
    assert not Path(f"/proc/{interrupted['killed']}").exists()
    starts = [start["step"] for start in json.loads((run / "starts.json").read_text())]
    assert starts[:2] == [0, interrupted["stopped_step"]] and len(starts) == 3  # stopped run, rerun, restart
    assert interrupted["registered"] <= starts[2] < STEPS  # from the newest registered checkpoint, not from 4
    assert interrupted["summary"]["step"] == STEPS
    assert [int(row["step"]) for row in _rows(run)] == list(range(1, STEPS + 1))  # every step once


def test_resume_is_exact_in_weights_and_data_order(straight, interrupted):
    straight_rows, resumed_rows = _rows(straight), _rows(interrupted["run"])
    for name in ("g_total", "d_gan", "l1_cycle_a", "l1_self_expression", "readout", "leakage"):
        np.testing.assert_allclose([float(r[name]) for r in resumed_rows], [float(r[name]) for r in straight_rows],
                                   rtol=1e-5, err_msg=name)
    models = [load_checkpoint(run / "latest" / "model.pt")["models"] for run in (straight, interrupted["run"])]
    for network in ("generator", "discriminator", "probes"):
        for key, value in models[0][network].items():
            torch.testing.assert_close(models[1][network][key], value, rtol=1e-5, atol=1e-6, msg=f"{network}.{key}")


def test_a_finished_run_is_not_trained_again(straight, train_data, runs):
    summary = run_training(_settings(train_data[0], runs, "straight", STEPS))
    assert summary["step"] == STEPS
    assert len(json.loads((straight / "starts.json").read_text())) == 1


def test_a_rerun_with_another_model_is_refused_before_any_worker(straight, train_data, runs):
    with pytest.raises(RunRefused, match=r"size: 32 -> 64"):
        run_training(replace(_settings(train_data[0], runs, "straight", STEPS + 2), size=64))
