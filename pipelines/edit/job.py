"""Bulk editing as plain functions: plan -> run -> finalize (the Prefect flow only sequences these).

`plan` loads and checks the checkpoint (a missing file or the wrong architecture stops here, before
any video is touched), reads what earlier runs settled, and sets up a `Planner` over the inputs
(`job_windows`: a job table or a listing of sources, a window of rows at a time, never held whole).
Planning itself happens as `run` takes the work, window by window, so the first jobs start whatever
the archive's size (`runner.WorkFeed` plans on a thread of the driver while the Ray Data job runs).
The planner keeps per job only what decides later rows (a hash of each claimed output with its
origin): a row that can never run (a bad value, a duplicate output, an output that is its own source,
a missing local file) is recorded in the results table at once and goes no further; a job an earlier
run settled is counted; every other job becomes a `JobWork` in its window's work, which the Ray Data
job reads as one object per window (not one per job). Earlier results are read once as a few fields
per job, and ok outputs are checked against one listing of the output folder. `run` executes the
windows (`runner.run_ray`, or `runner.run_local`) and appends each job's row as it finishes;
`finalize` compacts the table once and returns the run's summary.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from pipelines import errors
from pipelines.edit import results
from pipelines.edit.chunks import JobWork
from pipelines.edit.job_table import EditJob, RejectedJob, is_uri, single_job, source_jobs, table_jobs
from pipelines.edit.settings import EditInputs, EditSettings
from pipelines.storage import OutputStore

LOG = logging.getLogger(__name__)

Window = tuple[list[EditJob], list[RejectedJob]]
MAX_LISTED_REJECTIONS = 50
"""Rejected rows a plan keeps for its report (the results table has them all)."""


def job_windows(inputs: EditInputs, settings: EditSettings) -> Iterator[Window]:
    """The run's jobs, a window at a time, with the rows that cannot become jobs (bad values).

    Raises `InputError` (or ValueError for a bad --source job) before the first window when the
    inputs cannot be used at all (a missing table, an unknown column, a glob that matches nothing),
    so a command can check them before starting its services.
    """
    inputs.check()
    if inputs.source:
        return iter([([single_job(inputs.source, inputs.driving, inputs.output_name, settings.defaults)], [])])
    if inputs.jobs:
        return table_jobs(inputs.jobs, settings.defaults, inputs.driving)
    return source_jobs(inputs.sources, inputs.driving, settings.defaults)


SHARED_FOLDERS_CHECKED = 16
"""Distinct local folders of a job table's sources and drivers checked to be seen by every node."""


def require_shared_locations(inputs: EditInputs, settings: EditSettings) -> None:
    """On a cluster of several nodes, refuse local inputs and a local output folder that not every node
    sees (`runtime.require_shared`: one line naming the fix); a job table's rows are checked by the
    planner (the folders of its first rows' files)."""
    from pipelines.edit.job_table import split_pattern
    from pipelines.runtime import require_shared

    require_shared(str(Path(settings.output).expanduser()) if not is_uri(settings.output) else settings.output,
                   "--output", output=True)
    given = [("--source", inputs.source), ("--jobs", inputs.jobs), ("--driving", inputs.driving),
             ("--sources", split_pattern(inputs.sources)[0] if inputs.sources else None)]
    for option, location in given:
        if location and not is_uri(location):
            require_shared(str(Path(location).expanduser().resolve()), option, output=False)


def spec_context(settings: EditSettings, model: str) -> dict:
    """The settings that decide what an output looks like (a change redoes finished jobs)."""
    keys = ("detector", "colour_match", "min_face_px", "min_track_frames", "fade_frames", "chunk_frames", "crf",
            "preset", "encoder", "precision", "codec", "pix_fmt", "deinterlace")
    return {"model": model, "checkpoint": settings.checkpoint, "tracking": asdict(settings.tracking),
            "framing": asdict(settings.framing), "mask": asdict(settings.mask),
            **{key: getattr(settings, key) for key in keys}}


def _output_hash(output: str) -> int:
    return int.from_bytes(hashlib.blake2b(output.encode(), digest_size=8).digest(), "little")


