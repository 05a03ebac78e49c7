"""The last step of a job: join its segments with the source's other streams, check the result, make previews.

A job is finished only when every chunk came back. If any failed, the job's row records the first
failure (by chunk order) and the segments that did succeed stay in the output store, so a rerun
redoes only the failed chunks. Otherwise the segments' packets and every other stream of the source
(audio, subtitles, data, attachments, with chapters and tags) are muxed into the output file (no
re-encoding), which appears only complete; the written file's frame timestamps are compared with
the source's, one by one, before the job counts as ok. The row says what the output is (codec,
pixel format, scan), how it departs from the source and why, and which streams a container could
not hold. Then the segments are deleted and the optional previews written.
"""

from __future__ import annotations

import contextlib
import logging
import math
import posixpath
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from pipelines import errors
from pipelines.edit.chunks import STAGE_TIMINGS, ChunkWork, timed
from pipelines.edit.compose import output_format
from pipelines.edit.previews import write_previews
from pipelines.edit.results import FAILED, OK, ResultRow, base_row
from pipelines.edit.settings import EditSettings
from pipelines.edit.stage_io import local_info, local_input, store_output
from pipelines.errors import NOT_A_VIDEO, RecordedFailure
from pipelines.media.video import VideoInfo, container_format, join_segments, probe, video_timestamps
from pipelines.storage import OutputStore

LOG = logging.getLogger(__name__)


def output_uri(settings: EditSettings, relpath: str) -> str:
    return f"{settings.output.rstrip('/')}/{relpath}"


def instants_shift(written: np.ndarray, written_base: Fraction, source: np.ndarray,
                   source_base: Fraction) -> Fraction | None:
    """The one offset (seconds) by which every written pts lies from the source's (0 when they name the
    same instants: exactly where the written time base can say them, else rounded to it, as Matroska
    counts milliseconds); None when the frames differ in number or spacing."""
    if len(written) != len(source) or not len(written):
        return None
    exact = [Fraction(int(p)) * source_base / written_base for p in source]
    offsets = {int(w) - math.floor(e + Fraction(1, 2)) for w, e in zip(written, exact)}
    return offsets.pop() * written_base if len(offsets) == 1 else None


def verify_output(path: Path, chunks: list[ChunkWork], info: VideoInfo, container: str) -> tuple[VideoInfo, str]:
    """Check the written video has exactly the source's frames at the source's instants; return its info
    and a note when every instant moved by one offset (a container that holds no negative times, such
    as MPEG-TS or Matroska, moves everything later when a source's audio starts before its video)."""
    expected = np.concatenate([c.pts for c in chunks])
    written, base = video_timestamps(path)
    shift = instants_shift(written, base, np.sort(expected), info.time_base)
    if shift is None or (shift and container in ("mp4", "mov")):
        raise RecordedFailure(errors.INTERNAL_ERROR,
                              f"the output has {len(written)} frames at other instants than the source's "
                              f"{len(expected)}: a bug in segment joining; the output was not published")
    note = f"every timestamp moved {float(shift):+.6f} s: a {container} file holds no negative times and a " \
           "stream of the source starts before its video" if shift else ""
    return probe(path, damaged=NOT_A_VIDEO), note


def _segments_local(store: OutputStore, chunks: list[ChunkWork], scratch: Path) -> list[Path]:
    if store.is_local:
        return [store.local_path(c.segment) for c in chunks]
    paths = []
    for chunk in chunks:
        target = scratch / Path(chunk.segment).name
        target.write_bytes(store.read_bytes(chunk.segment))
        paths.append(target)
    return paths


def _delete_segments(store: OutputStore, chunks: list[ChunkWork]) -> None:
    """Delete the job's segment folder (it holds only this job's segments of this spec)."""
    folder = posixpath.dirname(chunks[0].segment)
    store.delete_folder(folder)
    if store.is_local:
        with contextlib.suppress(OSError):
            store.local_path(posixpath.dirname(folder)).rmdir()  # `.segments`, when no other job has segments there


def _sheet_frames(chunks: list[ChunkWork], count: int) -> list[int]:
    weights = np.concatenate([c.weights for c in chunks])
    edited = np.flatnonzero(weights > 0)
    pool = edited if len(edited) else np.arange(len(weights))
    return sorted({int(pool[int(round(i))]) for i in np.linspace(0, len(pool) - 1, count)})


