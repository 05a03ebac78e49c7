"""Download only the time spans of a video that clips need, with yt-dlp used as a library.

All spans wanted from one video are merged (with a margin) and fetched in ONE yt-dlp call that
asks for several sections; ffmpeg seeks inside the remote file, so a 10 s clip of an hour-long
video costs seconds, not the hour. Around that call this module adds what an archive-scale run
needs: a cache so reruns skip finished work, retries with backoff for transient failures only,
failure classes that say what went wrong, and refusal of local-file URLs unless asked for.

yt-dlp's own retries are switched off: every retry happens here, so a policy (count, backoff,
which errors) holds in one place and can be tested.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence
from urllib.parse import urlsplit

import yt_dlp
from yt_dlp.networking.exceptions import HTTPError, TransportError
from yt_dlp.utils import GeoRestrictedError, UnsupportedError, download_range_func

from pipelines import errors
from pipelines.dataset.schema import safe_key
from pipelines.errors import RecordedFailure, VideoError, is_transient, retried_on_rerun
from pipelines.media.video import VideoInfo, ffmpeg_exe, probe
from pipelines.prepare.requests import ClipRequest, resolve_url
from pipelines.prepare.settings import DownloadOptions
from pipelines.storage import atomic_local_path

log = logging.getLogger(__name__)

Span = tuple[float, float]
"""(start, end) in seconds from the start of the video."""


@dataclass(frozen=True)
class DownloadedSection:
    """A downloaded file holding the video from `start_s` to `end_s` (None: to the end).

    Times inside the file are relative to `start_s`.
    """

    path: Path
    start_s: float
    end_s: float | None
    info: VideoInfo | None = field(default=None, compare=False)
    """The file's probe when the download already made it (a cached section is probed when used)."""

    def contains(self, start_s: float | None, end_s: float | None) -> bool:
        """Whether the span (None ends: the whole video) lies inside this section."""
        start = 0.0 if start_s is None else start_s
        if start < self.start_s - 1e-6:
            return False
        if self.end_s is None:
            return True
        return end_s is not None and end_s <= self.end_s + 1e-6


@dataclass(frozen=True)
class Download:
    """What one video's download gave: the sections that hold video (possibly none, when every
    requested span lies past the end or in lost data) and the video's duration when it is known."""

    sections: tuple[DownloadedSection, ...]
    duration_s: float | None = None


class DownloadError(RecordedFailure):
    """A video could not be downloaded. `permanent` means retrying cannot help (the video is gone,
    private, blocked, or the URL is refused); transient classes are retried with backoff."""

    @property
    def permanent(self) -> bool:
        return not is_transient(self.failure_class)


# --- URLs --------------------------------------------------------------------------------------

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def check_url(url: str, allow_file_urls: bool = False) -> str:
    """Return the URL to hand to yt-dlp, or raise DownloadError(refused_scheme) for anything but http(s).

    With `allow_file_urls`, file:// URLs and plain local paths (made into file:// URLs) pass too.
    """
    scheme_match = _SCHEME.match(url)
    scheme = scheme_match.group(1).lower() if scheme_match else ""
    if scheme in ("http", "https"):
        if not urlsplit(url).hostname:
            raise DownloadError(errors.BAD_URL, f"URL has no host: {url!r}")
        return url
    if allow_file_urls and scheme == "file":
        return url
    if allow_file_urls and not scheme:
        path = Path(url).expanduser().resolve()
        if not path.is_file():
            raise DownloadError(errors.NOT_FOUND, f"local file does not exist: {path}")
        return path.as_uri()
    hint = "" if allow_file_urls else " (local files need allow_file_urls / --allow-file-urls)"
    raise DownloadError(errors.REFUSED_SCHEME, f"refusing to download {url!r}: only http(s) URLs are allowed{hint}")


# --- spans -------------------------------------------------------------------------------------