class Planner:
    """Decides, row by row, what each job of a run is: recorded now (it can never run), settled by an
    earlier run, or work. Keeps per job one hash and origin (for duplicate outputs), nothing else."""

    def __init__(self, settings: EditSettings, model: str, model_size: int, record, filter_outputs: bool,
                 state: dict[str, results.Settled], listing: set[str], check_shared=None) -> None:
        self.settings, self.model, self.model_size, self.record = settings, model, model_size, record
        self.context = spec_context(settings, model)
        self.state, self.listing = state, listing
        self.folder = settings.output.rstrip("/") if is_uri(settings.output) \
            else str(Path(settings.output).expanduser().resolve())
        self.filter_outputs = filter_outputs
        self.claimed: dict[int, str] = {}
        self.pending = results.Pending()
        self.settled = results.Tally()
        self.rejected: list[RejectedJob] = []
        self.rejected_count = 0
        self.left_out = 0
        self._drivers: dict[str, bool] = {}
        self.check_shared = check_shared
        self._shared_folders: set[str] = set()

    def _require_shared(self, job: EditJob) -> None:
        """The folders of a table's first rows' local files must be seen by every node (a probe each)."""
        for path, option in ((job.source, "source"), (job.driving, "driving")):
            folder = os.path.dirname(path)
            if is_uri(path) or folder in self._shared_folders or len(self._shared_folders) >= SHARED_FOLDERS_CHECKED:
                continue
            self._shared_folders.add(folder)
            self.check_shared(folder, f"{job.origin}: {option}", output=False)

    def _missing(self, job: EditJob) -> str | None:
        """The job's local source or driver when it does not exist (object-store inputs are found by the stages)."""
        if not is_uri(job.source) and not os.path.isfile(job.source):
            return job.source
        if is_uri(job.driving):
            return None
        if job.driving not in self._drivers:
            if len(self._drivers) >= 4096:  # many distinct drivers: a bounded cache
                self._drivers.clear()
            self._drivers[job.driving] = os.path.isfile(job.driving)
        return None if self._drivers[job.driving] else job.driving

    def _output_path(self, relpath: str) -> str:
        return f"{self.folder}/{relpath}" if is_uri(self.folder) else os.path.join(self.folder, relpath)

    def reject(self, rejection: RejectedJob) -> None:
        self.rejected_count += 1
        if len(self.rejected) < MAX_LISTED_REJECTIONS:
            self.rejected.append(rejection)
        self.record(results.base_row(rejection.job, "", job_id=rejection.job_id, status=results.FAILED,
                                     failure_class=rejection.failure_class, message=rejection.message))

    def window(self, window: Window) -> list[JobWork]:
        """The work of one window of jobs; everything else in it is recorded or counted here."""
        jobs, rejected = window
        for rejection in rejected:
            self.reject(rejection)
        works = []
        inside = self.folder + "/"
        for job in jobs:
            if self.filter_outputs and job.source.startswith(inside):
                self.left_out += 1  # an output folder inside the archive: its edited videos are not sources
                continue
            output_path = self._output_path(job.output)
            if job.source == output_path:
                self.reject(RejectedJob(job, errors.BAD_JOB, f"{job.origin}: output {job.output} is the source "
                                                             "itself; editing would overwrite it: choose another output"))
                continue
            key = _output_hash(job.output)
            if key in self.claimed:
                self.reject(RejectedJob(job, errors.DUPLICATE_OUTPUT,
                                        f"{job.origin}: output {job.output} is also written by {self.claimed[key]}; "
                                        "give each job its own output"))
                continue
            self.claimed[key] = job.origin
            spec = job.digest(self.context)
            settled = self.state.get(job.job_id)
            attempt = results.pending_attempt(job, spec, settled, self.listing, self.settings.retry_failed,
                                              self.pending)
            if attempt is None:
                self.settled.add_settled(settled)
                continue
            if self.check_shared:
                self._require_shared(job)
            missing = self._missing(job)
            if missing:  # recorded here, without passing through any stage
                what = "" if missing == job.source else "driving "
                self.record(results.base_row(job, output_path, status=results.FAILED,
                                             failure_class=errors.MISSING_VIDEO, message=f"{what}{missing}: no such file",
                                             attempt=attempt, spec=spec, model=self.model))
                continue
            works.append(JobWork(job, spec, attempt, self.model_size))
        return works

    def stream(self, windows: Iterable[Window]) -> Iterator[list[JobWork]]:
        """The work of each window as it is planned (possibly none: a consumer can stop between windows)."""
        for window in windows:
            yield self.window(window)
        if self.left_out:
            LOG.info("--sources: %d file(s) inside the output folder %s left out", self.left_out, self.folder)


