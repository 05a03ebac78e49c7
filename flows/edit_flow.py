"""The `edit_videos` Prefect flow: orchestration only, the work lives in `pipelines.edit.job`.

One task plans (reads the inputs into jobs, checks the checkpoint before any video is touched,
subtracts what earlier runs finished), one runs the Ray Data job (rows are videos and chunks of
videos, never Prefect tasks per frame), one summarises; the summary is also a Markdown artifact.
Without PREFECT_API_URL the flow starts Prefect's temporary local server; without RAY_ADDRESS a
local Ray. Its parameters are the options of `portrait edit` (`EditInputs` and `EditSettings`, one
field each; plain values shown as a form in Prefect's UI), so it can be deployed and run on a schedule or from the UI like any flow.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from flows.services import take_over
from pipelines.edit import job, results
from pipelines.edit.settings import EditInputs, EditSettings, inputs_and_settings
from pipelines.runtime import ensure_ray

_DEFAULTS = EditSettings()


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(inputs: EditInputs, settings: EditSettings):
    """Collect the jobs, load and check the checkpoint (unless the command did both before starting
    the services), and subtract what earlier runs settled."""
    edit_plan, weights = job.plan(inputs, settings, *(take_over(settings) or ()))
    get_run_logger().info(edit_plan.describe())
    return edit_plan, weights


@task(name="edit", cache_policy=NO_CACHE)
def edit_task(edit_plan: job.EditPlan, weights, settings: EditSettings) -> int:
    """Edit every pending job (Ray Data, or in-process with executor='local'); returns the jobs run."""
    return len(job.run(edit_plan, weights, settings))


@task(name="finalize", cache_policy=NO_CACHE)
def finalize_task(edit_plan: job.EditPlan, settings: EditSettings) -> tuple[dict, list[results.ResultRow]]:
    """Read back the results table: the run's summary and its rows."""
    return job.finalize(edit_plan, settings)


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
    if settings.executor == "ray":
        ensure_ray(settings.ray_address)  # here, on the flow's main thread, not inside a task's thread
    edit_plan, weights = plan_task(inputs, settings)
    edit_task(edit_plan, weights, settings)
    summary, rows = finalize_task(edit_plan, settings)
    create_markdown_artifact(key="edit-videos-summary", markdown=results.summary_markdown(summary, rows),
                             description=f"Video editing into {settings.output}")
    get_run_logger().info(results.summary_text(summary))
    return summary
