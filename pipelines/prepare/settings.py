"""The settings of a preparation run: each option of `portrait prepare` declared once, as a field.

`SourceInputs` (what to read) and `PrepareSettings` (how) are the command's options; its flags, its
YAML config keys and the `prepare_dataset` flow's parameters are derived from them
(`pipelines.options`). `DownloadOptions` and `SampleFormat` are the views the download and the
clip processing take (built from the settings); `SampleFormat` is also what a dataset's marker
records. Only light modules are imported here, so `portrait --help` stays fast.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.media.faces import DETECTOR_NAMES
from pipelines.media.framing import Framing, FramingOptions
from pipelines.media.tracking import FACE_POLICIES, TrackingConfig
from pipelines.options import FRACTION, NOT_NEGATIVE, POSITIVE, Rule, at_least, at_most, check, option

DEFAULT_URL_TEMPLATE = "https://www.youtube.com/watch?v={id}"
MAX_BATCHES_IN_FLIGHT = 64
"""Threads the prepare flow's task runner has: the most batches that can be in flight."""


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
    keyframe_interval: int = 25
    """Frames between keyframes of the stored crops at most (x264's default is 250): training seeks to
    the keyframe before each frame a pair needs, so this bounds what a pair decodes (for about 3% more
    bytes). It changes how a sample is stored, not what it shows, so a dataset may mix intervals
    (`dataset.layout.STORAGE_SETTINGS`)."""
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


_INPUTS = "inputs (at least one, or --sample; each flag takes only its own kind)"
_FACES = "face policies (recorded in the dataset's marker: a dataset keeps one set)"
_DOWNLOAD = "downloading"


@dataclass(frozen=True)
class SourceInputs:
    """The inputs of a run by kind: each list holds only inputs of that kind, never sniffed."""

    vox1_txt: tuple[str, ...] = option((), "VoxCeleb1 metadata folder txt/<identity>/<video>/<utterance>.txt (boxes "
                                           "in 360p pixels)", group=_INPUTS, metavar="DIR", path=True)
    vox2_txt: tuple[str, ...] = option((), "VoxCeleb2 metadata folder (boxes normalised 0..1)", group=_INPUTS,
                                       metavar="DIR", path=True)
    clips: tuple[str, ...] = option((), "clip table, CSV/TSV or Parquet, in the style of vox-metadata.csv",
                                    group=_INPUTS, metavar="TABLE", path=True)
    urls: tuple[str, ...] = option((), "text file of video URLs (or local files with --allow-file-urls), one per "
                                       "line: whole videos, faces found automatically", group=_INPUTS, metavar="FILE",
                                   path=True)
    sample: bool = option(False, "add the bundled sample: a real talking-face clip served from a loopback HTTP "
                                 "server and described by generated VoxCeleb-format metadata (offline)", group=_INPUTS)

    def __post_init__(self) -> None:
        check(self)

    def __bool__(self) -> bool:
        return bool(self.vox1_txt or self.vox2_txt or self.clips or self.urls or self.sample)

    def check(self) -> None:
        """Raise `InputError` naming the first input that is missing or not of its kind."""
        from pipelines.prepare.sources import check_inputs

        check_inputs(self)


