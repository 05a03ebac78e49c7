"""The editing job on a real Ray cluster (loopback) and through the `portrait edit` command and its
Prefect flow: a video that kills its worker ends as a recorded failure while the others complete,
and a rerun resumes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest
from edit_fixtures import edit_clips, tiny_checkpoint  # noqa: F401  (session fixtures)

from flows.cli import main

REPO = Path(__file__).resolve().parents[1]
from pipelines import errors
from pipelines.edit import job, results, runner
from pipelines.edit.crops import crop_chunk
from pipelines.edit.settings import EditSettings
from pipelines.media import video
from pipelines.runtime import clear_stop
from pipelines.storage import OutputStore


def instants(path) -> list[Fraction]:
    pts, base = video.video_timestamps(path)
    return [Fraction(int(p)) * base for p in pts]


@pytest.mark.slow
def test_a_video_that_kills_its_worker_is_recorded_and_the_archive_completes(edit_clips, tiny_checkpoint, tmp_path,
                                                                             ray_cluster, monkeypatch):
    """With blocks packed as for a long queue: the three jobs in one analysis task and one joining task, all
    their chunks in one bundle, so the poisoned video's chunks share every crop task with the others' chunks
    (which are redone after each crash, not lost)."""
    monkeypatch.setattr(runner, "block_sizes", lambda todo, cpus, chunk_frames: (3, 8 * chunk_frames))
    archive = tmp_path / "archive"
    archive.mkdir()
    for name in ("a.mp4", "poison.mp4"):
        shutil.copy(edit_clips["short.mp4"], archive / name)
    shutil.copy(edit_clips["one_frame.mp4"], archive / "b.mp4")
    settings = EditSettings(output=str(tmp_path / "out"), checkpoint=str(tiny_checkpoint), detector="dlib",
                            preset="ultrafast", chunk_frames=16, model_cpus=0.5,
                            workdir=str(tmp_path / "work"))
    edit_plan, weights = job.plan(job.EditInputs(sources=str(archive), driving=str(edit_clips["driving.mp4"])),
                                  settings)

    def crop_or_die(chunk, settings):
        """The crop stage, except that any chunk of poison.mp4 kills the worker process outright."""
        if chunk.job.source.endswith("poison.mp4"):
            os.kill(os.getpid(), signal.SIGKILL)
        return crop_chunk(chunk, settings)

    rows: list[results.ResultRow] = []
    runner.run_ray(edit_plan.windows, edit_plan.pending.todo, weights, settings, edit_plan.model, rows.append,
                   crop=crop_or_die)
    by_output = {row.job_id: row for row in rows}
    assert sorted(by_output) == ["a.mp4", "b.mp4", "poison.mp4"]
    poisoned = by_output["poison.mp4"]
    assert poisoned.status == results.FAILED and poisoned.failure_class == errors.WORKER_FAILED
    assert "died 2 times in the crop stage" in poisoned.message
    assert errors.retried_on_rerun(poisoned.failure_class), "a crash is the machine's failure: reruns retry it"
    for name, source in (("a.mp4", "short.mp4"), ("b.mp4", "one_frame.mp4")):
        assert by_output[name].status == results.OK, by_output[name].message
        assert instants(tmp_path / "out" / name) == instants(edit_clips[source])
    assert len({w for row in rows if row.status == results.OK for w in row.worker.split(",")}) >= 2, \
        "stages ran in separate worker processes"


@pytest.mark.slow
def test_portrait_edit_runs_the_flow_on_ray_writes_previews_and_resumes(edit_clips, tiny_checkpoint, tmp_path,
                                                                       ray_cluster, prefect_harness, capsys):
    output = tmp_path / "out" / "talk_smile.mp4"
    argv = ["edit", "--source", str(edit_clips["short.mp4"]), "--driving", str(edit_clips["driving.mp4"]),
            "--checkpoint", str(tiny_checkpoint.parent), "-o", str(output), "--previews", "--preset", "ultrafast",
            "--chunk-frames", "16", "--detector", "dlib", "--model-cpus", "0.5", "--workdir", str(tmp_path / "work")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "edited videos:" in printed and "45 of 45 frames edited" in printed
    assert instants(output) == instants(edit_clips["short.mp4"])
    assert video.audio_packets(output) == video.audio_packets(edit_clips["short.mp4"])
    row = results.read_results(OutputStore(tmp_path / "out"))["talk_smile.mp4"]
    assert row.status == results.OK and row.preview_video.endswith(".mp4") and os.path.isfile(row.preview_sheet)
    written = output.stat().st_mtime_ns
    assert main(argv) == 0
    assert re.search(r"skipped \(done before\)\s+1\n", capsys.readouterr().out)
    assert output.stat().st_mtime_ns == written


def test_a_wrong_checkpoint_stops_the_command_before_any_work(edit_clips, tmp_path, capsys):
    bad = tmp_path / "dpe.pt"
    import torch

    torch.save({"gen": {"enc.net_app.convs.0.0.weight": torch.zeros(3)}}, bad)
    argv = ["edit", "--source", str(edit_clips["short.mp4"]), "--driving", str(edit_clips["driving.mp4"]),
            "--checkpoint", str(bad), "-o", str(tmp_path / "out" / "x.mp4")]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "does not match the model" in error and "missing keys" in error
    assert not (tmp_path / "out").exists()
    assert main(["edit", "--checkpoint", str(bad), "-o", str(tmp_path / "out")]) == 2
    assert "exactly one of --source, --jobs, --sources" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_stops_feeding_work_records_what_finished_and_says_how_to_resume(edit_clips, tiny_checkpoint, tmp_path,
                                                                                ray_cluster, prefect_harness, capsys,
                                                                                monkeypatch):
    monkeypatch.setattr(results, "PART_ROWS", 1)  # each finished job is on disk at once: the signal follows it
    # blocks packed as for a long queue: two jobs per analysis and joining task, chunks in bundles of two
    monkeypatch.setattr(runner, "block_sizes", lambda todo, cpus, chunk_frames: (2, 2 * chunk_frames))
    archive = tmp_path / "archive"
    archive.mkdir()
    for number in range(6):
        shutil.copy(edit_clips["short.mp4"], archive / f"v{number}.mp4")
    output = tmp_path / "out"
    argv = ["edit", "--sources", str(archive), "--driving", str(edit_clips["driving.mp4"]), "--checkpoint",
            str(tiny_checkpoint), "-o", str(output), "--preset", "ultrafast", "--chunk-frames", "16", "--detector",
            "dlib", "--model-cpus", "0.5", "--workdir", str(tmp_path / "work")]
    sent: list[float] = []

    def terminate_after_the_first_job() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list((output / results.PARTS_PATH).glob("*.parquet")):
            time.sleep(0.05)
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)  # as Kubernetes or `ray job stop` would

    threading.Thread(target=terminate_after_the_first_job, daemon=True).start()
    try:
        assert main(argv) == 130  # stopped, as prepare and train exit
        assert time.monotonic() - sent[0] < 20, "the run ends within 20 s of SIGTERM"
    finally:
        clear_stop()
    assert "run the same command again to resume" in capsys.readouterr().err
    rows = results.read_results(OutputStore(output))
    assert 1 <= len(rows) < 6 and all(row.status == results.OK for row in rows.values()), "what finished is recorded"
    assert all((output / name).exists() for name in rows)
    assert main(argv) == 0, "the same command resumes"
    assert re.search(rf"skipped \(done before\)\s+{len(rows)}\n", capsys.readouterr().out)
    assert sorted(results.read_results(OutputStore(output))) == [f"v{number}.mp4" for number in range(6)]


@pytest.mark.slow
def test_on_a_cluster_a_local_output_a_node_cannot_see_is_refused_in_one_line(two_node_cluster, edit_clips,
                                                                               tiny_checkpoint, prefect_harness):
    from prefect.settings import PREFECT_API_URL

    hidden = two_node_cluster.private / "edited"
    done = subprocess.run([sys.executable, "-m", "flows.cli", "edit", "--source", str(edit_clips["short.mp4"]),
                           "--driving", str(edit_clips["driving.mp4"]), "--checkpoint", str(tiny_checkpoint),
                           "-o", str(hidden)], cwd=REPO,
                          env={**two_node_cluster.env(), "PREFECT_API_URL": str(PREFECT_API_URL.value()),
                               "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"portrait edit: --output {hidden}: a local path that 1 of the cluster's 2 nodes") \
        and "object-store location" in last
    assert not (hidden / "short.mp4").exists()
