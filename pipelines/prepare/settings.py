"""The settings of a preparation run and their defaults: the one place those defaults are stated.

The command line, its YAML config files and the Prefect flow all read their defaults from these
dataclasses; workers receive them as plain data. Only the standard library is imported here, so
`portrait --help` stays fast.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.media.framing import Framing
from pipelines.media.tracking import FACE_POLICIES, TrackingConfig

DEFAULT_URL_TEMPLATE = "https://www.youtube.com/watch?v={id}"


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
class SampleFormat:
    """What decides the content of a sample: recorded in the dataset's marker, and a rerun with
    other values into the same dataset is refused (samples of two kinds would be mixed)."""

    fps: float = 25.0
    """Prepared clips are resampled to this frame rate."""
    crop_size: int = 256
    """Side of the square crops, in pixels (the model's input size)."""
    crf: int = 18
    """x264 quality of the stored crops (lower is better)."""
    preset: str = "medium"
    """x264 speed preset of the stored crops."""
    min_clip_frames: int = 25
    """Clips with fewer frames are rejected (`clip_too_short`): training needs two frames of a clip
    far enough apart to differ. A span running past the end of the video keeps the frames that exist
    when at least this many remain."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    framing: Framing = field(default_factory=Framing)
    """Where the face sits in the crop: by default as in the data the official model was trained on."""

    def record(self, detector: str) -> dict[str, Any]:
        """The marker's view: these settings plus the detector actually used (never "auto")."""
        return {**asdict(self), "detector": detector}


@dataclass(frozen=True)
class PrepareSettings:
    """Everything a preparation run needs besides its inputs (plain data: workers get it pickled)."""

    output: str = "out/dataset"
    """A local folder or an object-store URI (s3://, gs://)."""
    workdir: str | None = None
    """Scratch and download cache kept across runs; None: `default_workdir(output)`."""
    detector: str = "auto"
    sample_format: SampleFormat = field(default_factory=SampleFormat)
    shard_bytes: int = 256 * 2**20
    videos_per_batch: int = 8
    test_fraction: float = 0.0
    retry_failed: bool = False
    download: DownloadOptions = field(default_factory=DownloadOptions)
    ray_address: str | None = None

    @property
    def work_path(self) -> Path:
        return Path(self.workdir).expanduser().resolve() if self.workdir else default_workdir(self.output)


def default_workdir(output: str) -> Path:
    """Scratch for downloads outside the dataset folder (which holds only dataset files), kept across
    runs so the download cache serves reruns: a folder per output under the user's cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    absolute = output if "://" in output else os.path.abspath(os.path.expanduser(output))
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in Path(absolute.rstrip("/")).name)[:40]
    return cache / "dpe-portrait" / "work" / f"{stem or 'output'}-{hashlib.sha1(absolute.encode()).hexdigest()[:12]}"


_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMG]?)(?:i?B)?(?:/s)?", re.IGNORECASE)


def parse_rate(text: str | None) -> int | None:
    """'2M' -> 2097152 bytes/s (K, M, G are powers of 1024, as in yt-dlp); None or '' stays None."""
    if not text:
        return None
    match = _RATE.fullmatch(str(text).strip())
    if match is None:
        raise ValueError(f"rate limit {text!r} is not a number of bytes/s with an optional K, M or G (e.g. 2M)")
    return int(float(match.group(1)) * 1024 ** " KMG".index(match.group(2).upper() or " "))


def settings_from_options(
    *,
    output: str = PrepareSettings.output,
    workdir: str | None = None,
    url_template: str = DEFAULT_URL_TEMPLATE,
    detector: str = PrepareSettings.detector,
    detect_every: int = TrackingConfig.detect_stride,
    min_face_px: float = TrackingConfig.min_face_px,
    min_track_fraction: float = TrackingConfig.min_track_fraction,
    max_outside_fraction: float = TrackingConfig.max_outside_fraction,
    face: str = TrackingConfig.face_policy,
    min_clip_frames: int = SampleFormat.min_clip_frames,
    face_fraction: float = Framing.face_fraction,
    face_centre_x: float = Framing.centre_x,
    face_centre_y: float = Framing.centre_y,
    shard_size_mb: float = PrepareSettings.shard_bytes / 2**20,
    videos_per_batch: int = PrepareSettings.videos_per_batch,
    test_fraction: float = PrepareSettings.test_fraction,
    retry_failed: bool = False,
    allow_file_urls: bool = False,
    rate_limit: str | None = None,
    sleep: float = DownloadOptions.sleep_between_s,
    cookies: str | None = None,
    proxy: str | None = None,
    retries: int = DownloadOptions.retries,
    ray_address: str | None = None,
) -> PrepareSettings:
    """`PrepareSettings` from the plain options of `portrait prepare` and the `prepare_dataset` flow
    (the same names); a bad value raises ValueError naming the option."""
    _check(videos_per_batch >= 1, "videos_per_batch", videos_per_batch, "must be at least 1")
    _check(shard_size_mb > 0, "shard_size_mb", shard_size_mb, "must be positive")
    _check(0.0 <= test_fraction <= 1.0, "test_fraction", test_fraction, "must lie in [0, 1]")
    _check(sleep >= 0, "sleep", sleep, "must not be negative")
    _check(retries >= 0, "retries", retries, "must not be negative")
    _check(detect_every >= 1, "detect_every", detect_every, "must be at least 1")
    _check(min_face_px > 0, "min_face_px", min_face_px, "must be positive")
    _check(0.0 < min_track_fraction <= 1.0, "min_track_fraction", min_track_fraction, "must lie in (0, 1]")
    _check(0.0 <= max_outside_fraction < 1.0, "max_outside_fraction", max_outside_fraction, "must lie in [0, 1)")
    _check(face in FACE_POLICIES, "face", face, f"must be one of {', '.join(FACE_POLICIES)}")
    _check(min_clip_frames >= 2, "min_clip_frames", min_clip_frames, "must be at least 2 (training needs pairs)")
    _check("{id}" in url_template, "url_template", url_template, "needs an {id} placeholder")
    try:
        rate = parse_rate(rate_limit)
    except ValueError as error:
        raise ValueError(f"rate_limit: {error}") from None
    tracking = TrackingConfig(detect_stride=detect_every, min_face_px=min_face_px, min_track_fraction=min_track_fraction,
                              max_outside_fraction=max_outside_fraction, face_policy=face)
    download = DownloadOptions(
        rate_limit_bytes_per_s=rate, sleep_between_s=sleep,
        cookies_file=Path(cookies).expanduser().resolve() if cookies else None, proxy=proxy, retries=retries,
        allow_file_urls=allow_file_urls, url_template=url_template, retry_recorded_failures=retry_failed)
    return PrepareSettings(output=output, workdir=workdir, detector=detector,
                           sample_format=SampleFormat(tracking=tracking, min_clip_frames=min_clip_frames,
                                                      framing=_framing(face_fraction, face_centre_x, face_centre_y)),
                           shard_bytes=int(shard_size_mb * 2**20),
                           videos_per_batch=videos_per_batch, test_fraction=test_fraction, retry_failed=retry_failed,
                           download=download, ray_address=ray_address)


def _framing(face_fraction: float, centre_x: float, centre_y: float) -> Framing:
    try:
        return Framing(face_fraction=face_fraction, centre_x=centre_x, centre_y=centre_y)
    except ValueError as error:
        raise ValueError(f"framing: {error}") from None


def _check(condition: bool, name: str, value: object, rule: str) -> None:
    if not condition:
        raise ValueError(f"{name}: {value!r} {rule}")