def finish_job(chunks: list[ChunkWork], settings: EditSettings, store: OutputStore, model: str) -> ResultRow:
    """The job's results row, after joining and checking its output when every chunk succeeded."""
    chunks = sorted(chunks, key=lambda c: c.index)
    started = min(c.started_at for c in chunks)
    first = chunks[0]
    job = first.job
    timings: dict[str, float] = {}
    for chunk in chunks:
        for key, value in chunk.timings.items():
            timings[key] = timings.get(key, 0.0) + value
    workers = sorted({w for c in chunks for w in c.workers})
    common = dict(attempt=first.work.attempt, spec=first.work.digest, model=model, worker=",".join(workers))
    failed = [c for c in chunks if not c.ok]
    info = first.info
    described = {} if info is None else dict(
        frames=int(sum(c.frames for c in chunks)), chunks=first.total, width=info.display_size[0],
        height=info.display_size[1], rotation=info.rotation, input_fps=info.rate_text,
        input_duration_s=info.duration_s, audio_streams=info.audio_streams, scan=scan_text(info))
    if failed:
        return _row(job, settings, timings, started, status=FAILED, failure_class=failed[0].failure_class,
                    message=failed[0].message, **described, **common)
    preview_video = preview_sheet = ""
    try:
        source = local_info(first, settings)
        output = output_format(source, job.output, settings)
        with tempfile.TemporaryDirectory(prefix="edit-join-") as scratch:
            with store_output(store, job.output) as target:
                with timed(timings, "join_s"):
                    container = container_format(job.output)
                    notes = join_segments(_segments_local(store, chunks, Path(scratch)), target, source, container)
                    written, moved = verify_output(target, chunks, source, container)
                if settings.previews:
                    with timed(timings, "preview_s"):
                        preview_video, preview_sheet = _previews(chunks, source, target, settings, store)
    except RecordedFailure as error:
        return _row(job, settings, timings, started, status=FAILED, failure_class=error.failure_class,
                    message=f"{job.source}: {error.message}", **described, **common)
    _delete_segments(store, chunks)
    edited = int(sum(c.frames_edited for c in chunks))
    turned = [f"faces found turned {source.turn} degrees counter-clockwise: edited in that orientation"] \
        if source.turn else []
    return _row(job, settings, timings, started, status=OK, frames_edited=edited,
                frames_passed_through=described["frames"] - edited, output_fps=written.rate_text,
                output_duration_s=written.duration_s, preview_video=preview_video, preview_sheet=preview_sheet,
                output_codec=output.text, streams_copied=sum(n.kept for n in notes),
                streams_dropped="; ".join(n.text for n in notes if not n.kept),
                format_notes="; ".join(note for note in (*output.notes, *turned, moved) if note), **described,
                **common)


def scan_text(info: VideoInfo) -> str:
    """How the source's scan was edited, for the results row."""
    if not info.field_order:
        return info.scan
    if info.one_field:
        return f"{info.scan}: face found on each frame's first field, pasted into both fields; encoded interlaced"
    return f"{info.scan}: analysed as woven frames (--deinterlace off); encoded interlaced"


def _previews(chunks: list[ChunkWork], source: VideoInfo, result: Path, settings: EditSettings,
              store: OutputStore) -> tuple[str, str]:
    job = chunks[0].job
    video, sheet = f"previews/{job.key}.mp4", f"previews/{job.key}.png"
    with store_output(store, video) as video_path, store_output(store, sheet) as sheet_path:
        write_previews(job, source, local_input(job.driving, settings.workdir), result, video_path, sheet_path,
                       settings, _sheet_frames(chunks, settings.sheet_frames))
    return output_uri(settings, video), output_uri(settings, sheet)


def _row(job, settings: EditSettings, timings: dict[str, float], started: float, **values) -> ResultRow:
    stages = {key: round(timings[key], 4) for key in (*STAGE_TIMINGS, "preview_s") if key in timings}
    return base_row(job, output_uri(settings, job.output), **stages, total_s=round(sum(stages.values()), 4),
                    wall_s=round(time.time() - started, 3), **values)
