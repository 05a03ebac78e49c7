"""The unit of work of dataset preparation: one requested clip, and the manifest rows it ends in.

Every metadata source (VoxCeleb txt trees, clip tables, URL lists) is parsed into `ClipRequest`s;
everything downstream (download, faces, shards, manifest) speaks only this type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Mapping, overload
from urllib.parse import quote

import numpy as np

from pipelines.dataset import manifest
from pipelines.dataset.schema import Provenance, safe_key
from pipelines.prepare.settings import DEFAULT_URL_TEMPLATE

VOX_FPS = 25.0
"""VoxCeleb metadata frame numbers count at 25 fps."""


@dataclass(frozen=True)
class MetaBox:
    """One face box from metadata at time `t` (seconds from the start of the video).

    `units` is "normalized" (0..1 of width/height, VoxCeleb2) or "pixels" in a frame of height
    `reference_height` (VoxCeleb1: pixels of the 360p video), rescaled once the real size is known.
    """

    t: float
    x: float
    y: float
    w: float
    h: float
    units: str = "normalized"
    reference_height: float | None = None

    def to_pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        """Return (x0, y0, x1, y1) in pixels of a frame of the given size."""
        if self.units == "normalized":
            return (self.x * width, self.y * height, (self.x + self.w) * width, (self.y + self.h) * height)
        scale = height / float(self.reference_height or height)
        return (self.x * scale, self.y * scale, (self.x + self.w) * scale, (self.y + self.h) * scale)


@dataclass(frozen=True, eq=False)
class MetaBoxes(Sequence[MetaBox]):
    """A clip's metadata boxes as one read-only array of rows (t, x, y, w, h) in one `units`.

    A VoxCeleb2 plan carries 1.1M clips of about 40 boxes each: one array per clip is built, held
    and pickled at a fraction of the cost of a `MetaBox` per row; `MetaBox`es are made only on the
    worker that reads them (iterating or indexing).
    """

    rows: np.ndarray = field(default_factory=lambda: np.empty((0, 5)))
    units: str = "normalized"
    reference_height: float | None = None

    def __post_init__(self) -> None:
        rows = np.asarray(self.rows, dtype=np.float64).reshape(-1, 5)
        rows.flags.writeable = False
        object.__setattr__(self, "rows", rows)

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> MetaBox: ...

    @overload
    def __getitem__(self, index: slice) -> MetaBoxes: ...

    def __getitem__(self, index: int | slice) -> MetaBox | MetaBoxes:
        if isinstance(index, slice):
            return MetaBoxes(self.rows[index], self.units, self.reference_height)
        t, x, y, w, h = self.rows[index].tolist()
        return MetaBox(t, x, y, w, h, units=self.units, reference_height=self.reference_height)

    def shifted(self, offset_s: float) -> MetaBoxes:
        """The same boxes with times counted from `offset_s` (a downloaded section's start)."""
        return MetaBoxes(self.rows - np.array([offset_s, 0, 0, 0, 0]), self.units, self.reference_height)


@dataclass(frozen=True)
class ClipRequest:
    """A clip to prepare: a time span of one video, with optional metadata boxes.

    `start_s`/`end_s` of None mean the whole video (URL lists). `origin` names the metadata file
    and line the request came from, so every error can point at its input.
    """

    clip_id: str
    video_id: str
    url: str
    identity: str
    split: str = "train"
    start_s: float | None = None
    end_s: float | None = None
    boxes: MetaBoxes = field(default_factory=MetaBoxes, compare=False, repr=False)
    source: str = "urls"
    origin: str = ""

    @property
    def key(self) -> str:
        """The WebDataset sample key of this clip (no dots, no path characters)."""
        return safe_key(self.clip_id)

    @property
    def duration_s(self) -> float | None:
        if self.start_s is None or self.end_s is None:
            return None
        return self.end_s - self.start_s

    def provenance(self) -> Provenance:
        """What a prepared sample records about where it comes from."""
        return Provenance(clip_id=self.clip_id, identity=self.identity, video_id=self.video_id, url=self.url,
                          split=self.split, source=self.source, requested_span=(self.start_s, self.end_s))


def clip_id_for(*parts: str) -> str:
    """Join id parts into one clip id (identity, video, utterance) with a separator that `safe_key` escapes."""
    return "/".join(parts)


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


def manifest_row(request: ClipRequest, *, status: str, attempt: int, timings: Mapping[str, float] | None = None,
                 **outcome: object) -> manifest.ManifestRow:
    """The manifest row of one attempt at `request` (ok rows must carry every timing column)."""
    return manifest.ManifestRow(
        clip_id=request.clip_id, key=request.key, video_id=request.video_id, url=request.url,
        identity=request.identity, split=request.split, start_s=request.start_s, end_s=request.end_s,
        source=request.source, origin=request.origin, status=status, attempt=attempt,
        **manifest.timing_columns(timings, required=status == manifest.OK), **outcome)  # type: ignore[arg-type]
