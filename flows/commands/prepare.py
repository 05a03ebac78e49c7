"""`portrait prepare`: VoxCeleb-style metadata -> WebDataset shards plus a Parquet manifest."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from flows.commands import STOPPED
from pipelines.prepare.settings import PrepareSettings, SourceInputs

LOG = logging.getLogger(__name__)
NAME = "prepare"
OPTIONS = (SourceInputs, PrepareSettings)


SUMMARY = "prepare VoxCeleb-style clips into WebDataset shards (Prefect flow, work on Ray)"
DESCRIPTION = (
    "Download only the needed time spans of each video with yt-dlp, track the face, crop it to "
    "256x256 at 25 fps with per-frame landmarks and head pose, and write WebDataset shards plus a "
    "Parquet manifest (one row per requested clip, with its status and failure class).\n\n"
    "The output must be a new or empty folder, or a dataset prepared before with the same sample "
    "settings: anything else is refused before work starts. A rerun with the same output completes "
    "only what is missing. SIGINT or SIGTERM stops a run within 20 s (each running batch finishes "
    "its video in hand, 10 s at most, and commits the videos it finished) with exit status 130, and "
    "a rerun resumes. Runs on a "
    "local Ray and Prefect's temporary server unless RAY_ADDRESS / "
    "PREFECT_API_URL point at a cluster.")


def _flow():
    from flows.prepare_flow import prepare_dataset

    return prepare_dataset


def run(args: argparse.Namespace) -> int:
    from flows.services import run_with_services
    from pipelines.dataset.layout import OutputRefused, claim_output
    from pipelines.media.faces import make_detector
    from pipelines.options import build, values_of
    from pipelines.prepare.sources import InputError
    from pipelines.runtime import LocationNotShared
    from pipelines.storage import OutputStore, split_credentials

    output, credentials = split_credentials(args.output)
    if credentials:  # kept out of logs, summaries and Prefect's parameter records
        os.environ.update(credentials)
        LOG.warning("credentials in --output moved to %s for this run; pass them that way next time",
                    ", ".join(sorted(credentials)))
    values = {**vars(args), "output": output}
    inputs = build(SourceInputs, values)
    if not inputs:
        raise SystemExit("portrait prepare: give at least one input (--vox1-txt, --vox2-txt, --clips, --urls) "
                         "or --sample; see `portrait prepare --help`")
    try:
        settings = build(PrepareSettings, values)
        inputs.check()
        detector = make_detector(settings.detector).name
        claim_output(OutputStore(settings.output), settings.sample_format.record(detector))
    except (ValueError, InputError, OutputRefused, FileNotFoundError) as error:
        print(f"portrait prepare: {error}", file=sys.stderr)
        return 2

    try:
        summary = run_with_services(NAME, settings.ray_address,
                                    lambda: _flow()(**values_of(inputs), **values_of(settings)))
    except LocationNotShared as error:
        print(f"portrait prepare: {error}", file=sys.stderr)
        return 2
    if summary.get("stopped"):
        print(f"portrait prepare: stopped; {summary.get('ok', 0)} clips are prepared and recorded in {settings.output}; "
              "run the same command again to resume", file=sys.stderr)
        return STOPPED
    return 0 if summary.get("ok", 0) > 0 or not summary.get("requested", 0) else 1
