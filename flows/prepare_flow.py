"""The `prepare_dataset` Prefect flow: orchestration only, the work lives in `pipelines.prepare`.

Tasks work on batches of videos (never one Prefect task per clip or frame); inside a batch each
video is one Ray task. Without PREFECT_API_URL the flow starts Prefect's temporary local server;
without RAY_ADDRESS it starts a local Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from pipelines.prepare import job as prepare
from pipelines.prepare.download import DownloadOptions
from pipelines.prepare.job import PrepareSettings
from pipelines.runtime import ensure_ray

LOG = logging.getLogger(__name__)

BATCHES_AT_ONCE = 2
"""Batches in flight: enough to keep Ray busy while one batch drains, few enough that batches
commit in order (an interrupted run keeps most of its work) and open shards stay few."""


@task(name="parse-inputs")
def parse_inputs_task(inputs: list[str], settings: PrepareSettings) -> prepare.Plan:
    """Parse every input and subtract what earlier runs finished (resume)."""
    plan = prepare.plan(inputs, settings)
    get_run_logger().info(plan.describe())
    return plan


@task(name="prepare-batch", retries=1, retry_delay_seconds=10, task_run_name="batch-{batch.name}")
def prepare_batch_task(batch: prepare.Batch, settings: PrepareSettings) -> dict[str, int]:
    """Download, track, crop and shard one batch of videos on Ray; returns its ok/failed counts.

    Retried once by Prefect (a lost Ray node, a full disk freed meanwhile); a retry rewrites the
    batch's shards under the same names, so nothing is duplicated.
    """
    return prepare.run_batch(batch, settings)


@task(name="finalize")
def finalize_task(settings: PrepareSettings) -> dict:
    """Consolidate the manifest, drop shards of interrupted attempts, and summarise."""
    return prepare.finalize(settings)


@flow(name="prepare_dataset", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=BATCHES_AT_ONCE))
def prepare_dataset(inputs: list[str], settings: PrepareSettings) -> dict:
    """Prepare VoxCeleb-style clips into WebDataset shards plus a Parquet manifest.

    `inputs` are VoxCeleb txt trees (directories), clip tables (.csv/.parquet) or URL lists.
    A rerun with the same `settings.output` only does what is missing.
    """
    ensure_ray(settings.ray_address)  # here, on the flow's main thread, not inside a task's thread
    plan = parse_inputs_task(inputs, settings)
    prepare.record_parse_failures(plan, settings)
    futures = [prepare_batch_task.submit(batch, settings) for batch in plan.batches]
    for future in futures:
        future.wait()
    failed_batches = [f for f in futures if not f.state.is_completed()]
    summary = finalize_task(settings)
    create_markdown_artifact(
        key="prepare-dataset-summary",
        markdown=prepare.summary_markdown(summary),
        description=f"Dataset preparation into {settings.output}",
    )
    print(prepare.summary_text(summary))
    if failed_batches:
        raise RuntimeError(
            f"{len(failed_batches)} batch(es) failed after retries; their clips are not in the manifest. "
            f"Rerun the same command to resume them."
        )
    return summary


def settings_from_args(args: argparse.Namespace, workdir: Path) -> PrepareSettings:
    """Map the `portrait prepare` options to the flow's settings."""
    download = DownloadOptions(
        rate_limit_bytes_per_s=prepare.parse_rate(args.rate_limit),
        sleep_between_s=args.sleep,
        cookies_file=Path(args.cookies).expanduser().resolve() if args.cookies else None,
        proxy=args.proxy,
        retries=args.retries,
        allow_file_urls=args.allow_file_urls,
        url_template=args.url_template,
        retry_recorded_failures=args.retry_failed,
    )
    return PrepareSettings(
        output=args.output,
        workdir=str(workdir),
        detector=args.detector,
        detect_every=args.detect_every,
        shard_bytes=int(args.shard_size_mb * 2**20),
        videos_per_batch=args.videos_per_batch,
        test_fraction=args.test_fraction,
        retry_failed=args.retry_failed,
        download=download,
        ray_address=args.ray_address,
    )


def prepare_from_args(args: argparse.Namespace) -> int:
    """Run the flow for `portrait prepare`, starting the sample server first when --sample is given."""
    inputs = [*args.vox1_txt, *args.vox2_txt, *args.clips, *args.urls]
    if not inputs and not args.sample:
        raise SystemExit("portrait prepare: give at least one input (--vox1-txt, --vox2-txt, --clips, --urls) "
                         "or --sample; see `portrait prepare --help`")
    with contextlib.ExitStack() as stack:
        workdir = prepare.default_workdir(args.output, args.workdir)
        settings = settings_from_args(args, workdir)
        if args.sample:
            inputs, settings = stack.enter_context(prepare.sample_inputs(workdir, settings, inputs))
        summary = prepare_dataset(inputs, settings)
    if args.contact_sheet:
        from pipelines.dataset.inspect import write_contact_sheet

        sheet = write_contact_sheet(settings.output)
        print(f"contact sheet: {sheet}")
    return 0 if summary.get("ok", 0) > 0 or not summary.get("requested", 0) else 1
