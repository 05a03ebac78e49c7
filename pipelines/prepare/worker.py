"""The per-video unit of distributed work: download the needed spans once, then cut every clip.

One call handles all clips of one video, so a video with many clips is fetched once. Every clip
ends as a `ClipOutcome` (prepared or failed with a class and message); nothing here raises for bad
input, so one bad clip or video never takes the others down.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipelines import errors
from pipelines.dataset.schema import ClipSample
from pipelines.errors import RecordedFailure
from pipelines.media.faces import FaceDetector, make_detector
from pipelines.media.video import VideoInfo, probe
from pipelines.prepare.clip import process_clip
from pipelines.prepare.download import DownloadCache, DownloadedSection, DownloadError, download_for_clips, find_section
from pipelines.prepare.requests import ClipRequest, MetaBox
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


def _shift_boxes(boxes: tuple[MetaBox, ...], offset_s: float) -> tuple[MetaBox, ...]:
    return tuple(dataclasses.replace(b, t=b.t - offset_s) for b in boxes)


def prepare_video(requests: list[ClipRequest], settings: WorkerSettings) -> list[ClipOutcome]:
    """Download the spans of one video and prepare each of its clips."""
    if not requests:
        return []
    first = requests[0]
    started = time.perf_counter()
    cache = DownloadCache(Path(settings.download_dir))
    try:
        sections = download_for_clips(requests, cache, settings.download)
    except DownloadError as exc:
        LOG.warning("video %s: download failed (%s): %s", first.video_id, exc.failure_class, exc.message)
        return [ClipOutcome(r, failure_class=exc.failure_class, message=exc.message) for r in requests]
    download_s = time.perf_counter() - started

    detector = _detector(settings.detector)
    infos: dict[Path, VideoInfo] = {}
    outcomes = []
    for request in requests:
        outcome = _prepare_clip(request, sections, detector, settings, infos)
        outcome.timings["download_s"] = download_s / len(requests)
        outcomes.append(outcome)
    if any(o.failure_class == errors.CORRUPT_VIDEO for o in outcomes):  # maybe a damaged transfer: fetch anew
        for section in sections:
            cache.evict(section)
    return outcomes


def _prepare_clip(request: ClipRequest, sections: list[DownloadedSection], detector: FaceDetector,
                  settings: WorkerSettings, infos: dict[Path, VideoInfo]) -> ClipOutcome:
    """Cut one clip from its section; `infos` keeps each section's probe for the video's other clips."""
    try:
        section, _ = find_section(sections, request.start_s, request.end_s)
    except LookupError as exc:
        return ClipOutcome(request, failure_class=errors.SPAN_OUTSIDE_VIDEO,
                           message=f"clip {request.clip_id} ({request.url}): {exc}")
    offset = section.start_s
    start = None if request.start_s is None else request.start_s - offset
    end = None if request.end_s is None else request.end_s - offset
    try:
        if section.path not in infos:
            infos[section.path] = probe(section.path)
        processed = process_clip(section.path, start, end, _shift_boxes(request.boxes, offset), detector,
                                 request.provenance(), settings.sample_format, info=infos[section.path])
    except RecordedFailure as exc:
        return ClipOutcome(request, failure_class=exc.failure_class, message=f"clip {request.clip_id}: {exc.message}")
    except Exception as exc:  # a bug or an unforeseen input must not lose the other clips
        LOG.exception("clip %s: unexpected error", request.clip_id)
        return ClipOutcome(request, failure_class=errors.INTERNAL_ERROR,
                           message=f"clip {request.clip_id}: {type(exc).__name__}: {exc}")
    return ClipOutcome(request, sample=processed.sample, timings=dict(processed.timings))
