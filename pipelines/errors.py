"""Every failure class of every job, and what a retry or a rerun does about it: one registry.

Jobs never stop for one bad input. Each failure is recorded with a stable class name (counted and
filtered in manifests, results tables and reports) and a message for people that names the input
and the cause. A class says two things about retrying:

- `transient`: the same request may succeed in a moment (timeouts, 5xx, 429); downloads retry
  these with backoff inside the run;
- `retried_on_rerun`: a plain rerun of the same command tries again. True for transient classes
  and for failures caused by the machine or the settings rather than the input (a killed worker, a
  full disk, a truncated transfer, a refused scheme the user may now allow). Everything else is
  permanent: it comes from the input itself and only `--retry-failed` tries it again.

Nothing outside this module names a failure class by a string literal: use the constants.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FailureClass:
    """A stable failure name, what it means, and its retry policy."""

    name: str
    meaning: str
    transient: bool = False
    retried_on_rerun: bool = False


REGISTRY: dict[str, FailureClass] = {}


def _define(name: str, meaning: str, *, transient: bool = False, retried_on_rerun: bool = False) -> str:
    if name in REGISTRY:
        raise ValueError(f"failure class {name!r} defined twice")
    REGISTRY[name] = FailureClass(name, meaning, transient, transient or retried_on_rerun)
    return name


# --- inputs (metadata lines and files) ---------------------------------------------------------
BAD_METADATA = _define("bad_metadata", "a metadata line or file that cannot be read as a clip")
DUPLICATE_CLIP = _define("duplicate_clip", "the same clip listed twice; the first one is kept")

# --- downloads ---------------------------------------------------------------------------------
TIMEOUT = _define("timeout", "the host stopped answering within the socket timeout", transient=True)
NETWORK = _define("network", "connection reset, refused or not resolvable", transient=True)
SERVER_ERROR = _define("server_error", "HTTP 5xx from the host", transient=True)
RATE_LIMITED = _define("rate_limited", "HTTP 429 or a bot check: slow down (--sleep, --rate-limit)",
                       transient=True)
DOWNLOAD_FAILED = _define("download_failed", "yt-dlp failed for a reason it did not name", transient=True)
NOT_FOUND = _define("not_found", "HTTP 404 or a missing local file")
GONE = _define("gone", "HTTP 410: removed for good")
FORBIDDEN = _define("forbidden", "HTTP 401/403: needs cookies or is blocked")
HTTP_ERROR = _define("http_error", "another HTTP error status")
PRIVATE = _define("private", "a private video")
COPYRIGHT = _define("copyright", "taken down for copyright")
GEO_BLOCKED = _define("geo_blocked", "not available in this country")
AGE_RESTRICTED = _define("age_restricted", "needs a signed-in, age-verified account (--cookies)")
UNSUPPORTED_URL = _define("unsupported_url", "no yt-dlp extractor handles this URL")
UNSUPPORTED_FORMAT = _define("unsupported_format", "no format that can be cut into sections")
UNAVAILABLE = _define("unavailable", "the host says the video is unavailable or removed")
BAD_URL = _define("bad_url", "not a URL of one video (no host, a playlist, nothing downloadable)")
REFUSED_SCHEME = _define("refused_scheme", "not http(s); local files need --allow-file-urls",
                         retried_on_rerun=True)
NO_VIDEO_IN_SPAN = _define("no_video_in_span", "the downloaded span holds no video (past the end, or lost data)")

# --- media -------------------------------------------------------------------------------------
MISSING_VIDEO = _define("missing_video", "a local video file that does not exist")
CORRUPT_VIDEO = _define("corrupt_video", "a video ffmpeg cannot decode, or that ends early (truncated)",
                        retried_on_rerun=True)
SPAN_OUTSIDE_VIDEO = _define("span_outside_video", "the requested span is not inside the video")
ENCODE_FAILED = _define("encode_failed", "encoding the output failed (disk full, encoder error)",
                        retried_on_rerun=True)

# --- faces -------------------------------------------------------------------------------------
NO_FACE = _define("no_face", "no face found, or none where the metadata box says")
MULTIPLE_FACES = _define("multiple_faces", "several comparable faces and no box to choose one")
TRACK_TOO_SHORT = _define("track_too_short", "the face is tracked over too little of the clip")
FACE_TOO_SMALL = _define("face_too_small", "the face is smaller than the minimum size")
FACE_LEAVES_FRAME = _define("face_leaves_frame", "too much of the crop lies outside the frame")
CLIP_TOO_SHORT = _define("clip_too_short", "fewer frames than the minimum clip length (--min-clip-frames)")

# --- the machine -------------------------------------------------------------------------------
WORKER_FAILED = _define("worker_failed", "the worker process died (out of memory, killed, lost node)",
                        retried_on_rerun=True)
INTERNAL_ERROR = _define("internal_error", "an unexpected error: a bug; the message has the details",
                         retried_on_rerun=True)
SHARD_LOST = _define("shard_lost", "a clip recorded as prepared whose shard is missing or disagrees with "
                                   "its stats", retried_on_rerun=True)

# --- training data (skipped by `portrait train`, counted and listed in the run's skipped.json) ---
UNREADABLE_SHARD = _define("unreadable_shard", "a shard in the shard index that cannot be opened or read as a tar "
                                               "(missing, truncated, not a tar); its clips are skipped")
BAD_SAMPLE = _define("bad_sample", "a training sample whose video cannot be decoded, whose entries do not match "
                                   "the schema, or whose arrays disagree with its frame count; it is skipped")


def failure_class(name: str) -> FailureClass:
    """The registered class called `name`; an unknown name is a bug, not a new kind of failure."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown failure class {name!r}; register it in pipelines/errors.py") from None


