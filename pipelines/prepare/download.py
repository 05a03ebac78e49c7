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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence
from urllib.parse import quote, urlsplit

import yt_dlp
from yt_dlp.networking.exceptions import HTTPError, TransportError
from yt_dlp.utils import GeoRestrictedError, UnsupportedError, download_range_func

from pipelines.prepare.requests import ClipRequest, safe_key
from pipelines.errors import VideoError
from pipelines.media.video import ffmpeg_exe, probe

log = logging.getLogger(__name__)

DEFAULT_URL_TEMPLATE = "https://www.youtube.com/watch?v={id}"

Span = tuple[float, float]
"""(start, end) in seconds from the start of the video."""


@dataclass(frozen=True)
class DownloadOptions:
    """How to download: politeness, network settings, retry policy, format and URL mapping."""

    rate_limit_bytes_per_s: int | None = None
    """Applies to whole-video downloads (yt-dlp's HTTP downloader); sections are read by ffmpeg."""
    sleep_between_s: float = 0.0
    """Pause before each download (yt-dlp `sleep_interval`), to be polite to the host."""
    cookies_file: Path | None = None
    proxy: str | None = None
    retries: int = 3
    """Extra attempts after a transient failure; permanent failures are never retried."""
    backoff_base_s: float = 2.0
    """Retry k waits backoff_base_s * 2**k, times a random factor in [0.5, 1.5)."""
    socket_timeout_s: float = 20.0
    allow_file_urls: bool = False
    max_height: int = 360
    format: str | None = None
    """A yt-dlp format selector; None picks mp4 at most `max_height` high."""
    url_template: str = DEFAULT_URL_TEMPLATE
    margin_s: float = 0.5
    """Added before and after each span, so cuts never clip a requested frame."""
    join_gap_s: float = 1.0
    """Spans whose padded ends are at most this far apart are fetched as one section."""
    retry_recorded_failures: bool = False
    """Try again videos that failed permanently in an earlier run (otherwise the record is raised)."""

    def format_selector(self) -> str:
        if self.format:
            return self.format
        h = int(self.max_height)
        return (f"bv*[height<=?{h}][ext=mp4]+ba[ext=m4a]/b[height<=?{h}][ext=mp4]"
                f"/bv*[height<=?{h}]+ba/b[height<=?{h}]/b")


@dataclass(frozen=True)
class DownloadedSection:
    """A downloaded file holding the video from `start_s` to `end_s` (None: to the end).

    Times inside the file are relative to `start_s`.
    """

    path: Path
    start_s: float
    end_s: float | None

    def contains(self, start_s: float | None, end_s: float | None) -> bool:
        """Whether the span (None ends: the whole video) lies inside this section."""
        start = 0.0 if start_s is None else start_s
        if start < self.start_s - 1e-6:
            return False
        if self.end_s is None:
            return True
        return end_s is not None and end_s <= self.end_s + 1e-6


class DownloadError(Exception):
    """A video could not be downloaded. `failure_class` is a short stable name; `permanent` means
    retrying cannot help (the video is gone, private, blocked, or the URL is refused)."""

    def __init__(self, failure_class: str, message: str, permanent: bool) -> None:
        super().__init__(message)
        self.failure_class = failure_class
        self.message = message
        self.permanent = permanent

    def __reduce__(self):  # picklable across Ray/Prefect workers
        return (type(self), (self.failure_class, self.message, self.permanent))


# --- URLs --------------------------------------------------------------------------------------

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def resolve_url(video_id_or_url: str, template: str = DEFAULT_URL_TEMPLATE) -> str:
    """The URL to fetch: URLs and local paths are returned as they are, ids fill `{id}` of `template`.

    The id is percent-encoded and only ever becomes part of a URL (yt-dlp is called as a library,
    never through a command line), so ids starting with '-' or '_' are plain ids.
    """
    text = video_id_or_url.strip()
    if not text:
        raise ValueError("empty video id or URL")
    if "://" in text or text.startswith(("/", "./", "../", "~")):
        return text
    if "{id}" not in template:
        raise ValueError(f"URL template {template!r} has no '{{id}}' placeholder (e.g. {DEFAULT_URL_TEMPLATE})")
    return template.replace("{id}", quote(text, safe=""))


