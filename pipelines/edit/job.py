"""Bulk editing as plain functions: plan -> run -> finalize (the Prefect flow only sequences these).

`plan` reads the inputs into jobs, loads and checks the checkpoint (a missing file or the wrong
architecture stops here, before any video is touched), reads the results table and decides what
is still to do. `run` executes those jobs (`runner.run_ray`, or `runner.run_local`) and records
each job's row as it finishes; `finalize` writes the table and returns the run's summary.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from pipelines import errors
from pipelines.edit import results
from pipelines.edit.chunks import JobWork
from pipelines.edit.job_table import (
    EditJob,
    RejectedJob,
    drop_duplicate_outputs,
    is_uri,
    jobs_from_sources,
    jobs_from_table,
    single_job,
)
from pipelines.edit.settings import EditInputs, EditSettings
from pipelines.storage import OutputStore

LOG = logging.getLogger(__name__)


Collected = tuple[list[EditJob], list[RejectedJob]]


def collect_jobs(inputs: EditInputs, settings: EditSettings) -> Collected:
    """The run's jobs and the rows that cannot become jobs (bad values, duplicate outputs)."""
    inputs.check()
    if inputs.source:
        jobs, rejected = [single_job(inputs.source, inputs.driving, inputs.output_name, settings.defaults)], []
    elif inputs.jobs:
        jobs, rejected = jobs_from_table(inputs.jobs, settings.defaults, inputs.driving)
    else:
        jobs, rejected = jobs_from_sources(inputs.sources, inputs.driving, settings.defaults)
        ours = [job for job in jobs if _inside(job.source, settings.output)]
        if ours:  # an output folder inside the archive: its edited videos are not sources
            LOG.info("--sources: %d file(s) inside the output folder %s left out", len(ours), settings.output)
            jobs = [job for job in jobs if job not in ours]
    overwriting = [job for job in jobs if _same_file(job.source, _output_path(settings.output, job.output))]
    rejected += [RejectedJob(job, errors.BAD_JOB, f"{job.origin}: output {job.output} is the source itself; "
                                                  "editing would overwrite it: choose another output")
                 for job in overwriting]
    jobs = [job for job in jobs if job not in overwriting]
    jobs, duplicates = drop_duplicate_outputs(jobs)
    return jobs, rejected + duplicates


def _output_path(folder: str, relpath: str) -> str:
    return f"{folder.rstrip('/')}/{relpath}" if is_uri(folder) else str(Path(folder).expanduser().resolve() / relpath)


def _same_file(source: str, output: str) -> bool:
    return source == output if is_uri(source) else Path(source).resolve() == Path(output).resolve()


def _inside(path: str, folder: str) -> bool:
    if is_uri(path) or is_uri(folder):
        return path.startswith(folder.rstrip("/") + "/")
    return Path(path).resolve().is_relative_to(Path(folder).expanduser().resolve())


def spec_context(settings: EditSettings, model: str) -> dict:
    """The settings that decide what an output looks like (a change redoes finished jobs)."""
    keys = ("detector", "colour_match", "min_face_px", "min_track_frames", "fade_frames", "chunk_frames", "crf",
            "preset", "encoder", "precision", "codec", "pix_fmt", "deinterlace")
    return {"model": model, "checkpoint": settings.checkpoint, "tracking": asdict(settings.tracking),
            "framing": asdict(settings.framing), "mask": asdict(settings.mask),
            **{key: getattr(settings, key) for key in keys}}


@dataclass
class EditPlan:
    """A run's jobs, what is left to do, and the checked model."""

    run_id: str
    model: str
    model_size: int
    jobs: list[EditJob]
    rejected: list[RejectedJob]
    pending: results.Pending

    def describe(self) -> str:
        p = self.pending
        return (f"{len(self.jobs) + len(self.rejected)} jobs: {len(p.todo)} to do, {p.done} done before, "
                f"{p.recorded_failures} failed before for reasons of their input (kept; --retry-failed retries "
                f"them), {p.changed} redone because their settings changed, {p.missing_outputs} redone because "
                f"their output is gone, {len(self.rejected)} rejected; model {self.model}")

    def works(self) -> list[JobWork]:
        return [JobWork(job, spec, attempt, self.model_size) for job, spec, attempt in self.pending.todo]


def plan(inputs: EditInputs, settings: EditSettings, collected: Collected | None = None,
         weights=None) -> tuple[EditPlan, object]:
    """Collect the jobs, check the checkpoint, and subtract what earlier runs settled.

    Returns the plan and the loaded `ModelWeights`; pass what `collect_jobs` and `load_weights`
    returned for these inputs and settings to skip doing either again.
    Raises `InputError` or `CheckpointError` before any video work.
    """
    from pipelines.edit.model import load_weights

    jobs, rejected = collected or collect_jobs(inputs, settings)
    weights = weights or load_weights(settings.checkpoint, settings.workdir)
    model = weights.describe()
    context = spec_context(settings, f"{weights.kind} {weights.size}px")
    specs = {job.job_id: job.digest(context) for job in jobs}
    store = OutputStore(settings.output)
    state = results.read_results(store)
    todo = results.pending(jobs, specs, state, store, settings.retry_failed)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return EditPlan(run_id, model, weights.size, jobs, rejected, todo), weights


def run(edit_plan: EditPlan, weights, settings: EditSettings) -> list[results.ResultRow]:
    """Edit every pending job; record rejected rows and every finished job in the results table."""
    from pipelines.edit import runner

    table = results.ResultsTable(OutputStore(settings.output))
    rows: list[results.ResultRow] = []

    def record(row: results.ResultRow) -> None:
        if row.status == results.FAILED:
            LOG.warning("%s failed (%s): %s", row.job_id, row.failure_class, row.message)
        else:
            LOG.info("%s: %d frames (%d edited) -> %s", row.job_id, row.frames, row.frames_edited, row.output)
        rows.append(row)
        table.record(row)

    for rejection in edit_plan.rejected:
        record(results.base_row(rejection.job, "", job_id=rejection.job_id, status=results.FAILED,
                                failure_class=rejection.failure_class, message=rejection.message))
    works = edit_plan.works()
    try:
        if works and settings.executor == "local":
            runner.run_local(works, weights, settings, edit_plan.model, record)
        elif works:
            runner.run_ray(works, weights, settings, edit_plan.model, record)
    finally:
        table.flush()
    return rows


def finalize(edit_plan: EditPlan, settings: EditSettings) -> tuple[dict, list[results.ResultRow]]:
    """The run's summary and rows, over all of its jobs (those settled by earlier runs included)."""
    state = results.read_results(OutputStore(settings.output))
    ids = [job.job_id for job in edit_plan.jobs] + [r.job_id for r in edit_plan.rejected]
    rows = [state[i] for i in ids if i in state]
    summary = results.summary(rows, edit_plan.pending, settings.output)
    summary["model"] = edit_plan.model
    return summary, rows
