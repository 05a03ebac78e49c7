"""Planning a run: what a rerun does again, and a wrong detector stopping the run up front."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.dataset import manifest
from pipelines.dataset.layout import claim_output
from pipelines.prepare import job as prepare
from pipelines.prepare.requests import manifest_row
from pipelines.prepare.settings import PrepareSettings
from pipelines.prepare.sources import SourceInputs, parse_sources
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