def merge_spans(spans: Iterable[Span | None], margin_s: float = 0.5, join_gap_s: float = 1.0) -> list[Span] | None:
    """Pad each span by `margin_s`, then merge those that overlap or are within `join_gap_s`.

    Returns sorted, disjoint spans, or None when any span is None (the whole video is needed).
    """
    padded = []
    for span in spans:
        if span is None:
            return None
        start, end = float(span[0]), float(span[1])
        if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end):
            raise ValueError(f"bad time span {span!r}: need 0 <= start < end, in seconds")
        padded.append((max(0.0, start - margin_s), end + margin_s))
    merged: list[Span] = []
    for start, end in sorted(padded):
        if merged and start <= merged[-1][1] + join_gap_s:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def find_section(sections: Sequence[DownloadedSection], start_s: float | None,
                 end_s: float | None) -> tuple[DownloadedSection, float]:
    """The section holding a clip, and the clip's start time inside that section's file."""
    for section in sections:
        if section.contains(start_s, end_s):
            return section, (start_s or 0.0) - section.start_s
    raise LookupError(f"no downloaded section holds {start_s}-{end_s} s (have "
                      f"{[(s.start_s, s.end_s) for s in sections]})")


# --- failures ----------------------------------------------------------------------------------

_HTTP_CLASSES = {404: errors.NOT_FOUND, 410: errors.GONE, 403: errors.FORBIDDEN, 401: errors.FORBIDDEN,
                 429: errors.RATE_LIMITED}

_MESSAGE_CLASSES = [  # first match wins; lower-case text of yt-dlp's message
    (re.compile(r"timed out|timeout"), errors.TIMEOUT),
    (re.compile(r"http error 404"), errors.NOT_FOUND),
    (re.compile(r"http error 410"), errors.GONE),
    (re.compile(r"http error 40[13]"), errors.FORBIDDEN),
    (re.compile(r"http error 429|too many requests|confirm you.re not a bot"), errors.RATE_LIMITED),
    (re.compile(r"http error 5\d\d"), errors.SERVER_ERROR),
    (re.compile(r"http error \d{3}"), errors.HTTP_ERROR),
    (re.compile(r"private video|video is private"), errors.PRIVATE),
    (re.compile(r"copyright\b"), errors.COPYRIGHT),
    (re.compile(r"in your country|geo.?restrict"), errors.GEO_BLOCKED),
    (re.compile(r"confirm your age|age.restricted|inappropriate for some users"), errors.AGE_RESTRICTED),
    (re.compile(r"unsupported url"), errors.UNSUPPORTED_URL),
    (re.compile(r"cannot be partially downloaded|requested format is not available"), errors.UNSUPPORTED_FORMAT),
    (re.compile(r"video unavailable|not available|has been removed|been terminated|no longer available"
                r"|does not exist"), errors.UNAVAILABLE),
    (re.compile(r"did not get any data blocks|downloaded file is empty"), errors.NOT_A_VIDEO),
    (re.compile(r"connection (reset|refused|aborted)|remote end closed|incomplete ?read|broken pipe"
                r"|temporary failure in name resolution|name or service not known|network is unreachable"),
     errors.NETWORK),
]


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error and everything it wraps (yt-dlp keeps causes in exc_info and .cause)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        exc_info = getattr(current, "exc_info", None)
        stack += [getattr(current, "cause", None), current.__cause__, current.__context__,
                  exc_info[1] if isinstance(exc_info, tuple) and len(exc_info) > 1 else None]


def classify_failure(error: BaseException) -> str:
    """A failure class for an exception raised by yt-dlp: structured causes first, then the message."""
    for cause in _causes(error):
        if isinstance(cause, HTTPError):
            status = cause.status
            return _HTTP_CLASSES.get(status) or (errors.SERVER_ERROR if 500 <= status < 600 else errors.HTTP_ERROR)
        if isinstance(cause, GeoRestrictedError):
            return errors.GEO_BLOCKED
        if isinstance(cause, UnsupportedError):
            return errors.UNSUPPORTED_URL
        if isinstance(cause, TimeoutError):
            return errors.TIMEOUT
    text = str(error).lower()
    for pattern, failure_class in _MESSAGE_CLASSES:
        if pattern.search(text):
            return failure_class
    if any(isinstance(cause, (TransportError, ConnectionError)) for cause in _causes(error)):
        return errors.NETWORK
    return errors.DOWNLOAD_FAILED


# --- cache -------------------------------------------------------------------------------------

