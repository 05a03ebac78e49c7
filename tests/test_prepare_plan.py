"""Planning a run: what a rerun does again, and a wrong detector stopping the run up front."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.dataset import integrity, manifest
from pipelines.dataset.layout import claim_output
from pipelines.prepare import job as prepare
from pipelines.prepare.requests import manifest_row
from pipelines.prepare.settings import PrepareSettings
from pipelines.prepare.sources import SourceInputs, parse_sources
from pipelines.prepare.sources.voxceleb import VoxUtterance, write_voxceleb_tree
from pipelines.storage import OutputStore

FAILURES = {"a": "worker_failed", "b": "not_found", "c": "corrupt_video", "d": "timeout", "e": "no_face"}


def _inputs(tmp_path: Path) -> SourceInputs:
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"http://127.0.0.1:9/{name}.mp4\n" for name in FAILURES))
    return SourceInputs(urls=(str(urls),))


def _fail_everything(inputs: SourceInputs, settings: PrepareSettings) -> None:
    requests, _ = parse_sources(inputs)
    by_name = {r.url.rsplit("/", 1)[1][0]: r for r in requests}
    rows = [manifest_row(by_name[n], status=manifest.FAILED, attempt=1, failure_class=failure, message="injected")
            for n, failure in FAILURES.items()]
    store = OutputStore(settings.output)
    claim_output(store, settings.sample_format.record("dlib"))
    manifest.write_part(store, "earlier-run", rows)


def _planned(plan: prepare.Plan) -> set[str]:
    return {r.url.rsplit("/", 1)[1][0] for batch in plan.batches for group in batch.groups for r in group}


def test_a_rerun_retries_machine_failures_but_not_what_the_video_itself_caused(tmp_path):
    settings = PrepareSettings(output=str(tmp_path / "out"), workdir=str(tmp_path / "work"), detector="dlib")
    inputs = _inputs(tmp_path)
    _fail_everything(inputs, settings)
    assert _planned(prepare.plan(inputs, settings)) == {"a", "c", "d"}
    everything = prepare.plan(inputs, PrepareSettings(**{**settings.__dict__, "retry_failed": True}))
    assert _planned(everything) == set(FAILURES)
    assert all(v == 2 for batch in everything.batches for v in batch.attempts.values())


def test_a_detector_that_cannot_be_built_stops_the_run_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="--detector: 'nope': must be one of auto, dlib, face-alignment"):
        prepare.plan(_inputs(tmp_path), PrepareSettings(output=str(tmp_path / "out"), workdir=str(tmp_path / "work"),
                                                        detector="nope"))
    assert not (tmp_path / "out").exists()


def test_the_plan_streams_from_the_metadata_a_window_at_a_time(tmp_path):
    utterances = [VoxUtterance(f"id{v % 7:05d}", f"video{v:04d}", f"{u:05d}", frames=[1 + 100 * u, 60 + 100 * u],
                              boxes=[(0.3, 0.2, 0.3, 0.4)] * 2)
                  for v in range(60) for u in range(2)]
    write_voxceleb_tree(tmp_path / "vox2", utterances, version=2)
    settings = PrepareSettings(output=str(tmp_path / "out"), workdir=str(tmp_path / "work"), detector="dlib",
                               videos_per_batch=2)
    planner = prepare.Planner(SourceInputs(vox2_txt=(str(tmp_path / "vox2"),)), settings)
    store = OutputStore(settings.output)
    batches = planner.batches(window=3)
    first = next(batches)
    assert planner.requested == 3 * 2 * 2, "only the first window of batches is read before work starts"
    records = integrity.read_run_records(store)
    assert [r.batches for r in records] == [tuple(f"{planner.run_id}-{i:05d}" for i in range(3))]
    assert [r.clip_id for g in first.groups for r in g] == ["id00000/video0000/00000", "id00000/video0000/00001",
                                                            "id00000/video0007/00000", "id00000/video0007/00001"]
    rest = list(batches)
    assert planner.requested == 120 and planner.batch_count == 1 + len(rest) == 30
    recorded = [name for record in integrity.read_run_records(store) for name in record.batches]
    assert sorted(recorded) == sorted(b.name for b in [first, *rest]), "every batch is in a run record"
    assert len({r.clip_id for b in [first, *rest] for g in b.groups for r in g}) == 120
