"""The `prepare_dataset` Prefect flow: orchestration only, the work lives in `pipelines.prepare.job`.

Tasks work on batches of videos (never one Prefect task per clip or frame), at most
`--batches-in-flight` at once, submitted as the plan streams from the metadata; each batch is one
Ray task that prepares its videos one after another and writes its own shards, so no clip byte
passes through the driver. Without PREFECT_API_URL the flow starts Prefect's temporary local server;
without RAY_ADDRESS it starts a local Ray. Its parameters are the options of `portrait prepare`
(plain values, validated by Prefect and shown as a form in its UI).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
from dataclasses import replace

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectConcurrentFuture
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.services import stop_on_signals
from pipelines.options import build
from pipelines.prepare import job
from pipelines.prepare.settings import MAX_BATCHES_IN_FLIGHT, PrepareSettings, SourceInputs
from pipelines.prepare.summary import summary_markdown, summary_text
from pipelines.runtime import clear_stop, ensure_ray, require_shared, stop_requested

_DEFAULTS = PrepareSettings()

LOG = logging.getLogger(__name__)

POLL_S = 0.2
"""How often the flow looks at its batches in flight (and at a stop request)."""


@task(name="prepare-batch", retries=1, retry_delay_seconds=10, task_run_name="batch-{batch.name}",
      cache_policy=NO_CACHE)
def prepare_batch_task(batch: job.Batch, run: job.Run, settings: PrepareSettings) -> dict[str, int]:
    """Download, track, crop and shard one batch of videos on Ray; returns its ok/failed counts.

    It gets its batch and the run's settings, never the plan (Prefect walks every parameter of
    every task it submits). Retried once by Prefect (a lost Ray node, a full disk freed meanwhile);
    a retry rewrites the batch's shards under the same names, so nothing is duplicated.
    """
    return job.run_batch(batch, run, settings)


@task(name="finalize", cache_policy=NO_CACHE)
def finalize_task(run: job.Run, settings: PrepareSettings) -> dict:
    """Drop shards of failed batches, consolidate the manifest, and summarise."""
    return job.finalize(run, settings)


@flow(name="prepare_dataset", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=MAX_BATCHES_IN_FLIGHT))
def prepare_dataset(
    vox1_txt: list[str] | None = None,
    vox2_txt: list[str] | None = None,
    clips: list[str] | None = None,
    urls: list[str] | None = None,
    sample: bool = False,
    face_fraction: float = _DEFAULTS.face_fraction,
    face_centre_x: float = _DEFAULTS.face_centre_x,
    face_centre_y: float = _DEFAULTS.face_centre_y,
    output: str = _DEFAULTS.output,
    workdir: str | None = _DEFAULTS.workdir,
    url_template: str = _DEFAULTS.url_template,
    detector: str = _DEFAULTS.detector,
    detect_every: int = _DEFAULTS.detect_every,
    min_face_px: float = _DEFAULTS.min_face_px,
    min_track_fraction: float = _DEFAULTS.min_track_fraction,
    max_outside_fraction: float = _DEFAULTS.max_outside_fraction,
    face: str = _DEFAULTS.face,
    min_clip_frames: int = _DEFAULTS.min_clip_frames,
    shard_size_mb: float = _DEFAULTS.shard_size_mb,
    videos_per_batch: int = _DEFAULTS.videos_per_batch,
    batches_in_flight: int | None = _DEFAULTS.batches_in_flight,
    test_fraction: float = _DEFAULTS.test_fraction,
    retry_failed: bool = _DEFAULTS.retry_failed,
    contact_sheet: bool = _DEFAULTS.contact_sheet,
    allow_file_urls: bool = _DEFAULTS.allow_file_urls,
    rate_limit: str | None = _DEFAULTS.rate_limit,
    sleep: float = _DEFAULTS.sleep,
    cookies: str | None = _DEFAULTS.cookies,
    proxy: str | None = _DEFAULTS.proxy,
    retries: int = _DEFAULTS.retries,
    ray_address: str | None = _DEFAULTS.ray_address,
) -> dict:
    """Prepare VoxCeleb-style clips into WebDataset shards plus a Parquet manifest.

    Inputs by kind: `vox1_txt` / `vox2_txt` VoxCeleb metadata trees, `clips` clip tables (CSV or
    Parquet), `urls` lists of whole videos; `sample` adds the bundled sample, served on loopback
    while the flow runs. `output` is a local folder or an s3:// / gs:// URI; a rerun with the same
    output only does what is missing. The other parameters are those of `portrait prepare --help`.
    Returns the summary (counts by status and failure class, shards per split).
    """
    values = locals()
    inputs, settings = build(SourceInputs, values), build(PrepareSettings, values)
    with contextlib.ExitStack() as stack:
        if inputs.sample:
            inputs, settings = stack.enter_context(_with_sample(inputs, settings))
        inputs.check()
        clear_stop()
        stack.enter_context(stop_on_signals("prepare"))
        summary = _run(inputs, settings)
    if settings.contact_sheet and summary.get("ok") and not summary.get("stopped"):
        from pipelines.dataset.inspect import write_contact_sheet

        print(f"contact sheet: {write_contact_sheet(settings.output)}")
    return summary


@contextlib.contextmanager
def _with_sample(inputs: SourceInputs, settings: PrepareSettings):
    """The bundled sample added to the inputs, its loopback server running while the block runs."""
    from pipelines.sample.metadata import serve_sample_inputs

    with serve_sample_inputs(settings.work_path / "sample") as (sample, template):
        merged = replace(inputs, sample=False, **{kind: getattr(sample, kind) + getattr(inputs, kind)
                                                  for kind in ("vox1_txt", "vox2_txt", "clips", "urls")})
        yield merged, replace(settings, url_template=template)


def _run(inputs: SourceInputs, settings: PrepareSettings) -> dict:
    ensure_ray(settings.ray_address)  # here, on the flow's main thread, not inside a task's thread
    require_shared(settings.output, "--output", output=True)  # workers write the shards
    in_flight_limit = settings.batches_in_flight or min(MAX_BATCHES_IN_FLIGHT, _cluster_cpus())
    planner = job.Planner(inputs, settings)
    logger = get_run_logger()
    logger.info("run %s: planning as the metadata is read (detector %s)", planner.run_id, planner.run.detector)
    in_flight: list[PrefectConcurrentFuture] = []
    failed_batches = 0
    for batch in planner.batches(window=max(job.PLAN_WINDOW, 4 * in_flight_limit)):
        while len(in_flight) >= in_flight_limit and not stop_requested():
            in_flight, failed = _settle(in_flight)
            failed_batches += failed
        if stop_requested():
            logger.warning("stop requested: no more batches are started; those in flight commit what they finish")
            break
        in_flight.append(prepare_batch_task.submit(batch, planner.run, settings))
    logger.info(planner.describe() if not stop_requested() else f"stopped after planning: {planner.describe()}")
    job.record_parse_failures(planner, settings)
    while in_flight:
        in_flight, failed = _settle(in_flight)
        failed_batches += failed
    summary = finalize_task(planner.run, settings)
    create_markdown_artifact(key="prepare-dataset-summary", markdown=summary_markdown(summary),
                             description=f"Dataset preparation into {settings.output}")
    print(summary_text(summary))
    if stop_requested():
        return {**summary, "stopped": True}
    if failed_batches:
        raise RuntimeError(
            f"{failed_batches} batch(es) failed after retries; their clips are not in the manifest. "
            f"Rerun the same command to resume them."
        )
    return summary


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _settle(in_flight: list[PrefectConcurrentFuture]) -> tuple[list[PrefectConcurrentFuture], int]:
    """Wait a moment for a batch in flight to end; return those still running and how many of the
    ended ones failed (read from the futures themselves, not by asking the Prefect API)."""
    concurrent.futures.wait([future.wrapped_future for future in in_flight], timeout=POLL_S,
                            return_when=concurrent.futures.FIRST_COMPLETED)
    ended = [future for future in in_flight if future.wrapped_future.done()]
    for future in ended:
        future.wait(0)
    return [f for f in in_flight if f not in ended], sum(not f.state.is_completed() for f in ended)