def is_transient(name: str) -> bool:
    """Whether retrying within the run (with backoff) may help."""
    return failure_class(name).transient


def retried_on_rerun(name: str) -> bool:
    """Whether a plain rerun tries this failure again (see the module docstring)."""
    return failure_class(name).retried_on_rerun


def markdown_table() -> str:
    """The registry as a Markdown table (README and reports show exactly this)."""
    rows = ["| failure class | meaning | rerun retries it |", "|---|---|---|"]
    rows += [f"| `{c.name}` | {c.meaning} | {'yes' if c.retried_on_rerun else 'no'} |" for c in REGISTRY.values()]
    return "\n".join(rows)


class RecordedFailure(Exception):
    """A failure of one input: a registered `failure_class` and a message naming input and cause."""

    def __init__(self, failure_class_name: str, message: str) -> None:
        failure_class(failure_class_name)
        super().__init__(f"{failure_class_name}: {message}")
        self.failure_class = failure_class_name
        self.message = message

    def __reduce__(self):  # picklable across Ray and Prefect workers
        return (type(self), (self.failure_class, self.message))


class VideoError(RecordedFailure):
    """A video that cannot be read or written as asked (missing, corrupt, span outside it)."""


class ClipRejected(RecordedFailure):
    """A clip that cannot become a training sample (no usable face track)."""


# --- editing (pipelines/edit) ------------------------------------------------------------------
NOT_A_VIDEO = _define("not_a_video", "an empty file, not a media file, or one whose index is missing "
                                     "(cut off before the moov atom)")
NO_VIDEO_STREAM = _define("no_video_stream", "a media file without a video stream (audio only)")
DAMAGED_VIDEO = _define("damaged_video", "a video that cannot be decoded to its end (truncated or damaged "
                                         "data); repair or re-export it")
NO_DRIVING_FACE = _define("no_driving_face", "no face in the driving image or video")
BAD_JOB = _define("bad_job", "a job table row that cannot be run (a missing or invalid value; the message "
                             "names the column)")
DUPLICATE_OUTPUT = _define("duplicate_output", "two jobs write the same output file; the first one is kept")
UNSUPPORTED_OUTPUT = _define("unsupported_output", "the output file cannot hold what --codec or --pix-fmt asks for "
                                                   "(the message names another container or format)")
AUDIO_NOT_COPYABLE = _define("audio_not_copyable", "an audio codec the output container cannot hold unchanged; "
                                                   "name the output .mkv or .mov")
