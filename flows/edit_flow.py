"""The `edit_videos` Prefect flow: orchestration only, the work lives in `pipelines.edit.job`.

One task prepares the plan (checks the checkpoint before any video is touched, reads what earlier
runs finished), one runs the Ray Data job while planning streams the inputs into it window by window
(records rows that can never run, subtracts what earlier runs finished; the first jobs start whatever
the archive's size; rows are videos and chunks of videos, never Prefect tasks per video or frame:
Prefect sees three tasks whatever the archive's size), one compacts the results table and
summarises; the summary is also a Markdown artifact. The first SIGINT/SIGTERM stops feeding work and the summary says the
run stopped (`flows.services.stop_on_signals`); a local path some node of a cluster cannot see stops
the flow before any work. Without PREFECT_API_URL the flow starts Prefect's temporary local server;
without RAY_ADDRESS a local Ray. Its parameters are the options of `portrait edit` (`EditInputs` and
`EditSettings`, one field each; plain values shown as a form in Prefect's UI), so it can be deployed
and run on a schedule or from the UI like any flow.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from flows.services import stop_on_signals, take_over
from pipelines.edit import job, results
from pipelines.edit.settings import EditInputs, EditSettings, inputs_and_settings
from pipelines.runtime import clear_stop, ensure_ray, stop_requested

_DEFAULTS = EditSettings()


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(inputs: EditInputs, settings: EditSettings):
    """Load and check the checkpoint (unless the command did before starting the services), check the
    locations, and read what earlier runs settled; the inputs are planned as the edit task takes them."""
    return job.plan(inputs, settings, *(take_over(settings) or ()))


@task(name="edit", cache_policy=NO_CACHE)
def edit_task(edit_plan: job.EditPlan, weights, settings: EditSettings) -> results.Tally:
    """Plan and edit every pending job (Ray Data, or in-process with executor='local'), each window of the
    inputs as it is planned; returns the run's tally. The first SIGINT/SIGTERM stops planning and feeding
    work (`flows.services.stop_on_signals`)."""
    return job.run(edit_plan, weights, settings)


@task(name="finalize", cache_policy=NO_CACHE)
def finalize_task(edit_plan: job.EditPlan, tally: results.Tally,
                  settings: EditSettings) -> tuple[dict, list[results.ResultRow]]:
    """Compact the results table once: the run's summary and its first failed rows."""
    return job.finalize(edit_plan, tally, settings)


@flow(name="edit_videos")
def edit_videos(
    source: str | None = None,
    jobs: str | None = None,
    sources: str | None = None,
    driving: str | None = None,
    face_fraction: float = _DEFAULTS.face_fraction,
    face_centre_x: float = _DEFAULTS.face_centre_x,
    face_centre_y: float = _DEFAULTS.face_centre_y,
    output: str = _DEFAULTS.output,
    checkpoint: str = _DEFAULTS.checkpoint,
    mode: str = _DEFAULTS.mode,
    strength: float = _DEFAULTS.strength,
    motion: str = _DEFAULTS.motion,
    driving_policy: str = _DEFAULTS.driving_policy,
    face: str = _DEFAULTS.face,
    detector: str = _DEFAULTS.detector,
    detect_every: int = _DEFAULTS.detect_every,
    mask_dilate: float = _DEFAULTS.mask_dilate,
    mask_feather: float = _DEFAULTS.mask_feather,
    mask_forehead: float = _DEFAULTS.mask_forehead,
    colour_match: bool = _DEFAULTS.colour_match,
    crf: int = _DEFAULTS.crf,
    preset: str = _DEFAULTS.preset,
    encoder: str = _DEFAULTS.encoder,
    previews: bool = _DEFAULTS.previews,
    preview_seconds: float = _DEFAULTS.preview_seconds,
    preview_height: int = _DEFAULTS.preview_height,
    retry_failed: bool = _DEFAULTS.retry_failed,
    chunk_frames: int = _DEFAULTS.chunk_frames,
    model_batch: int = _DEFAULTS.model_batch,
    model_actors: int = _DEFAULTS.model_actors,
    model_gpus: float = _DEFAULTS.model_gpus,
    model_cpus: float = _DEFAULTS.model_cpus,
    precision: str = _DEFAULTS.precision,
    max_chunk_attempts: int = _DEFAULTS.max_chunk_attempts,
    executor: str = _DEFAULTS.executor,
    workdir: str | None = _DEFAULTS.workdir,
    ray_address: str | None = _DEFAULTS.ray_address,
    codec: str = _DEFAULTS.codec,
    pix_fmt: str = _DEFAULTS.pix_fmt,
    deinterlace: str = _DEFAULTS.deinterlace,
) -> dict:
    """Edit videos: expression or pose transfer pasted back into the full frames, timing and sound kept.

    Inputs: one `source` with a `driving` video or image (`output` may then name the file, e.g.
    out/x.mp4), a `jobs` table (CSV or Parquet: source, driving, output, mode, strength, motion,
    driving_policy, face), or a `sources` glob / prefix with one `driving` for all. `output` is a
    local folder or an s3:// / gs:// URI and holds the edited videos, `results.parquet` and the
    previews; a rerun only does what is missing or failed. The other parameters are those of
    `portrait edit --help`. Returns the summary (counts by status and failure class).
    """
    inputs, settings = inputs_and_settings(locals())
    inputs.check()
    clear_stop()  # a stop asked of an earlier run in this process is not this run's
    if settings.executor == "ray":
        ensure_ray(settings.ray_address)  # here, on the flow's main thread, not inside a task's thread
    with stop_on_signals("edit"):
        edit_plan, weights = plan_task(inputs, settings)
        tally = edit_task(edit_plan, weights, settings) if not stop_requested() else results.Tally()
        get_run_logger().info(edit_plan.describe())  # planning goes with the run: its counts are complete now
        summary, rows = finalize_task(edit_plan, tally, settings)
    if stop_requested():
        summary["stopped"] = True
    create_markdown_artifact(key="edit-videos-summary", markdown=results.summary_markdown(summary, rows),
                             description=f"Video editing into {settings.output}")
    get_run_logger().info(results.summary_text(summary))
    return summary
