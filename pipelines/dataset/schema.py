"""One prepared clip as stored in a shard: the sample schema that the writer and every reader share.

A sample is a WebDataset record, one tar member per entry, named ``<key>.<entry>``:

============== ======================== ==================================================
entry          content                  meaning
============== ======================== ==================================================
mp4            bytes                    H.264 yuv420p faststart video of square crops
json           `SampleMeta`             provenance, spans, frame rate, crop size, detector
boxes.npy      float32 (T, 4)           crop box per frame: x0, y0, x1, y1 in source pixels
landmarks.npy  float32 (T, 68, 2)       68 landmarks (iBUG layout) in crop pixels
pose.npy       float32 (T, 6)           rigid head pose: yaw, pitch, roll, tx, ty, scale
expression.npy float32 (T, 68, 2)       landmarks with the pose removed (`dpe.landmarks`)
============== ======================== ==================================================

T is the number of video frames (``meta.frames``). Keys come from ids through `safe_key`, an
injective escape; `check_key` is the one place the key rules are checked.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Mapping

import numpy as np

ARRAYS: dict[str, tuple[int, ...]] = {"boxes": (4,), "landmarks": (68, 2), "pose": (6,), "expression": (68, 2)}
"""Per-frame arrays of a sample: name -> shape after the leading frame axis (all float32)."""

ENTRIES = ("mp4", "json", *(f"{name}.npy" for name in ARRAYS))
"""Every entry of a sample, in the order they are written."""

MAX_KEY_LENGTH = 85
"""Longest sample key: a plain (ustar) tar member name has at most 100 characters, and the longest
entry name adds ``.expression.npy`` (15)."""

_USTAR_NAME_LIMIT = 100
assert MAX_KEY_LENGTH + max(len(f".{entry}") for entry in ENTRIES) <= _USTAR_NAME_LIMIT

_UNSAFE_CHARACTER = re.compile(r"[^A-Za-z0-9-]")
_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def safe_key(text: str) -> str:
    """Map any id to a key safe as a file name and as a WebDataset key, injectively.

    Letters, digits and '-' are kept; every other character (including '_', '.', '/') becomes
    '_' plus its code point in hex and a closing '_'. The key always starts with a letter, so ids
    beginning with '-' or '_' (legal on YouTube) cannot look like options or tar metadata.
    """
    if not text:
        raise ValueError("cannot derive a key from an empty id")
    return "k" + _UNSAFE_CHARACTER.sub(lambda match: f"_{ord(match.group()):x}_", text)


def check_key(key: str, what: str = "sample key") -> str:
    """Return `key` if a shard can hold it (letters, digits, '_' and '-', a letter first, no dots,
    at most `MAX_KEY_LENGTH` characters); else raise ValueError naming it."""
    if not _KEY.fullmatch(key):
        raise ValueError(f"{what} {key!r} must start with a letter and hold only letters, digits, '_' and '-'")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"{what} {key!r} has {len(key)} characters, more than {MAX_KEY_LENGTH}; "
                         "shorten the identity, video id or clip id it comes from")
    return key


Span = tuple[float | None, float | None]


@dataclass(frozen=True)
class Provenance:
    """Where a clip comes from: the part of `SampleMeta` that the request, not the video, decides."""

    clip_id: str
    identity: str
    video_id: str
    url: str
    split: str
    source: str
    requested_span: Span


@dataclass(frozen=True)
class SampleMeta:
    """The ``json`` entry of a sample.

    `requested_span` is the span the input asked for (None ends: the whole video); `span` is the
    span the frames actually cover (the face track can be shorter), both in seconds of the source
    video. Training and editing trust `span`, `fps` and `frames`.
    """

    clip_id: str
    identity: str
    video_id: str
    url: str
    split: str
    source: str
    requested_span: Span
    span: tuple[float, float]
    fps: float
    frames: int
    crop_size: int
    source_size: tuple[int, int]
    detector: str
    track_box: dict[str, list[float]] = field(default_factory=dict)
    faces_seen: int = 1
    """Most comparable faces seen together in one frame of the span."""
    face_choice: str = "the only face"
    """Why this face was kept (the only one, the metadata box, or the --face policy)."""

    @property
    def seconds(self) -> float:
        return self.frames / self.fps

    @classmethod
    def build(cls, provenance: Provenance, **content: Any) -> SampleMeta:
        """The provenance of a request plus what processing the video found (span, fps, frames, ...)."""
        return cls(**asdict(provenance), **content)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str | Mapping[str, Any]) -> SampleMeta:
        """Parse the ``json`` entry; a missing or unknown field is an error naming it."""
        record = dict(json.loads(data) if isinstance(data, (bytes, str)) else data)
        names = {f.name for f in fields(cls)}
        optional = {f.name for f in fields(cls) if f.default is not MISSING or f.default_factory is not MISSING}
        missing = sorted(names - set(record) - optional)
        unknown = sorted(set(record) - names)
        if missing or unknown:
            raise ValueError(f"sample json does not match the schema: missing {missing}, unknown {unknown}")
        record["requested_span"] = tuple(record["requested_span"])
        record["span"] = tuple(record["span"])
        record["source_size"] = tuple(record["source_size"])
        return cls(**record)


@dataclass(frozen=True)
class ClipSample:
    """A prepared clip: the encoded crops, the per-frame arrays of `ARRAYS`, and its `SampleMeta`.

    `shard` says where a sample was read from (empty for one not yet written).
    """

    key: str
    mp4: bytes = field(repr=False)
    boxes: np.ndarray = field(repr=False)
    landmarks: np.ndarray = field(repr=False)
    pose: np.ndarray = field(repr=False)
    expression: np.ndarray = field(repr=False)
    meta: SampleMeta
    shard: str = field(default="", compare=False)

    @property
    def frames(self) -> int:
        return self.meta.frames

    @property
    def seconds(self) -> float:
        return self.meta.seconds

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAYS}

    def validate(self) -> ClipSample:
        """Raise ValueError naming the clip unless key, video and every array agree with the schema."""
        label = f"clip {self.meta.clip_id!r} (key {self.key!r})"
        check_key(self.key)
        if self.meta.frames < 1:
            raise ValueError(f"{label}: no frames")
        if not self.mp4:
            raise ValueError(f"{label}: empty mp4")
        for name, array in self.arrays().items():
            expected = (self.meta.frames, *ARRAYS[name])
            if np.shape(array) != expected:
                raise ValueError(f"{label}: {name} has shape {np.shape(array)}, expected {expected}")
        return self

    def to_entries(self) -> dict[str, Any]:
        """The WebDataset record (``__key__`` plus every entry as bytes), after `validate`."""
        self.validate()
        entries: dict[str, Any] = {"__key__": self.key, "mp4": bytes(self.mp4), "json": self.meta.to_json()}
        for name, array in self.arrays().items():
            entries[f"{name}.npy"] = _npy_bytes(array)
        return entries

    @classmethod
    def from_entries(cls, record: Mapping[str, Any], shard: str = "") -> ClipSample:
        """Rebuild a sample from a raw WebDataset record (entries as bytes); raises ValueError
        naming the key when an entry is missing or does not match the schema."""
        key = record.get("__key__", "?")
        missing = [entry for entry in ENTRIES if entry not in record]
        if missing:
            raise ValueError(f"sample {key!r} in {shard or 'a shard'}: missing entries {missing}")
        try:
            arrays = {name: np.load(io.BytesIO(record[f"{name}.npy"]), allow_pickle=False) for name in ARRAYS}
            sample = cls(key=key, mp4=bytes(record["mp4"]), meta=SampleMeta.from_json(record["json"]),
                         shard=shard, **arrays)
            return sample.validate()
        except (ValueError, OSError, KeyError, TypeError) as error:
            raise ValueError(f"sample {key!r} in {shard or 'a shard'}: {error}") from error


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()
