"""Local paths are resolved once, on the driver; a worker that cannot see what the driver saw says so."""

from __future__ import annotations

import os

import pytest

from pipelines.options import absolute_location, build
from pipelines.storage import LocationNotVisible, require_visible
from pipelines.train.settings import TrainSettings


def test_local_paths_become_absolute_against_the_working_folder_and_uris_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_location("out/sample") == str(tmp_path / "out" / "sample")
    assert absolute_location("~/data") == os.path.join(os.path.expanduser("~"), "data")
    assert absolute_location("/already/absolute") == "/already/absolute"
    for uri in ("s3://bucket/ds", "gs://bucket/x", "file:///tmp/x", "http://127.0.0.1:8000/a.mp4"):
        assert absolute_location(uri) == uri
    assert absolute_location(None) is None and absolute_location("") == ""


def test_training_paths_are_resolved_before_workers_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = build(TrainSettings, {"data": "out/sample", "run_dir": "runs", "init": "s3://models/dpe.pt"})
    assert settings.data == str(tmp_path / "out" / "sample") and settings.run_dir == str(tmp_path / "runs")
    assert settings.init == "s3://models/dpe.pt" and settings.vgg_weights is None


def test_a_location_the_worker_cannot_see_is_named_with_the_fix(tmp_path):
    (tmp_path / "shards.json").write_text("{}")
    require_visible(str(tmp_path), "shards.json", "--data")  # visible: no error
    with pytest.raises(LocationNotVisible) as raised:
        require_visible(str(tmp_path / "elsewhere"), "shards.json", "--data")
    message = str(raised.value)
    assert f"--data {tmp_path / 'elsewhere'}" in message and "cannot see shards.json" in message
    assert "driver could" in message and "object storage" in message


def test_a_worker_group_failure_about_the_data_is_reported_as_itself():
    from ray.train import WorkerGroupError

    from pipelines.train.clips import TrainingDataError
    from pipelines.train.job import _input_problem

    invisible = LocationNotVisible("--data /x: this worker cannot see shards.json")
    wrapped = RuntimeError("worker crashed")
    wrapped.__cause__ = invisible
    assert _input_problem(WorkerGroupError("boom", {0: ValueError("other"), 1: wrapped})) is invisible
    empty = TrainingDataError("no usable clip left")
    assert _input_problem(WorkerGroupError("boom", {0: empty})) is empty
    assert _input_problem(WorkerGroupError("boom", {0: ValueError("a bug")})) is None
