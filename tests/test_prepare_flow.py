"""The prepare job end to end: real yt-dlp from a loopback server, real detector, real Ray, real Prefect."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from flows.cli import main
from pipelines.dataset import integrity, manifest
from pipelines.dataset.inspect import FRAMES_PER_ROW, LABEL_HEIGHT, TILE
from pipelines.dataset.layout import PARTS_PREFIX, SUMMARY_PATH, claim_output, stats_path
from pipelines.dataset.schema import ClipSample, SampleMeta
from pipelines.dataset.shards import read_samples, read_stats
from pipelines.prepare import job as prepare
from pipelines.prepare.requests import ClipRequest
from pipelines.prepare.batch import Batch
from pipelines.prepare.settings import PrepareSettings, SampleFormat
from pipelines.prepare.sources import SourceInputs
from pipelines.prepare.worker import ClipOutcome
from pipelines.sample.metadata import serve_sample_inputs
from pipelines.storage import OutputStore, is_temporary

pytestmark = pytest.mark.slow

CROP_SIZE = SampleFormat().crop_size

EXPECTED_FAILURES = {
    "id20002/missing/0-2000": "not_found",
    "id20003/noface/0-3000": "no_face",
    "id20004/twofaces/0-3000": "multiple_faces",
    "id20001/talk/20000-24000": "span_outside_video",
    "id20005/corrupt/6000-9000": "no_video_in_span",
}


def _settings(tmp: Path, **overrides) -> PrepareSettings:
    base = PrepareSettings(output=str(tmp / "out"), workdir=str(tmp / "work"), detector="dlib", shard_size_mb=2.0,
                           videos_per_batch=3, retries=1, backoff_base_s=0.1, socket_timeout_s=3.0)
    return replace(base, **overrides)


def _all_samples(output: Path):
    store = OutputStore(str(output))
    shards = [str(store.local_path(p)) for p in store.list() if p.endswith(".tar")]
    return list(read_samples(sorted(shards)))


def _temporaries(store: OutputStore) -> list[str]:
    return [p for p in store.list(include_temporaries=True) if is_temporary(p.rsplit("/", 1)[-1])]


def _shard_files(output: Path) -> list[str]:
    return sorted(p for p in OutputStore(str(output)).list() if p.endswith(".tar"))


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory, ray_cluster, prefect_harness):
    """The README's main command, run once: `portrait prepare --sample` with a contact sheet."""
    output = tmp_path_factory.mktemp("prepare") / "out"
    argv = ["prepare", "--sample", "--output", str(output), "--detector", "dlib", "--shard-size-mb", "2",
            "--videos-per-batch", "3", "--retries", "1", "--contact-sheet"]
    assert main(argv) == 0
    return argv, output, json.loads((output / SUMMARY_PATH).read_text())


def test_good_clips_are_prepared_and_bad_ones_recorded_with_their_cause(sample_run):
    _, output, summary = sample_run
    state = manifest.load_state(OutputStore(str(output)))
    by_id = {row.clip_id: row for row in state.values()}
    ok = {cid for cid, row in by_id.items() if row.status == manifest.OK}
    assert {"id10001/talk/00001", "id00002/talk/00001", "id00002/talk/00002", "id20001/talk/800-3800"} <= ok
    for clip_id, failure_class in EXPECTED_FAILURES.items():
        assert by_id[clip_id].status == manifest.FAILED
        assert by_id[clip_id].failure_class == failure_class, by_id[clip_id].message
        assert by_id[clip_id].message
    for row in state.values():  # the manifest records the stages the worker measured
        if row.status == manifest.OK:
            assert None not in [getattr(row, column) for column in manifest.TIMING_COLUMNS], row
    rejected = {row.failure_class for row in state.values() if row.clip_id.startswith("invalid:")}
    assert rejected == {"bad_metadata", "duplicate_clip"}
    assert summary["ok"] == len(ok) and summary["failed"] == len(by_id) - len(ok)


def test_shards_hold_each_prepared_clip_once_with_consistent_annotations(sample_run):
    _, output, _ = sample_run
    samples = _all_samples(output)
    keys = [s.key for s in samples]
    assert len(keys) == len(set(keys))
    state = manifest.load_state(OutputStore(str(output)))
    assert sorted(keys) == sorted(r.key for r in state.values() if r.status == manifest.OK)
    for sample in samples:
        frames = len(sample.landmarks)
        assert sample.boxes.shape == (frames, 4) and sample.pose.shape == (frames, 6)
        assert sample.expression.shape == (frames, 68, 2)
        assert sample.meta.frames == frames and sample.meta.fps == 25.0
        start, end = sample.meta.span
        assert end - start == pytest.approx(frames / 25.0)
        inside = (sample.landmarks >= 0) & (sample.landmarks < CROP_SIZE)
        assert inside.all(), f"{sample.key}: landmarks leave the crop"


def test_splits_are_written_as_separate_shard_sets(sample_run):
    _, output, summary = sample_run
    assert set(summary["shards"]) == {"train", "test"}
    for sample in _all_samples(output):
        assert f"/{sample.meta.split}/" in sample.shard


