"""The units of work that travel between the editing stages, and their timing helpers.

A job enters as `JobWork` (in a `JobGroup`: the jobs one analysis task takes); the analysis stage turns it into one `ChunkWork` per chunk of frames
(or a single failed one), and packs consecutive chunks into `ChunkBundle`s: the unit a Ray Data
block carries, about one chunk's worth of frames (several short videos' chunks, or one chunk of a
long video), so the scheduler's per-block costs are paid per block of work, not per job. Each later
stage fills in its part of a chunk (crops, edited crops, segment) or records why it failed; a failed
chunk passes through the remaining stages untouched, so every chunk of every job comes out at the end
with a status. Everything here is plain data
(numpy arrays, dataclasses) that pickles between Ray workers.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, TypeVar

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


@dataclass(frozen=True)
class JobGroup:
    """Jobs one analysis task takes (one Ray Data row), with the frames of work its chunks are bundled up to
    (0: a chunk per bundle); both sized by the runner as the plan streams in (`runner.block_sizes`)."""

    works: list[JobWork]
    bundle_frames: int


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


BUNDLED_PIXELS = ("source_crops", "driving_crops", "reference_crop", "edited")
"""The `ChunkWork` fields holding crops, which a bundle carries concatenated (as tensor columns)."""

MAX_CHUNKS_PER_BUNDLE = 64
"""Chunks in one bundle at most, whatever their frames (failed and reused chunks carry no work)."""


@dataclass
class ChunkBundle:
    """Consecutive chunks travelling as one row: each crop field holds the chunks' crops concatenated (one
    array, so the stage I/O keeps them as a tensor column), `counts` how many rows of it are each chunk's
    (-1: none)."""

    chunks: list[ChunkWork]
    counts: dict[str, list[int]] = field(default_factory=dict)
    source_crops: np.ndarray | None = None
    driving_crops: np.ndarray | None = None
    reference_crop: np.ndarray | None = None
    edited: np.ndarray | None = None

    @classmethod
    def of(cls, chunks: list[ChunkWork]) -> ChunkBundle:
        """A bundle of `chunks`, their crops moved into its own fields."""
        bundle = cls(chunks)
        for name in BUNDLED_PIXELS:
            arrays = [getattr(chunk, name) for chunk in chunks]
            bundle.counts[name] = [-1 if array is None else len(array) for array in arrays]
            present = [array for array in arrays if array is not None]
            if present:
                setattr(bundle, name, present[0] if len(present) == 1 else np.concatenate(present))
            for chunk in chunks:
                setattr(chunk, name, None)
        return bundle

    def unbundle(self) -> list[ChunkWork]:
        """The chunks, each with its crops back (views of the bundle's arrays)."""
        for name in BUNDLED_PIXELS:
            array, start = getattr(self, name), 0
            for chunk, count in zip(self.chunks, self.counts.get(name, ())):
                if count >= 0 and array is not None:
                    setattr(chunk, name, array[start:start + count])
                    start += count
        return self.chunks


def chunk_work(chunk: ChunkWork) -> int:
    """Frames a later stage works on in this chunk (none when it failed or an earlier run's segment is reused)."""
    return chunk.frames if chunk.ok and not chunk.reused else 0


def bundle_chunks(chunks: Iterable[ChunkWork], frames: int) -> Iterator[ChunkBundle]:
    """Consecutive chunks in bundles of at most `frames` frames of work (a chunk with more travels alone) and
    `MAX_CHUNKS_PER_BUNDLE` chunks; `frames` 0: one chunk per bundle."""
    bundle: list[ChunkWork] = []
    work = 0
    for chunk in chunks:
        size = chunk_work(chunk)
        if bundle and (work + size > frames or len(bundle) >= MAX_CHUNKS_PER_BUNDLE):
            yield ChunkBundle.of(bundle)
            bundle, work = [], 0
        bundle.append(chunk)
        work += size
    if bundle:
        yield ChunkBundle.of(bundle)


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