class DownloadCache:
    """Downloaded sections on disk, keyed by (video id, merged spans), plus permanent failures.

    An entry is built in a staging folder and renamed into place after its marker `done.json`
    is written, so an entry either is complete or does not exist, even if a run is killed.
    """

    MARKER = "done.json"

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def entry_dir(self, video_id: str, spans: list[Span] | None) -> Path:
        return self.directory / safe_key(video_id) / _spans_digest(spans)

    def lookup(self, video_id: str, spans: list[Span] | None) -> Download | None:
        """The cached download for exactly these spans, or None when it was never completed."""
        entry = self.entry_dir(video_id, spans)
        try:
            record = json.loads((entry / self.MARKER).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        sections = tuple(DownloadedSection(entry / item["file"], item["start_s"], item["end_s"])
                         for item in record["sections"])
        if not all(section.path.is_file() for section in sections):
            return None
        return Download(sections, record.get("duration_s"))

    def evict(self, section: DownloadedSection) -> None:
        """Forget the entry holding `section` (found damaged after download), so a rerun fetches it anew."""
        entry = section.path.parent.resolve()
        if self.directory.resolve() not in entry.parents:
            raise ValueError(f"{section.path} is not inside the download cache {self.directory}")
        shutil.rmtree(entry, ignore_errors=True)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh folder for one download attempt, removed afterwards whatever happens."""
        folder = self.directory / ".staging" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def commit(self, video_id: str, url: str, spans: list[Span] | None, staging: Path,
               downloaded: Download) -> Download:
        """Move downloaded files out of `staging` into the entry for (video_id, spans), atomically."""
        entry = self.entry_dir(video_id, spans)
        build = staging / "entry"
        build.mkdir()
        record = {"video_id": video_id, "url": url, "spans": spans, "duration_s": downloaded.duration_s,
                  "sections": []}
        for index, section in enumerate(sorted(downloaded.sections, key=lambda s: s.start_s)):
            name = f"section-{index:03d}{section.path.suffix}"
            os.replace(section.path, build / name)
            record["sections"].append({"file": name, "start_s": section.start_s, "end_s": section.end_s})
        _write_json_atomically(build / self.MARKER, record)
        entry.parent.mkdir(parents=True, exist_ok=True)
        if entry.exists() and not (entry / self.MARKER).exists():
            shutil.rmtree(entry)  # left by an older layout or a manual edit: never trusted
        try:
            os.rename(build, entry)
        except OSError:
            if self.lookup(video_id, spans) is None:  # not a concurrent winner: a real error
                raise
        cached = self.lookup(video_id, spans)
        assert cached is not None
        return cached

    def _failure_path(self, video_id: str) -> Path:
        return self.directory / "failures" / f"{safe_key(video_id)}.json"

    def record_failure(self, video_id: str, url: str, error: DownloadError) -> None:
        """Remember a permanent failure so later runs do not ask the host again."""
        path = self._failure_path(video_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomically(path, {"url": url, "failure_class": error.failure_class, "message": error.message})

    def recorded_failure(self, video_id: str, url: str) -> DownloadError | None:
        """The permanent failure recorded for this video at this URL, if any."""
        try:
            record = json.loads(self._failure_path(video_id).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if record.get("url") != url:
            return None
        return DownloadError(record["failure_class"], f"{record['message']} (recorded by an earlier run)")

    def forget_failure(self, video_id: str) -> None:
        self._failure_path(video_id).unlink(missing_ok=True)


def _spans_digest(spans: list[Span] | None) -> str:
    if spans is None:
        return "whole"
    canonical = json.dumps([[round(start, 3), round(end, 3)] for start, end in spans])
    return "spans-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _write_json_atomically(path: Path, record: dict) -> None:
    with atomic_local_path(path) as temporary:
        temporary.write_text(json.dumps(record, indent=1))


# --- ffmpeg for yt-dlp -------------------------------------------------------------------------

_FFMPEG_LOCK = threading.Lock()
_ffmpeg_dir: Path | None = None


def ensure_ffmpeg_on_path() -> Path:
    """Put a binary named `ffmpeg` (a link to imageio's) first on PATH, once per process.

    yt-dlp's check for partial (section) downloads looks for `ffmpeg` on PATH and ignores
    `ffmpeg_location`; there is no system ffmpeg on the project's machines.
    """
    global _ffmpeg_dir
    with _FFMPEG_LOCK:
        if _ffmpeg_dir is None:
            folder = Path(tempfile.mkdtemp(prefix="portrait-ffmpeg-"))
            (folder / "ffmpeg").symlink_to(ffmpeg_exe())
            os.environ["PATH"] = os.pathsep.join([str(folder), os.environ.get("PATH", "")])
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            _ffmpeg_dir = folder
        return _ffmpeg_dir


# --- downloading -------------------------------------------------------------------------------

class _YtDlpLog:
    """Routes yt-dlp's output to Python logging; its errors are re-raised as DownloadError, so debug."""

    _log = logging.getLogger(f"{__name__}.yt_dlp")

    def debug(self, message: str) -> None:
        self._log.debug(message)

    info = debug

    def warning(self, message: str) -> None:
        self._log.warning(message)

    def error(self, message: str) -> None:
        self._log.debug(message)


def _ytdlp_params(options: DownloadOptions, spans: list[Span] | None, folder: Path, file_url: bool) -> dict:
    params = {
        "outtmpl": {"default": str(folder / "section-%(section_start|0)s.%(ext)s")},
        "format": options.format_selector(),
        "merge_output_format": "mp4",
        "logger": _YtDlpLog(),
        "quiet": True,
        "noprogress": True,
        "no_color": True,
        "noplaylist": True,
        "cachedir": False,
        "socket_timeout": options.socket_timeout_s,
        "retries": 0,
        "fragment_retries": 0,
        "extractor_retries": 0,
        "enable_file_urls": file_url,
        "ffmpeg_location": str(ensure_ffmpeg_on_path() / "ffmpeg"),
        # Sections are read by ffmpeg, which ignores socket_timeout and by default waits forever
        # on a server that stops sending: give its inputs the same read timeout (microseconds).
        "external_downloader_args": {"ffmpeg_i": ["-rw_timeout", str(int(options.socket_timeout_s * 1e6))]},
    }
    if spans is not None:
        params["download_ranges"] = download_range_func(None, spans)
        params["force_keyframes_at_cuts"] = True
    if options.rate_limit_bytes_per_s:
        params["ratelimit"] = options.rate_limit_bytes_per_s
    if options.sleep_between_s > 0:
        params["sleep_interval"] = options.sleep_between_s
    if options.cookies_file:
        params["cookiefile"] = str(options.cookies_file)
    if options.proxy:
        params["proxy"] = options.proxy
    return params


_DOWNLOADERS = threading.local()


def _downloader(options: DownloadOptions, file_url: bool, spans: list[Span] | None, folder: Path) -> yt_dlp.YoutubeDL:
    """This thread's yt-dlp instance for `options`, pointed at `folder` and `spans`.

    Building a `YoutubeDL` loads its extractors (about 20 ms of CPU, more than a whole 404 costs
    otherwise), so each worker thread keeps one per set of options and only the per-video
    parameters change between videos.
    """
    cache = _DOWNLOADERS.__dict__.setdefault("instances", {})
    ydl = cache.get((options, file_url))
    if ydl is None:
        ydl = cache[(options, file_url)] = yt_dlp.YoutubeDL(_ytdlp_params(options, None, folder, file_url))
    fresh = _ytdlp_params(options, spans, folder, file_url)
    ydl.params["outtmpl"]["default"] = fresh["outtmpl"]["default"]
    for key in ("download_ranges", "force_keyframes_at_cuts"):
        if key in fresh:
            ydl.params[key] = fresh[key]
        else:
            ydl.params.pop(key, None)
    return ydl


def _fetch(video_id: str, url: str, spans: list[Span] | None, folder: Path, options: DownloadOptions) -> Download:
    """One yt-dlp call for all spans of a video; files land in `folder`.

    A whole-video download that is not a playable video fails with the class of what it is
    (`not_a_video`, `no_video_stream`, `corrupt_video`). Sections without video (ffmpeg writes an
    empty file for a span past the end, or for data the host lost) are dropped; the video's
    duration is looked up then, so each clip can be told which of the two it met.
    """
    try:
        info = _downloader(options, url.startswith("file:"), spans, folder).extract_info(url, download=True)
    except yt_dlp.utils.YoutubeDLError as error:
        failure_class = classify_failure(error)
        reason = re.sub(r"^ERROR:\s*", "", str(error))
        if failure_class == errors.NOT_A_VIDEO:
            reason = f"the host sent an empty file ({reason})"
        raise DownloadError(failure_class, f"video {video_id} ({url}): {reason}") from error
    downloads = (info or {}).get("requested_downloads") or []
    if not downloads:
        kind = "a playlist" if (info or {}).get("entries") is not None else "nothing downloadable"
        raise DownloadError(errors.BAD_URL, f"video {video_id} ({url}): yt-dlp found {kind}, expected one video")
    sections = [DownloadedSection(Path(item["filepath"]), float(item.get("section_start") or 0.0),
                                  item.get("section_end")) for item in downloads]
    usable, problems = [], []
    for section in sections:
        try:
            usable.append(replace(section, info=probe(section.path)))
        except VideoError as problem:
            problems.append(problem)
    if spans is None and not usable:
        problem = problems[0]
        reason = problem.message.split(": ", 1)[-1]  # the downloaded file's cache path means nothing to a user
        raise DownloadError(problem.failure_class, f"video {video_id} ({url}): {reason}")
    duration = info.get("duration")
    if problems and duration is None:
        duration = _remote_duration(info.get("url") or url, options)
    for section in sections:
        if section not in usable:
            log.warning("video %s (%s): no video in %.1f-%s s (the video %s): its clips are recorded as missing",
                        video_id, url, section.start_s, section.end_s,
                        f"ends at {duration:.1f} s" if duration else "length is unknown")
    return Download(tuple(usable), None if duration is None else float(duration))


def _remote_duration(url: str, options: DownloadOptions) -> float | None:
    """The duration in the media's header when it can be read over http(s), else None."""
    if not url.startswith(("http://", "https://")):
        return None
    try:
        return probe(url, timeout_s=options.socket_timeout_s).duration_s
    except VideoError:
        return None


def download_video(video_id: str, url: str, spans: Iterable[Span | None], cache: DownloadCache,
                   options: DownloadOptions = DownloadOptions()) -> Download:
    """Download the sections of one video that cover `spans` (None: the whole video), or reuse the cache.

    Transient failures are retried `options.retries` times with exponential backoff and jitter;
    permanent ones are recorded in the cache and raised at once. Raises DownloadError.
    """
    url = check_url(url, options.allow_file_urls)
    merged = merge_spans(spans, options.margin_s, options.join_gap_s)
    if merged is not None and url.startswith("file:"):
        log.info("video %s: yt-dlp cannot cut sections of local files, taking the whole file", video_id)
        merged = None
    cached = cache.lookup(video_id, merged)
    if cached is not None:
        return cached
    recorded = None if options.retry_recorded_failures else cache.recorded_failure(video_id, url)
    if recorded is not None:
        raise recorded
    for attempt in range(options.retries + 1):
        try:
            with cache.staging() as folder:
                downloaded = cache.commit(video_id, url, merged, folder, _fetch(video_id, url, merged, folder, options))
            cache.forget_failure(video_id)
            return downloaded
        except DownloadError as error:
            if error.permanent:
                if not retried_on_rerun(error.failure_class):  # a damaged transfer may come right next time
                    cache.record_failure(video_id, url, error)
                raise
            if attempt == options.retries:
                raise
            delay = options.backoff_base_s * 2 ** attempt * random.uniform(0.5, 1.5)
            log.warning("%s; retry %d/%d in %.1f s", error.message, attempt + 1, options.retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")


def download_for_clips(requests: Sequence[ClipRequest], cache: DownloadCache,
                       options: DownloadOptions = DownloadOptions()) -> Download:
    """Download what the clips of ONE video need, in one yt-dlp call (see `find_section` to cut them)."""
    if not requests:
        return Download(())
    videos = {(request.video_id, request.url) for request in requests}
    if len(videos) != 1:
        raise ValueError(f"download_for_clips takes clips of one video, got {sorted(videos)}")
    video_id, url = videos.pop()
    spans = [None if request.start_s is None or request.end_s is None else (request.start_s, request.end_s)
             for request in requests]
    return download_video(video_id, resolve_url(url or video_id, options.url_template), spans, cache, options)


__all__ = ["Download", "DownloadCache", "DownloadError", "DownloadOptions", "DownloadedSection",
           "Span", "check_url", "classify_failure", "download_for_clips", "download_video",
           "ensure_ffmpeg_on_path", "find_section", "merge_spans"]