def test_contact_sheet_shows_every_prepared_clip(sample_run):
    _, output, summary = sample_run
    sheet = cv2.imread(str(output / "contact_sheet.png"))
    assert sheet is not None and sheet.shape[1] == FRAMES_PER_ROW * TILE
    assert sheet.shape[0] == summary["ok"] * (TILE + LABEL_HEIGHT)


def test_rerun_resumes_without_redoing_or_duplicating(sample_run):
    argv, output, first = sample_run
    shards_before = _shard_files(output)
    parts_before = OutputStore(str(output)).list(PARTS_PREFIX)
    assert main(argv) == 0
    assert json.loads((output / SUMMARY_PATH).read_text()) == first
    assert _shard_files(output) == shards_before
    assert OutputStore(str(output)).list(PARTS_PREFIX) == parts_before, "a rerun committed new work"


def test_shards_lost_behind_the_manifests_back_are_reported_and_redone(sample_run, tmp_path, capsys):
    argv, output, first = sample_run
    store = OutputStore(str(output))
    missing, tampered = _shard_files(output)[:2]
    lost_keys = set(read_stats(store, missing).keys) | set(read_stats(store, tampered).keys)
    (output / missing).unlink()
    stats = json.loads(store.read_bytes(stats_path(tampered)))
    stats["keys"] = stats["keys"][:-1] + ["kinvented"]
    store.write_bytes_atomic(stats_path(tampered), json.dumps(stats).encode())
    capsys.readouterr()

    assert main(["inspect", str(output), "--sheet", str(tmp_path / "sheet.png")]) == 1
    report = capsys.readouterr().out
    assert f"MISSING shard {missing}" in report and "keys differ" in report

    assert main(argv) == 0
    state = manifest.load_state(store)
    ok = {row.key: row for row in state.values() if row.status == manifest.OK}
    assert lost_keys <= set(ok) and len(ok) == first["ok"]
    assert all(ok[key].attempt >= 2 and ok[key].shard not in (missing, tampered) for key in lost_keys)
    keys = [sample.key for sample in _all_samples(output)]
    assert sorted(keys) == sorted(ok), "every ok clip is in exactly one shard"
    history = [row for row in manifest.read_parts(store) if row.failure_class == "shard_lost"]
    assert {row.key for row in history} == lost_keys and all(row.message for row in history)
    assert main(["inspect", str(output), "--sheet", str(tmp_path / "sheet.png")]) == 0


def test_crash_between_shard_and_manifest_commit_leaves_no_duplicate(ray_cluster, tmp_path, monkeypatch):
    settings = _settings(tmp_path)
    with serve_sample_inputs(tmp_path / "work" / "sample") as (inputs, template):
        settings = replace(settings, url_template=template)
        stalled = tmp_path / "stalled.txt"
        stalled.write_text(Path(inputs.urls[0]).read_text().replace("/talk.mp4", "/stall/talk.mp4"))
        _crash_then_resume(SourceInputs(vox1_txt=inputs.vox1_txt), SourceInputs(vox1_txt=inputs.vox1_txt,
                           urls=(str(stalled),)), settings, monkeypatch)


def _crash_then_resume(vox1: SourceInputs, vox1_and_stalled: SourceInputs, settings: PrepareSettings,
                       monkeypatch) -> None:
    real_write_part = manifest.write_part

    def crash(store, batch_name, rows, **kwargs):
        if not batch_name.endswith("inputs"):
            raise OSError("disk full (injected)")
        return real_write_part(store, batch_name, rows, **kwargs)

    monkeypatch.setattr(manifest, "write_part", crash)
    first = prepare.plan(vox1, settings)
    with pytest.raises(OSError):
        prepare.run_batch(first.batches[0], first, settings)
    store = OutputStore(settings.output)
    assert _shard_files(Path(settings.output)), "the shard was committed before the crash"
    monkeypatch.setattr(manifest, "write_part", real_write_part)

    plan = prepare.plan(vox1_and_stalled, settings)  # the resume also meets a server that never answers
    assert _shard_files(Path(settings.output)) == [], "the interrupted batch's shard must be gone"
    for batch in plan.batches:
        prepare.run_batch(batch, plan, settings)
    summary = prepare.finalize(plan, settings)
    assert integrity.reconcile(store, manifest.read_states(store), integrity.read_run_records(store),
                               repair=False).removed_shards == []
    keys = [s.key for s in _all_samples(Path(settings.output))]
    assert len(keys) == 1
    assert summary["ok"] == 1 and summary["by_failure_class"] == {"timeout": 1}


def _stub_sample(request: ClipRequest) -> ClipSample:
    frames = 4
    meta = SampleMeta(clip_id=request.clip_id, identity=request.identity, video_id=request.video_id, url=request.url,
                      split=request.split, source=request.source, requested_span=(0.0, 0.16), span=(0.0, 0.16),
                      fps=25.0, frames=frames, crop_size=CROP_SIZE, source_size=(352, 288), detector="dlib")
    return ClipSample(key=request.key, mp4=b"\0" * 4000, boxes=np.zeros((frames, 4)),
                      landmarks=np.full((frames, 68, 2), 100.0), pose=np.zeros((frames, 6)),
                      expression=np.zeros((frames, 68, 2)), meta=meta)