@dataclass
class EditPlan:
    """A run's work, planned window by window as the run takes it (`windows`), with what planning has recorded
    or skipped so far (complete once `windows` is exhausted), and the checked model."""

    run_id: str
    model: str
    model_size: int
    planner: Planner = field(repr=False)
    table: results.ResultsTable
    windows: Iterator[list[JobWork]] = field(repr=False)
    """The work of each window of the inputs: iterating it plans them (once)."""

    @property
    def pending(self) -> results.Pending:
        return self.planner.pending

    @property
    def rejected(self) -> list[RejectedJob]:
        """The first `MAX_LISTED_REJECTIONS` rejected rows (all are in the results table)."""
        return self.planner.rejected

    @property
    def rejected_count(self) -> int:
        return self.planner.rejected_count

    @property
    def settled(self) -> results.Tally:
        """What earlier runs settled of this run's jobs."""
        return self.planner.settled

    def describe(self) -> str:
        p = self.pending
        return (f"{p.todo + p.done + p.recorded_failures + self.rejected_count} jobs: {p.todo} to do, {p.done} "
                f"done before, {p.recorded_failures} failed before for reasons of their input (kept; "
                f"--retry-failed retries them), {p.changed} redone because their settings changed, "
                f"{p.missing_outputs} redone because their output is gone, {self.rejected_count} rejected; "
                f"model {self.model}")


def plan(inputs: EditInputs, settings: EditSettings, windows: Iterator[Window] | None = None,
         weights=None) -> tuple[EditPlan, object]:
    """Check the checkpoint and the locations, read what earlier runs settled, and set up a `Planner` over the
    inputs: the plan's windows are planned as `run` takes them, so the first jobs start whatever the archive's
    size.

    Returns the plan and the loaded `ModelWeights`; pass what `job_windows` and `load_weights`
    returned for these inputs and settings to skip doing either again.
    Raises `InputError` or `CheckpointError` before any video work.
    """
    from pipelines.edit.model import load_weights

    windows = windows if windows is not None else job_windows(inputs, settings)
    weights = weights or load_weights(settings.checkpoint, settings.workdir)
    on_ray = settings.executor == "ray"
    if on_ray:  # before anything is read from or written to the output folder
        require_shared_locations(inputs, settings)
    store = OutputStore(settings.output)
    state = results.read_state(store)
    listing = results.output_listing(store) if any(s.status == results.OK for s in state.values()) else set()
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    table = results.ResultsTable(store, run_id)
    from pipelines.runtime import require_shared

    planner = Planner(settings, weights.describe(), weights.size, table.record, filter_outputs=bool(inputs.sources),
                      state=state, listing=listing, check_shared=require_shared if on_ray and inputs.jobs else None)
    return EditPlan(run_id, weights.describe(), weights.size, planner, table, planner.stream(windows)), weights


def run(edit_plan: EditPlan, weights, settings: EditSettings) -> results.Tally:
    """Edit every pending job, appending each finished job's row to the results table; returns the run's
    tally (rows recorded while planning included)."""
    from pipelines.edit import runner

    table = edit_plan.table

    def record(row: results.ResultRow) -> None:
        if row.status == results.FAILED:
            LOG.warning("%s failed (%s): %s", row.job_id, row.failure_class, row.message)
        else:
            LOG.info("%s: %d frames (%d edited) -> %s", row.job_id, row.frames, row.frames_edited, row.output)
        table.record(row)

    run_work = runner.run_local if settings.executor == "local" else runner.run_ray
    try:
        run_work(edit_plan.windows, edit_plan.pending.todo, weights, settings, edit_plan.model, record)
    finally:
        table.flush()
    return table.tally


def finalize(edit_plan: EditPlan, tally: results.Tally, settings: EditSettings) -> tuple[dict, list[results.ResultRow]]:
    """Compact the results table once; the run's summary over all of its jobs (those settled by earlier
    runs included) and its first failed rows."""
    results.compact(OutputStore(settings.output))
    total = results.Tally()
    total.merge(edit_plan.settled)
    total.merge(tally)
    summary = total.summary(edit_plan.pending, settings.output)
    summary["model"] = edit_plan.model
    return summary, total.failures
