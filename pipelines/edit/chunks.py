"""The units of work that travel between the editing stages, and their timing helpers.

A job enters as `JobWork`; the analysis stage turns it into one `ChunkWork` per chunk of frames
(or a single failed one). Each later stage fills in its part of a chunk (crops, edited crops,
segment) or records why it failed; a failed chunk passes through the remaining stages untouched,
so every chunk of every job comes out at the end with a status. Everything here is plain data
(numpy arrays, dataclasses) that pickles between Ray workers.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Iterator, TypeVar

import numpy as np

from pipelines.edit.job_table import EditJob
from pipelines.media.video import VideoInfo

T = TypeVar("T")

STAGE_TIMINGS = ("probe_s", "decode_s", "track_s", "crop_s", "model_s", "paste_s", "encode_s", "join_s")
"""Seconds per stage, summed over a job's chunks (decode_s counts every decoding pass)."""


@dataclass(frozen=True)
class JobWork:
    """A job as the analysis stage receives it."""

    job: EditJob
    digest: str
    """Of everything that decides the output (`EditJob.digest`): recorded as the results row's `spec`."""
    attempt: int
    model_size: int


@dataclass
class DriverSlice:
    """The driving frames one chunk needs: distinct driver frame indices with their crop boxes and pts."""

    is_image: bool
    frames: np.ndarray
    """(K,) distinct driver frame indices, ascending."""
    boxes: np.ndarray
    """(K, 4) crop boxes of those frames."""
    pts: np.ndarray
    """(K,) pts of those frames (for seeking); zeros for an image."""


@dataclass
class ChunkWork:
    """One chunk of one job, filled in stage by stage."""

    work: JobWork
    index: int
    """Which chunk of the job (0, 1, ...); -1 for a job that failed before it was split into chunks."""
    total: int
    """How many chunks the job has."""
    info: VideoInfo | None = None
    start: int = 0
    pts: np.ndarray | None = None
    """(n,) pts of the chunk's frames, from the analysis pass (checked when decoding again)."""
    weights: np.ndarray | None = None
    """(n,) edit weight per frame in [0, 1]: 0 passes the frame through, values below 1 fade."""
    boxes: np.ndarray | None = None
    """(n, 4) crop boxes (NaN where the frame is passed through)."""
    landmarks: np.ndarray | None = None
    """(n, 68, 2) source landmarks in frame pixels (NaN where passed through)."""
    driving_index: np.ndarray | None = None
    """(n,) index into `driver.frames` per frame (-1 where passed through)."""
    driver: DriverSlice | None = None
    motion: str = "relative"
    reference: tuple[str, int, int, np.ndarray] | None = None
    """Relative motion's reference frame: ('driving' | 'source', frame index, pts, crop box)."""
    segment: str = ""
    """Store path of this chunk's encoded video segment."""
    reused: bool = False
    """The segment was already written by an earlier run with the same spec: nothing to do."""
    source_crops: np.ndarray | None = None
    driving_crops: np.ndarray | None = None
    reference_crop: np.ndarray | None = None
    edited: np.ndarray | None = None
    frames_edited: int = 0
    started_at: float = field(default_factory=time.time)
    """Wall-clock time the job's analysis started (for the job's wall_s)."""
    timings: dict[str, float] = field(default_factory=dict)
    workers: list[str] = field(default_factory=list)
    failure_class: str | None = None
    message: str = ""

    @property
    def job(self) -> EditJob:
        return self.work.job

    @property
    def frames(self) -> int:
        return 0 if self.pts is None else len(self.pts)

    @property
    def ok(self) -> bool:
        return self.failure_class is None

    @property
    def label(self) -> str:
        return f"{self.job.source} [chunk {self.index + 1}/{self.total}]" if self.index >= 0 else self.job.source

    def fail(self, failure_class: str, message: str) -> ChunkWork:
        """Record a failure and drop the bulky arrays (the chunk only travels on as a status)."""
        self.failure_class, self.message = failure_class, message
        self.source_crops = self.driving_crops = self.reference_crop = self.edited = None
        return self

    def slim(self) -> ChunkWork:
        """Drop what only the stages needed, keeping what finishing the job uses (pts, weights, status)."""
        self.boxes = self.landmarks = self.driving_index = self.driver = self.reference = None
        self.source_crops = self.driving_crops = self.reference_crop = self.edited = None
        return self

    def visited(self) -> None:
        """Record the machine and process that ran a stage of this chunk."""
        name = f"{socket.gethostname()}:{os.getpid()}"
        if name not in self.workers:
            self.workers.append(name)


@contextlib.contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds spent in the block to `timings[key]`."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - started


def timed_iter(items: Iterator[T], timings: dict[str, float], key: str) -> Iterator[T]:
    """Yield from `items`, adding the time spent producing each item to `timings[key]`."""
    while True:
        started = time.perf_counter()
        try:
            item = next(items)
        except StopIteration:
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - started
            return
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - started
        yield item
