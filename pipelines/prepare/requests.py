"""The unit of work of dataset preparation: one requested clip, and safe keys derived from ids.

Every metadata source (VoxCeleb txt trees, clip tables, URL lists) is parsed into `ClipRequest`s;
everything downstream (download, faces, shards, manifest) speaks only this type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

VOX_FPS = 25.0
"""VoxCeleb metadata frame numbers count at 25 fps."""

OUTPUT_FPS = 25.0
"""Prepared clips are resampled to this frame rate."""

CROP_SIZE = 256


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
    boxes: tuple[MetaBox, ...] = field(default=(), compare=False, repr=False)
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


MAX_KEY_LENGTH = 85
"""Longest sample key (`ClipRequest.key`) a shard can hold: a plain (ustar) tar member name has at
most 100 characters, and the longest entry name adds ``.expression.npy`` (15)."""

_SAFE = re.compile(r"[A-Za-z0-9-]")


def safe_key(text: str) -> str:
    """Map any id to a key safe as a file name and as a WebDataset key, injectively.

    Letters, digits and '-' are kept; every other character (including '_', '.', '/') becomes
    '_' plus its code point in hex and a closing '_'. The key always starts with a letter, so
    ids beginning with '-' or '_' (legal on YouTube) cannot look like options or tar metadata.
    """
    if not text:
        raise ValueError("cannot derive a key from an empty id")
    escaped = "".join(ch if _SAFE.fullmatch(ch) else f"_{ord(ch):x}_" for ch in text)
    return "k" + escaped


def clip_id_for(*parts: str) -> str:
    """Join id parts into one clip id (identity, video, utterance) with a separator that `safe_key` escapes."""
    return "/".join(parts)