@dataclass(frozen=True)
class PrepareSettings(FramingOptions):
    """Everything a preparation run needs besides its inputs: the options of `portrait prepare` and the
    `prepare_dataset` flow (one field each; workers get it pickled)."""

    output: str = option("out/dataset", "dataset folder or object-store URI (s3://bucket/prefix, gs://...)",
                         metavar="PATH_OR_URI", path=True)
    workdir: str | None = option(None, "local scratch and download cache, kept for reruns (default: a folder per "
                                       "output under ~/.cache/dpe-portrait/work)", metavar="DIR", path=True)
    url_template: str = option(DEFAULT_URL_TEMPLATE, "maps video ids to URLs ({id} is replaced); use it for mirrors "
                                                     "and local servers",
                               rules=(Rule("needs an {id} placeholder", lambda text: "{id}" in text),))
    detector: str = option("auto", "face detector: 'auto' takes face-alignment when its weights are in "
                                   "$TORCH_HOME/hub/checkpoints, else the embedded dlib models (logged)",
                           choices=DETECTOR_NAMES)
    detect_every: int = option(TrackingConfig.detect_stride, "run the detector every N frames and track landmarks "
                               "in between", group=_FACES, metavar="N", rules=(at_least(1),))
    min_face_px: float = option(TrackingConfig.min_face_px, "smallest face kept: median landmark extent in source "
                                "pixels", group=_FACES, metavar="PX", rules=(POSITIVE,))
    min_track_fraction: float = option(TrackingConfig.min_track_fraction, "the face must be tracked in at least this "
                                       "fraction of the clip", group=_FACES, metavar="F",
                                       rules=(Rule("must lie in (0, 1]", lambda value: 0.0 < value <= 1.0),))
    max_outside_fraction: float = option(TrackingConfig.max_outside_fraction, "largest part of a crop allowed "
                                         "outside the frame (filled from the edge)", group=_FACES, metavar="F",
                                         rules=(Rule("must lie in [0, 1)", lambda value: 0.0 <= value < 1.0),))
    face: str = option(TrackingConfig.face_policy, "with several faces and no metadata box: reject the clip "
                       "('only'), or keep the largest or the most central face; the choice is recorded in each "
                       "sample", group=_FACES, choices=FACE_POLICIES)
    min_clip_frames: int = option(SampleFormat.min_clip_frames, "shortest clip kept, in frames at 25 fps; a span "
                                  "running past the end of the video keeps the frames that exist when at least N "
                                  "remain", group=_FACES, metavar="N",
                                  rules=(Rule("must be at least 2 (training needs pairs)", lambda n: n >= 2),))
    shard_size_mb: float = option(256.0, "target size of one tar shard", rules=(POSITIVE,))
    videos_per_batch: int = option(8, "videos per batch: one Prefect task, one Ray task (its videos one after "
                                      "another), one manifest part",
                                   rules=(at_least(1),))
    batches_in_flight: int | None = option(None, "batches prepared at once, each one Ray task of one CPU that writes "
                                                 "its own shards (default: one per CPU of the Ray cluster)", metavar="N",
                                           rules=(at_least(1), at_most(MAX_BATCHES_IN_FLIGHT)))
    test_fraction: float = option(0.0, "fraction of identities put in the test split when an input names no split",
                                  rules=(FRACTION,))
    retry_failed: bool = option(False, "retry every clip that failed in an earlier run, permanent failures (404, no "
                                       "face) included")
    contact_sheet: bool = option(False, "also write contact_sheet.png: frames of each prepared clip with their "
                                        "landmarks")
    allow_file_urls: bool = option(False, "accept file:// URLs and local paths as video sources (refused by default)",
                                   group=_DOWNLOAD)
    rate_limit: str | None = option(None, "download rate limit in bytes/s with an optional K, M or G, e.g. 2M",
                                    group=_DOWNLOAD, metavar="RATE", parse=lambda text: parse_rate(text))
    sleep: float = option(DownloadOptions.sleep_between_s, "seconds to sleep before each download", group=_DOWNLOAD,
                          metavar="S", rules=(NOT_NEGATIVE,))
    cookies: str | None = option(None, "cookies.txt for yt-dlp", group=_DOWNLOAD, metavar="FILE", path=True)
    proxy: str | None = option(None, "proxy for yt-dlp", group=_DOWNLOAD, metavar="URL")
    retries: int = option(DownloadOptions.retries, "retries of transient download errors (timeouts, 5xx, 429), with "
                                                   "backoff", group=_DOWNLOAD, rules=(NOT_NEGATIVE,))
    ray_address: str | None = option(None, "Ray cluster address (default: $RAY_ADDRESS, else a local Ray)",
                                     metavar="ADDR")
    backoff_base_s: float = DownloadOptions.backoff_base_s
    socket_timeout_s: float = DownloadOptions.socket_timeout_s

    def __post_init__(self) -> None:
        check(self)

    @property
    def work_path(self) -> Path:
        return Path(self.workdir).expanduser().resolve() if self.workdir else default_workdir(self.output)

    @property
    def shard_bytes(self) -> int:
        return int(self.shard_size_mb * 2**20)

    @property
    def sample_format(self) -> SampleFormat:
        tracking = TrackingConfig(detect_stride=self.detect_every, min_face_px=self.min_face_px,
                                  min_track_fraction=self.min_track_fraction,
                                  max_outside_fraction=self.max_outside_fraction, face_policy=self.face)
        return SampleFormat(tracking=tracking, min_clip_frames=self.min_clip_frames, framing=self.framing)

    @property
    def download(self) -> DownloadOptions:
        return DownloadOptions(
            rate_limit_bytes_per_s=parse_rate(self.rate_limit), sleep_between_s=self.sleep,
            cookies_file=Path(self.cookies) if self.cookies else None, proxy=self.proxy, retries=self.retries,
            allow_file_urls=self.allow_file_urls, url_template=self.url_template,
            retry_recorded_failures=self.retry_failed, backoff_base_s=self.backoff_base_s,
            socket_timeout_s=self.socket_timeout_s)


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
        raise ValueError("must be a number of bytes/s with an optional K, M or G (e.g. 2M)")
    return int(float(match.group(1)) * 1024 ** " KMG".index(match.group(2).upper() or " "))
