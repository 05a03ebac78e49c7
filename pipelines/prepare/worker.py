"""The per-video unit of distributed work: download the needed spans once, then cut every clip.

One call handles all clips of one video, so a video with many clips is fetched once. Every clip
ends as a `ClipOutcome` (prepared or failed with a class and message); nothing here raises for bad
input, so one bad clip or video never takes the others down.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipelines import errors
from pipelines.dataset.schema import ClipSample
from pipelines.errors import RecordedFailure, VideoError
from pipelines.media.faces import FaceDetector, make_detector
from pipelines.media.video import SPAN_TOLERANCE_S, VideoInfo, probe
from pipelines.prepare.clip import process_clip
from pipelines.prepare.download import (
    Download,
    DownloadCache,
    DownloadedSection,
    DownloadError,
    download_for_clips,
    find_section,
)
from pipelines.prepare.requests import ClipRequest
from pipelines.prepare.settings import DownloadOptions, SampleFormat

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs to prepare clips; plain data so it travels to Ray workers."""

    download_dir: str
    detector: str = "auto"
    download: DownloadOptions = field(default_factory=DownloadOptions)
    sample_format: SampleFormat = field(default_factory=SampleFormat)


@dataclass
class ClipOutcome:
    """The result of one requested clip: `sample` when it succeeded, else a failure class."""

    request: ClipRequest
    sample: ClipSample | None = None
    failure_class: str | None = None
    message: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.sample is not None


@functools.lru_cache(maxsize=4)
def _detector(name: str) -> FaceDetector:
    """One detector per worker process: Ray reuses workers, so models load once, not per task."""
    return make_detector(name)


def prepare_video(requests: list[ClipRequest], settings: WorkerSettings) -> list[ClipOutcome]:
    """Download the spans of one video and prepare each of its clips."""
    if not requests:
        return []
    first = requests[0]
    started = time.perf_counter()
    cache = DownloadCache(Path(settings.download_dir))
    try:
        download = download_for_clips(requests, cache, settings.download)
    except DownloadError as exc:
        LOG.warning("video %s: download failed (%s): %s", first.video_id, exc.failure_class, exc.message)
        return [ClipOutcome(r, failure_class=exc.failure_class, message=f"{clip_label(r)}: {_reason(exc, r)}")
                for r in requests]
    download_s = time.perf_counter() - started

    detector = _detector(settings.detector)
    infos: dict[Path, VideoInfo] = {}
    outcomes = []
    for request in requests:
        outcome = _prepare_clip(request, download, detector, settings, infos)
        outcome.timings["download_s"] = download_s / len(requests)
        outcomes.append(outcome)
    if any(o.failure_class == errors.CORRUPT_VIDEO for o in outcomes):  # maybe a damaged transfer: fetch anew
        for section in download.sections:
            cache.evict(section)
    return outcomes


def clip_label(request: ClipRequest) -> str:
    """How messages name a clip: its id, its URL and the span asked for, in the video's own time."""
    span = "the whole video" if request.start_s is None else f"{request.start_s:.3f}-{request.end_s:.3f} s"
    return f"clip {request.clip_id} ({request.url}, {span})"


def _reason(error: DownloadError, request: ClipRequest) -> str:
    """The download error's message without the `video <id> (<url>): ` prefix the label repeats."""
    prefix = f"video {request.video_id} ("
    return error.message.split("): ", 1)[-1] if error.message.startswith(prefix) else error.message


def _prepare_clip(request: ClipRequest, download: Download, detector: FaceDetector, settings: WorkerSettings,
                  infos: dict[Path, VideoInfo]) -> ClipOutcome:
    """Cut one clip from its section; `infos` keeps each section's probe for the video's other clips."""
    label = clip_label(request)
    try:
        section, _ = find_section(download.sections, request.start_s, request.end_s)
    except LookupError:
        return _missing_span(request, download, label)
    try:
        if section.path not in infos:
            infos[section.path] = section.info or probe(section.path)
        info = infos[section.path]
        start, end, note = _span_in_section(request, section, info, settings.sample_format)
        processed = process_clip(section.path, start, end, request.boxes.shifted(section.start_s), detector,
                                 request.provenance(), settings.sample_format, info=info, offset_s=section.start_s,
                                 label=label)
    except RecordedFailure as exc:
        message = exc.message if exc.message.startswith(label) else f"{label}: {exc.message.split(': ', 1)[-1]}"
        return ClipOutcome(request, failure_class=exc.failure_class, message=message)
    except Exception as exc:  # a bug or an unforeseen input must not lose the other clips
        LOG.exception("clip %s: unexpected error", request.clip_id)
        return ClipOutcome(request, failure_class=errors.INTERNAL_ERROR, message=f"{label}: {type(exc).__name__}: {exc}")
    return ClipOutcome(request, sample=processed.sample, timings=dict(processed.timings), message=note)


def _missing_span(request: ClipRequest, download: Download, label: str) -> ClipOutcome:
    """A clip whose span no downloaded section holds: past the end of the video, or lost data."""
    duration = download.duration_s
    if duration is not None and request.start_s is not None and request.start_s >= duration - SPAN_TOLERANCE_S:
        return ClipOutcome(request, failure_class=errors.SPAN_OUTSIDE_VIDEO,
                           message=f"{label}: the span is not inside the video, which ends at {duration:.3f} s")
    known = f"the video is {duration:.3f} s long" if duration is not None else "the video's length is unknown"
    return ClipOutcome(request, failure_class=errors.NO_VIDEO_IN_SPAN,
                       message=f"{label}: no video data came for this span ({known}): the file is truncated or "
                               "the transfer was damaged")


def _span_in_section(request: ClipRequest, section: DownloadedSection, info: VideoInfo,
                     sample_format: SampleFormat) -> tuple[float | None, float | None, str]:
    """The clip's span in the section's own time, shortened to the end of the video when it runs past
    it and enough frames remain; with a note for the manifest when it was shortened."""
    if request.start_s is None:
        return None, None, ""
    video_end = section.start_s + info.duration_s
    start, end = request.start_s, request.end_s
    if start >= video_end - SPAN_TOLERANCE_S:
        raise VideoError(errors.SPAN_OUTSIDE_VIDEO, f"the span is not inside the video, which ends at {video_end:.3f} s")
    note = ""
    if end > video_end + SPAN_TOLERANCE_S:
        remaining = int((video_end - start) * sample_format.fps)
        if remaining < sample_format.min_clip_frames:
            raise VideoError(errors.SPAN_OUTSIDE_VIDEO, f"the video ends at {video_end:.3f} s, leaving {remaining} "
                                                        f"frames of the span (fewer than --min-clip-frames "
                                                        f"{sample_format.min_clip_frames})")
        note = f"span shortened: the video ends at {video_end:.3f} s, before the requested end {end:.3f} s"
        end = video_end
    return start - section.start_s, end - section.start_s, note
