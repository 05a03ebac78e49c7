"""The `edit_videos` Prefect flow: orchestration only, the work lives in `pipelines.edit.job`.

One task plans (reads the inputs into jobs, checks the checkpoint before any video is touched,
subtracts what earlier runs finished), one runs the Ray Data job (rows are videos and chunks of
videos, never Prefect tasks per frame), one summarises; the summary is also a Markdown artifact.
Without PREFECT_API_URL the flow starts Prefect's temporary local server; without RAY_ADDRESS a
local Ray. Its parameters are the options of `portrait edit` (plain values, shown as a form in
Prefect's UI), so it can be deployed and run on a schedule or from the UI like any flow.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from pipelines.edit import job, results
from pipelines.edit.jobs import split_output
from pipelines.edit.settings import EditSettings, JobDefaults, settings_from_options
from pipelines.media.framing import Framing
from pipelines.media.paste import MaskConfig
from pipelines.storage import absolute_location

_PATHS = ("source", "driving", "jobs", "sources", "output", "checkpoint", "workdir")
"""Parameters that name local paths (or URIs): made absolute here, before any worker sees them."""


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(inputs: job.EditInputs, settings: EditSettings):
    """Collect the jobs, load and check the checkpoint, and subtract what earlier runs settled."""
    edit_plan, weights = job.plan(inputs, settings)
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
    driving: str | None = None,
    jobs: str | None = None,
    sources: str | None = None,
    output: str = EditSettings.output,
    checkpoint: str = EditSettings.checkpoint,
    mode: str = JobDefaults.mode,
    strength: float = JobDefaults.strength,
    motion: str = JobDefaults.motion,
    driving_policy: str = JobDefaults.driving_policy,
    face: str = JobDefaults.face,
    detector: str = EditSettings.detector,
    detect_every: int | None = None,
    face_fraction: float = Framing.face_fraction,
    face_centre_x: float = Framing.centre_x,
    face_centre_y: float = Framing.centre_y,
    mask_dilate: float = MaskConfig.dilate,
    mask_feather: float = MaskConfig.feather,
    mask_forehead: float = MaskConfig.forehead,
    colour_match: bool = EditSettings.colour_match,
    chunk_frames: int = EditSettings.chunk_frames,
    model_batch: int = EditSettings.model_batch,
    crf: int = EditSettings.crf,
    preset: str = EditSettings.preset,
    previews: bool = EditSettings.previews,
    preview_seconds: float = EditSettings.preview_seconds,
    preview_height: int = EditSettings.preview_height,
    retry_failed: bool = EditSettings.retry_failed,
    max_chunk_attempts: int = EditSettings.max_chunk_attempts,
    model_actors: int = EditSettings.model_actors,
    model_gpus: float = EditSettings.model_gpus,
    model_cpus: float = EditSettings.model_cpus,
    precision: str = EditSettings.precision,
    executor: str = EditSettings.executor,
    workdir: str | None = None,
    ray_address: str | None = None,
) -> dict:
    """Edit videos: expression or pose transfer pasted back into the full frames, timing and sound kept.

    Inputs: one `source` with a `driving` video or image (`output` may then name the file, e.g.
    out/x.mp4), a `jobs` table (CSV or Parquet: source, driving, output, mode, strength, motion,
    driving_policy, face), or a `sources` glob / prefix with one `driving` for all. `output` is a
    local folder or an s3:// / gs:// URI and holds the edited videos, `results.parquet` and the
    previews; a rerun only does what is missing or failed. The other parameters are those of
    `portrait edit --help`. Returns the summary (counts by status and failure class).
    """
    options = {name: absolute_location(value) if name in _PATHS else value for name, value in locals().items()}
    folder, name = split_output(options.pop("output"), bool(source))
    inputs = job.EditInputs(**{kind: options.pop(kind) for kind in ("source", "driving", "jobs", "sources")},
                            output_name=name)
    settings = settings_from_options(output=folder, **options)
    inputs.check()
    if settings.executor == "ray":
        from pipelines.runtime import ensure_ray

        ensure_ray(settings.ray_address)  # here, on the flow's main thread, not inside a task's thread
    edit_plan, weights = plan_task(inputs, settings)
    edit_task(edit_plan, weights, settings)
    summary, rows = finalize_task(edit_plan, settings)
    create_markdown_artifact(key="edit-videos-summary", markdown=results.summary_markdown(summary, rows),
                             description=f"Video editing into {settings.output}")
    get_run_logger().info(results.summary_text(summary))
    return summary
