"""`portrait edit`: expression or pose transfer on videos, pasted back into the full frames, as a Ray Data job."""

from __future__ import annotations

import argparse
import sys

from flows.commands import STOPPED
from pipelines.edit.settings import EditInputs, EditSettings, inputs_and_settings

NAME = "edit"

OPTIONS = (EditInputs, EditSettings)


SUMMARY = "edit videos: the driver's expression (or pose) on the source, pasted back, timing and sound kept"
DESCRIPTION = (
    "Give a source video the driving video's (or image's) facial expression while its head pose stays "
    "(--mode expression), or the driver's head pose (--mode pose), or both. Each video is tracked, its "
    "face cropped the way the model was trained, edited in batches, pasted back into the full frames "
    "with a soft mask and matched colour, and encoded in the source's container, codec, depth and colours "
    "with its frame count, exact frame timestamps, orientation and every other stream copied unchanged "
    "(the results table says where a container could not hold something). Frames without a face pass "
    "through. Long videos are split into chunks edited in parallel.\n\n"
    "examples:\n"
    "  portrait edit --source talk.mp4 --driving smile.mp4 --checkpoint dpe.pt -o out/talk_smile.mp4\n"
    "  portrait edit --source talk.mp4 --driving smile.png --strength 0.7 --checkpoint dpe.pt -o out/x.mp4\n"
    "  portrait edit --jobs jobs.parquet --checkpoint s3://models/dpe.pt --output s3://bucket/edited\n"
    "  portrait edit --sources 's3://bucket/archive/*.mp4' --driving smile.mp4 --checkpoint ckpt/ "
    "--output out/edited\n\n"
    "The inputs are planned as the run goes: the first videos start once their window of rows is planned, "
    "whatever the size of the job table. The output folder gets results.parquet (one row per job: status, failure class, frames, fps, "
    "timings; appended as results.parts/ while the run goes, compacted at its end); a rerun does only what "
    "is missing or failed. The first Ctrl-C or SIGTERM stops feeding work, records what finishes and exits "
    "with status 130 saying how to resume; a second stops at once. Runs on a local Ray and Prefect's temporary server unless "
    "RAY_ADDRESS / PREFECT_API_URL point at a cluster; on a cluster, local paths must be seen by every node "
    "(else an object store: s3://, gs://, whose AWS_* / GOOGLE_APPLICATION_CREDENTIALS settings go from this "
    "command to every task). A node lost mid-run costs only the chunks it held: they are redone elsewhere.")


def run(args: argparse.Namespace) -> int:
    from flows.services import hand_over, run_with_services
    from pipelines.edit.job import job_windows
    from pipelines.edit.job_table import InputError
    from pipelines.edit.model import CheckpointError, load_weights
    from pipelines.edit.results import summary_text
    from pipelines.options import absolute_location, values_of

    try:
        inputs, settings = inputs_and_settings(vars(args))
        windows = job_windows(inputs, settings)  # a table or glob that cannot be read stops here
        weights = load_weights(settings.checkpoint, settings.workdir)  # a wrong checkpoint stops here
    except (ValueError, InputError, CheckpointError) as error:
        print(f"portrait edit: {error}", file=sys.stderr)
        return 2
    hand_over(settings, (windows, weights))  # the flow plans with them instead of loading them again
    parameters = {**values_of(inputs), **values_of(settings), "output": absolute_location(args.output)}
    summary = run_with_services(NAME, settings.ray_address, lambda: _flow()(**parameters),
                                use_ray=settings.executor == "ray")
    print(summary_text(summary))
    if summary.get("stopped"):
        print(f"portrait {NAME}: stopped before the end; what finished is recorded in "
              f"{summary['output'].rstrip('/')}/results.parquet: run the same command again to resume "
              "(finished jobs are skipped)", file=sys.stderr)
        return STOPPED
    return 0 if summary.get("failed", 0) == 0 else 1


def _flow():
    from flows.edit_flow import edit_videos

    return edit_videos