def _one_batch_on_ray(tmp_path: Path, requests: list[ClipRequest]) -> tuple[PrepareSettings, OutputStore, Batch]:
    """A claimed output, and one batch of `requests` (a video per group, in order) recorded in its run."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules
    settings = _settings(tmp_path)
    store = OutputStore(settings.output)
    claim_output(store, settings.sample_format.record("dlib"))
    videos = list(dict.fromkeys(r.video_id for r in requests))
    batch = Batch("run-00000", tuple(tuple(r for r in requests if r.video_id == v) for v in videos),
                  {r.clip_id: 1 for r in requests})
    integrity.write_run_record(store, integrity.RunRecord("run-window", (batch.name,), ("train",)))
    return settings, store, batch


def _sigkill_on_noface(requests, settings):
    """Clips of 'talk' are prepared (into the batch's open shard); 'noface' SIGKILLs its worker mid-shard."""
    if requests[0].video_id == "noface":
        os.kill(os.getpid(), signal.SIGKILL)  # an OOM kill or a segfault takes no clip of another video with it
    return [ClipOutcome(r, sample=_stub_sample(r), timings=dict.fromkeys(manifest.TIMING_COLUMNS, 0.1))
            for r in requests]


def test_a_worker_killed_mid_shard_leaves_no_named_or_kept_partial_shard(ray_cluster, tmp_path):
    requests = [ClipRequest(clip_id=f"{v}/c", video_id=v, url=f"http://127.0.0.1:9/{v}.mp4", identity="i")
                for v in ("talk", "noface", "other")]
    settings, store, batch = _one_batch_on_ray(tmp_path, requests)
    assert prepare.run_batch(batch, prepare.Run("run", "dlib"), settings, work=_sigkill_on_noface) == \
        {"ok": 2, "failed": 1}
    state = manifest.load_state(store)
    assert {row.video_id: row.failure_class or row.status for row in state.values()} == \
        {"talk": "ok", "noface": "worker_failed", "other": "ok"}
    assert _temporaries(store), "the killed worker left its open shard behind"
    prepare.finalize(prepare.Run("run", "dlib"), settings)
    check = integrity.reconcile(store, manifest.read_states(store), integrity.read_run_records(store), repair=False)
    assert check.lost == {} and check.removed_shards == [], "every shard the manifest names is whole and agrees"
    assert _temporaries(store) == [], "the half-written shard is gone"
    keys = [sample.key for sample in _all_samples(Path(settings.output))]
    assert sorted(keys) == sorted(r.key for r in requests if r.video_id != "noface")


def _stopped_during_the_second_video(requests, settings):
    """Stub work: the stop comes while 'second' is prepared (it still finishes); 'third' must not start."""
    import time

    import ray

    if requests[0].video_id == "second":
        (Path(settings.download_dir) / "second-started").touch()
        deadline = time.monotonic() + 60
        while not ray.get_runtime_context().is_canceled() and time.monotonic() < deadline:
            time.sleep(0.05)
    return [ClipOutcome(r, sample=_stub_sample(r), timings=dict.fromkeys(manifest.TIMING_COLUMNS, 0.1))
            for r in requests]


def test_a_stopped_batch_commits_the_videos_it_finished(ray_cluster, tmp_path):
    import threading
    import time

    from pipelines.runtime import clear_stop, request_stop

    requests = [ClipRequest(clip_id=f"{v}/c{k}", video_id=v, url=f"http://127.0.0.1:9/{v}.mp4", identity="i",
                            start_s=float(k), end_s=k + 1.0) for v in ("first", "second", "third") for k in range(2)]
    settings, store, batch = _one_batch_on_ray(tmp_path, requests)
    started = Path(settings.work_path / "downloads" / "second-started")
    started.parent.mkdir(parents=True, exist_ok=True)

    def stop_once_the_second_video_runs() -> None:
        deadline = time.monotonic() + 120
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        request_stop()

    stopper = threading.Thread(target=stop_once_the_second_video_runs, daemon=True)
    stopper.start()
    try:
        counts = prepare.run_batch(batch, prepare.Run("run", "dlib"), settings, work=_stopped_during_the_second_video)
    finally:
        stopper.join()
        clear_stop()
    assert counts == {"ok": 4, "failed": 0, "stopped": 1}
    state = manifest.load_state(store)
    assert sorted(state) == [r.clip_id for r in requests if r.video_id != "third"], "finished videos are committed"
    check = integrity.reconcile(store, manifest.read_states(store), integrity.read_run_records(store), repair=False)
    assert check.lost == {} and check.removed_shards == [] and _temporaries(store) == []
    assert sorted(s.key for s in _all_samples(Path(settings.output))) == sorted(r.key for r in requests[:4])
    attempts, again = manifest.read_states(store).attempts()
    assert prepare.pending(requests, attempts, again) == requests[4:], "a rerun prepares only the video never started"