def check_url(url: str, allow_file_urls: bool = False) -> str:
    """Return the URL to hand to yt-dlp, or raise DownloadError("refused_scheme") for anything but http(s).

    With `allow_file_urls`, file:// URLs and plain local paths (made into file:// URLs) pass too.
    """
    scheme_match = _SCHEME.match(url)
    scheme = scheme_match.group(1).lower() if scheme_match else ""
    if scheme in ("http", "https"):
        if not urlsplit(url).hostname:
            raise DownloadError("bad_url", f"URL has no host: {url!r}", permanent=True)
        return url
    if allow_file_urls and scheme == "file":
        return url
    if allow_file_urls and not scheme:
        path = Path(url).expanduser().resolve()
        if not path.is_file():
            raise DownloadError("not_found", f"local file does not exist: {path}", permanent=True)
        return path.as_uri()
    hint = "" if allow_file_urls else " (local files need allow_file_urls / --allow-file-urls)"
    raise DownloadError("refused_scheme", f"refusing to download {url!r}: only http(s) URLs are allowed{hint}",
                        permanent=True)


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

_TRANSIENT = {"timeout", "network", "server_error", "rate_limited", "unknown"}

_HTTP_CLASSES = {404: "not_found", 410: "gone", 403: "forbidden", 401: "forbidden", 429: "rate_limited"}

_MESSAGE_CLASSES = [  # first match wins; lower-case text of yt-dlp's message
    (re.compile(r"timed out|timeout"), "timeout"),
    (re.compile(r"http error 404"), "not_found"),
    (re.compile(r"http error 410"), "gone"),
    (re.compile(r"http error 40[13]"), "forbidden"),
    (re.compile(r"http error 429|too many requests|confirm you.re not a bot"), "rate_limited"),
    (re.compile(r"http error 5\d\d"), "server_error"),
    (re.compile(r"http error \d{3}"), "http_error"),
    (re.compile(r"private video|video is private"), "private"),
    (re.compile(r"copyright"), "copyright"),
    (re.compile(r"in your country|geo.?restrict"), "geo_blocked"),
    (re.compile(r"confirm your age|age.restricted|inappropriate for some users"), "age_restricted"),
    (re.compile(r"unsupported url"), "unsupported_url"),
    (re.compile(r"cannot be partially downloaded|requested format is not available"), "unsupported_format"),
    (re.compile(r"video unavailable|not available|has been removed|been terminated|no longer available"
                r"|does not exist"), "unavailable"),
    (re.compile(r"connection (reset|refused|aborted)|remote end closed|incomplete ?read|broken pipe"
                r"|temporary failure in name resolution|name or service not known|network is unreachable"),
     "network"),
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
            return _HTTP_CLASSES.get(status) or ("server_error" if 500 <= status < 600 else "http_error")
        if isinstance(cause, GeoRestrictedError):
            return "geo_blocked"
        if isinstance(cause, UnsupportedError):
            return "unsupported_url"
        if isinstance(cause, TimeoutError):
            return "timeout"
    text = str(error).lower()
    for pattern, failure_class in _MESSAGE_CLASSES:
        if pattern.search(text):
            return failure_class
    if any(isinstance(cause, (TransportError, ConnectionError)) for cause in _causes(error)):
        return "network"
    return "unknown"


def is_permanent(failure_class: str) -> bool:
    """Whether retrying a failure of this class cannot help."""
    return failure_class not in _TRANSIENT


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

    def lookup(self, video_id: str, spans: list[Span] | None) -> list[DownloadedSection] | None:
        """The cached sections for exactly these spans, or None when they were never completed."""
        entry = self.entry_dir(video_id, spans)
        try:
            record = json.loads((entry / self.MARKER).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        sections = [DownloadedSection(entry / item["file"], item["start_s"], item["end_s"])
                    for item in record["sections"]]
        return sections if all(section.path.is_file() for section in sections) else None

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
               downloaded: list[DownloadedSection]) -> list[DownloadedSection]:
        """Move downloaded files out of `staging` into the entry for (video_id, spans), atomically."""
        entry = self.entry_dir(video_id, spans)
        build = staging / "entry"
        build.mkdir()
        record = {"video_id": video_id, "url": url, "spans": spans, "sections": []}
        for index, section in enumerate(sorted(downloaded, key=lambda s: s.start_s)):
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
        return DownloadError(record["failure_class"], f"{record['message']} (recorded by an earlier run)", True)

    def forget_failure(self, video_id: str) -> None:
        self._failure_path(video_id).unlink(missing_ok=True)


def _spans_digest(spans: list[Span] | None) -> str:
    if spans is None:
        return "whole"
    canonical = json.dumps([[round(start, 3), round(end, 3)] for start, end in spans])
    return "spans-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _write_json_atomically(path: Path, record: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def _fetch(video_id: str, url: str, spans: list[Span] | None, folder: Path,
           options: DownloadOptions) -> list[DownloadedSection]:
    """One yt-dlp call for all spans of a video; files land in `folder`."""
    params = _ytdlp_params(options, spans, folder, file_url=url.startswith("file:"))
    try:
        with yt_dlp.YoutubeDL(params) as ydl:
            info = ydl.extract_info(url, download=True)
    except yt_dlp.utils.YoutubeDLError as error:
        failure_class = classify_failure(error)
        reason = re.sub(r"^ERROR:\s*", "", str(error))
        raise DownloadError(failure_class, f"video {video_id} ({url}): {failure_class}: {reason}",
                            is_permanent(failure_class)) from error
    downloads = (info or {}).get("requested_downloads") or []
    if not downloads:
        kind = "a playlist" if (info or {}).get("entries") is not None else "nothing downloadable"
        raise DownloadError("bad_url", f"video {video_id} ({url}): yt-dlp found {kind}, expected one video",
                            permanent=True)
    sections = [DownloadedSection(Path(item["filepath"]), float(item.get("section_start") or 0.0),
                                  item.get("section_end")) for item in downloads]
    usable = [section for section in sections if _has_video_stream(section.path)]
    for section in sections:
        if section not in usable:
            log.warning("video %s (%s): section %.1f-%s s holds no video (past the end, or damaged data); "
                        "its clips will be missing", video_id, url, section.start_s, section.end_s)
    if not usable:
        raise DownloadError("no_video_in_span", f"video {video_id} ({url}): no video in the requested spans "
                            f"{spans or 'whole video'}: past the end of the video, or damaged data", permanent=True)
    return usable


