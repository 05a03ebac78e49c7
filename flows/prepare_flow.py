"""The `prepare_dataset` Prefect flow: orchestration only, the work lives in `pipelines.prepare.job`.

Tasks work on batches of videos (never one Prefect task per clip or frame); inside a batch each
video is one Ray task. Without PREFECT_API_URL the flow starts Prefect's temporary local server;
without RAY_ADDRESS it starts a local Ray. Its parameters are the options of `portrait prepare`
(plain values, validated by Prefect and shown as a form in its UI).
"""

from __future__ import annotations

import contextlib
import logging

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from pipelines.media.framing import Framing
from pipelines.media.tracking import TrackingConfig
from pipelines.prepare import job, report
from pipelines.prepare.settings import (
    DEFAULT_URL_TEMPLATE,
    DownloadOptions,
    PrepareSettings,
    SampleFormat,
    settings_from_options,
)
from pipelines.prepare.sources import SourceInputs
from pipelines.runtime import ensure_ray
from pipelines.storage import absolute_location

LOG = logging.getLogger(__name__)

BATCHES_AT_ONCE = 2
"""Batches in flight: enough to keep Ray busy while one batch drains, few enough that batches
commit in order (an interrupted run keeps most of its work) and open shards stay few."""


@task(name="plan")
def plan_task(inputs: SourceInputs, settings: PrepareSettings) -> job.Plan:
    """Claim and check the output, parse every input and subtract what earlier runs finished."""
    plan = job.plan(inputs, settings)
    get_run_logger().info(plan.describe())
    return plan


@task(name="prepare-batch", retries=1, retry_delay_seconds=10, task_run_name="batch-{batch.name}")
def prepare_batch_task(batch: job.Batch, plan: job.Plan, settings: PrepareSettings) -> dict[str, int]:
    """Download, track, crop and shard one batch of videos on Ray; returns its ok/failed counts.

    Retried once by Prefect (a lost Ray node, a full disk freed meanwhile); a retry rewrites the
    batch's shards under the same names, so nothing is duplicated.
    """
    return job.run_batch(batch, plan, settings)


@task(name="finalize")
def finalize_task(plan: job.Plan, settings: PrepareSettings) -> dict:
    """Drop shards of failed batches, consolidate the manifest, and summarise."""
    return job.finalize(plan, settings)


@flow(name="prepare_dataset", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=BATCHES_AT_ONCE))
def prepare_dataset(
    output: str = PrepareSettings.output,
    vox1_txt: list[str] | None = None,
    vox2_txt: list[str] | None = None,
    clips: list[str] | None = None,
    urls: list[str] | None = None,
    sample: bool = False,
    workdir: str | None = None,
    url_template: str = DEFAULT_URL_TEMPLATE,
    detector: str = PrepareSettings.detector,
    detect_every: int = TrackingConfig.detect_stride,
    min_face_px: float = TrackingConfig.min_face_px,
    min_track_fraction: float = TrackingConfig.min_track_fraction,
    max_outside_fraction: float = TrackingConfig.max_outside_fraction,
    face: str = TrackingConfig.face_policy,
    min_clip_frames: int = SampleFormat.min_clip_frames,
    face_fraction: float = Framing.face_fraction,
    face_centre_x: float = Framing.centre_x,
    face_centre_y: float = Framing.centre_y,
    shard_size_mb: float = PrepareSettings.shard_bytes / 2**20,
    videos_per_batch: int = PrepareSettings.videos_per_batch,
    test_fraction: float = PrepareSettings.test_fraction,
    retry_failed: bool = False,
    allow_file_urls: bool = False,
    rate_limit: str | None = None,
    sleep: float = DownloadOptions.sleep_between_s,
    cookies: str | None = None,
    proxy: str | None = None,
    retries: int = DownloadOptions.retries,
    ray_address: str | None = None,
) -> dict:
    """Prepare VoxCeleb-style clips into WebDataset shards plus a Parquet manifest.

    Inputs by kind: `vox1_txt` / `vox2_txt` VoxCeleb metadata trees, `clips` clip tables (CSV or
    Parquet), `urls` lists of whole videos; `sample` adds the bundled sample, served on loopback
    while the flow runs. `output` is a local folder or an s3:// / gs:// URI; a rerun with the same
    output only does what is missing. The other parameters are those of `portrait prepare --help`.
    Returns the summary (counts by status and failure class, shards per split).
    """
    options = dict(locals())
    for name in ("output", "workdir", "cookies"):
        options[name] = absolute_location(options[name])
    inputs = SourceInputs(*(tuple(absolute_location(path) for path in options.pop(kind) or ())
                            for kind in ("vox1_txt", "vox2_txt", "clips", "urls")))
    settings = settings_from_options(**{name: value for name, value in options.items() if name != "sample"})
    with contextlib.ExitStack() as stack:
        if sample:
            inputs, settings = stack.enter_context(_with_sample(inputs, settings))
        inputs.check()
        return _run(inputs, settings)


@contextlib.contextmanager
def _with_sample(inputs: SourceInputs, settings: PrepareSettings):
    """The bundled sample added to the inputs, its loopback server running while the block runs."""
    from dataclasses import replace

    from pipelines.sample.metadata import serve_sample_inputs

    with serve_sample_inputs(settings.work_path / "sample") as (sample, template):
        merged = SourceInputs(*(tuple(getattr(sample, kind)) + tuple(getattr(inputs, kind))
                                for kind in ("vox1_txt", "vox2_txt", "clips", "urls")))
        yield merged, replace(settings, download=replace(settings.download, url_template=template))


def _run(inputs: SourceInputs, settings: PrepareSettings) -> dict:
    ensure_ray(settings.ray_address)  # here, on the flow's main thread, not inside a task's thread
    plan = plan_task(inputs, settings)
    job.record_parse_failures(plan, settings)
    futures = [prepare_batch_task.submit(batch, plan, settings) for batch in plan.batches]
    for future in futures:
        future.wait()
    failed_batches = [f for f in futures if not f.state.is_completed()]
    summary = finalize_task(plan, settings)
    create_markdown_artifact(key="prepare-dataset-summary", markdown=report.summary_markdown(summary),
                             description=f"Dataset preparation into {settings.output}")
    print(report.summary_text(summary))
    if failed_batches:
        raise RuntimeError(
            f"{len(failed_batches)} batch(es) failed after retries; their clips are not in the manifest. "
            f"Rerun the same command to resume them."
        )
    return summary
