"""What the metadata parsers share: parse failures, identity splits, video references, duplicates.

Every parser returns ``(requests, failures)``: a malformed line or file becomes one `ParseFailure`
(recorded in the manifest with failure class ``bad_metadata``) and the rest of the input is still
parsed; repeated clips become ``duplicate_clip`` failures.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from pipelines.dataset import layout
from pipelines.dataset.schema import check_key
from pipelines.errors import BAD_METADATA, DUPLICATE_CLIP
from pipelines.prepare.requests import ClipRequest, resolve_url
from pipelines.prepare.settings import DEFAULT_URL_TEMPLATE

ID_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
_YOUTUBE_HOSTS = {"youtube.com", "www.youtube.com", "m.youtube.com", "youtu.be", "www.youtube-nocookie.com"}
_SLUG_LENGTH = 40


@dataclass(frozen=True)
class ParseFailure:
    """One input that could not become a clip: where it is (``file:line``) and why."""

    origin: str
    message: str
    failure_class: str = BAD_METADATA

    @property
    def record_id(self) -> str:
        """A manifest id for this failure, unique per input location (it has no usable clip id)."""
        return f"invalid:{self.origin}"


ParseResult = tuple[list[ClipRequest], list[ParseFailure]]


class InvalidInput(ValueError):
    """Raised inside a parser for one bad line or file; turned into a `ParseFailure`."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


# ---------------------------------------------------------------------------------------------
# Splits and video references shared by all parsers


def assign_split(identity: str, test_fraction: float, seed: int = 0) -> str:
    """Return "test" for a stable, seed-dependent `test_fraction` of identities, else "train".

    Hash-based (not Python's salted `hash`) so that every process and every rerun agrees, and
    all clips of one identity land in the same split (no identity leaks between splits).
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1], got {test_fraction}")
    digest = hashlib.sha256(f"{seed}:{identity}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2.0**64
    return "test" if position < test_fraction else "train"


@dataclass(frozen=True)
class SplitPolicy:
    """How identities are split when the input has no split column.

    `test_identities` (e.g. `VOX1_TEST_IDENTITIES`) wins over the hash-based `test_fraction`.
    """

    test_fraction: float = 0.0
    seed: int = 0
    test_identities: Collection[str] | None = None

    def split_for(self, identity: str) -> str:
        if self.test_identities is not None:
            return "test" if identity in self.test_identities else "train"
        return assign_split(identity, self.test_fraction, self.seed)


def _slug_with_hash(name: str, full: str) -> str:
    """A short, path-safe id for a non-YouTube video: readable stem plus a hash of the full reference."""
    # '_' is replaced too: `safe_key` escapes it to four characters, and keys have a length limit.
    slug = re.sub(r"[^A-Za-z0-9-]+", "-", name).strip("-")[:_SLUG_LENGTH] or "video"
    return f"{slug}-{hashlib.sha1(full.encode()).hexdigest()[:8]}"


def _youtube_id(url: str) -> str | None:
    parsed = urlparse(url)
    if (parsed.hostname or "").lower() not in _YOUTUBE_HOSTS:
        return None
    if parsed.hostname == "youtu.be":
        candidate = parsed.path.strip("/")
    elif parsed.path.startswith(("/shorts/", "/embed/")):
        candidate = parsed.path.split("/")[2]
    else:
        candidate = (parse_qs(parsed.query).get("v") or [""])[0]
    return candidate if ID_PATTERN.fullmatch(candidate) else None


def resolve_video(value: str, base_dir: Path, url_template: str = DEFAULT_URL_TEMPLATE) -> tuple[str, str]:
    """Return ``(video_id, url)`` for a URL, an existing local file or a bare video id.

    YouTube URLs keep their video id; other URLs and local files get a readable, hashed id so that
    two files both called ``video.mp4`` stay distinct. Relative paths are resolved against
    `base_dir` (the directory of the list or table) and returned absolute.
    """
    value = value.strip()
    if not value:
        raise InvalidInput("empty video reference")
    if _URL.fullmatch(value):
        youtube = _youtube_id(value)
        if youtube:
            return youtube, value
        return _slug_with_hash(Path(urlparse(value).path).stem, value), value
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if path.is_file():
        resolved = str(path.resolve())
        return _slug_with_hash(path.stem, resolved), resolved
    if ID_PATTERN.fullmatch(value):
        return value, resolve_url(value, url_template)
    raise InvalidInput(f"{value!r} is neither a URL, an existing file nor a video id ([A-Za-z0-9_-]+)")


def check_split(value: str) -> str:
    try:
        return layout.check_split(value.strip().lower())
    except ValueError as error:
        raise InvalidInput(str(error)) from None


def read_lines(path: str | Path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInput(f"cannot read file: {error}") from error
    if not text.strip():
        raise InvalidInput("empty file")
    return text.splitlines()


def finish(requests: list[ClipRequest], failures: list[ParseFailure]) -> ParseResult:
    """Reject clips whose key a shard cannot hold, then drop duplicates."""
    kept, rejected = ClipFilter().split(requests)
    unfit = [f for f in rejected if f.failure_class != DUPLICATE_CLIP]
    return kept, failures + unfit + [f for f in rejected if f.failure_class == DUPLICATE_CLIP]


class ClipFilter:
    """Admits each clip once, as requests stream past: a clip whose key a shard cannot hold, or that
    repeats an earlier clip id or (video, span), comes back as a `ParseFailure`.

    It remembers only ids, spans and origins of the clips it admitted (not the requests), so a
    streamed plan holds about 200 bytes per clip of the metadata, not the clips themselves.
    """

    def __init__(self) -> None:
        self._origin_by_id: dict[str, str] = {}
        self._id_by_span: dict[tuple[str, float | None, float | None], str] = {}

    def __call__(self, request: ClipRequest) -> ParseFailure | None:
        try:
            check_key(request.key, f"key of clip {request.clip_id!r}")
        except ValueError as error:
            return ParseFailure(request.origin, str(error))
        span = (request.video_id, request.start_s, request.end_s)
        first_id = request.clip_id if request.clip_id in self._origin_by_id else self._id_by_span.get(span)
        if first_id is not None:
            return ParseFailure(
                request.origin,
                f"clip {request.clip_id!r} repeats clip {first_id!r} from {self._origin_by_id[first_id]} "
                "(same clip id or same video and span); the first one is kept",
                DUPLICATE_CLIP,
            )
        self._origin_by_id[request.clip_id] = request.origin
        self._id_by_span[span] = request.clip_id
        return None

    def split(self, requests: Iterable[ClipRequest]) -> ParseResult:
        """The requests admitted, and a failure for each one refused (both in input order)."""
        kept: list[ClipRequest] = []
        refused: list[ParseFailure] = []
        for request in requests:
            problem = self(request)
            if problem is None:
                kept.append(request)
            else:
                refused.append(problem)
        return kept, refused