def _has_video_stream(path: Path) -> bool:
    """Whether `path` holds readable video (ffmpeg writes an empty mp4 for a span past the end)."""
    try:
        probe(path)
    except VideoError:
        return False
    return True


def download_video(video_id: str, url: str, spans: Iterable[Span | None], cache: DownloadCache,
                   options: DownloadOptions = DownloadOptions()) -> list[DownloadedSection]:
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
                downloaded = _fetch(video_id, url, merged, folder, options)
                sections = cache.commit(video_id, url, merged, folder, downloaded)
            cache.forget_failure(video_id)
            return sections
        except DownloadError as error:
            if error.permanent:
                if error.failure_class != "no_video_in_span":  # the video may be fine; other spans may work
                    cache.record_failure(video_id, url, error)
                raise
            if attempt == options.retries:
                raise
            delay = options.backoff_base_s * 2 ** attempt * random.uniform(0.5, 1.5)
            log.warning("%s; retry %d/%d in %.1f s", error.message, attempt + 1, options.retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")


def download_for_clips(requests: Sequence[ClipRequest], cache: DownloadCache,
                       options: DownloadOptions = DownloadOptions()) -> list[DownloadedSection]:
    """Download what the clips of ONE video need, in one yt-dlp call (see `find_section` to cut them)."""
    if not requests:
        return []
    videos = {(request.video_id, request.url) for request in requests}
    if len(videos) != 1:
        raise ValueError(f"download_for_clips takes clips of one video, got {sorted(videos)}")
    video_id, url = videos.pop()
    spans = [None if request.start_s is None or request.end_s is None else (request.start_s, request.end_s)
             for request in requests]
    return download_video(video_id, resolve_url(url or video_id, options.url_template), spans, cache, options)


__all__ = ["DEFAULT_URL_TEMPLATE", "DownloadCache", "DownloadError", "DownloadOptions", "DownloadedSection",
           "Span", "check_url", "classify_failure", "download_for_clips", "download_video",
           "ensure_ffmpeg_on_path", "find_section", "is_permanent", "merge_spans", "resolve_url"]
