"""WebDataset tar shards of prepared clips: write them atomically at a target size, read them back.

One sample per clip, keyed by `ClipRequest.key`, with entries ``mp4`` (the 256x256 clip),
``json`` (provenance and a summary), and per-frame float32 arrays ``boxes.npy`` (T, 4),
``landmarks.npy`` (T, 68, 2), ``pose.npy`` (T, 6), ``expression.npy`` (T, 68, 2).

Shards go to ``<prefix>/<split>/<batch_name>-<n:04d>.tar``; each is written under a temporary
name and renamed when complete (see `pipelines.storage`), then a ``<shard>.stats.json`` with
its sample count, size, frames, seconds and keys is committed next to it. A writer that dies
mid-shard therefore leaves no partial ``.tar`` that a reader could pick up.
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
import webdataset as wds

from pipelines.prepare.requests import MAX_KEY_LENGTH, OUTPUT_FPS, ClipRequest
from pipelines.storage import AtomicOutput, OutputStore, clean_relpath

_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK
_USTAR_NAME_LIMIT = 100

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_ARRAY_SHAPES = {"boxes": (4,), "landmarks": (68, 2), "pose": (6,), "expression": (68, 2)}
assert MAX_KEY_LENGTH + max(len(f".{name}.npy") for name in _ARRAY_SHAPES) <= _USTAR_NAME_LIMIT


@dataclass(frozen=True)
class ClipSample:
    """A prepared clip ready for a shard: encoded video plus per-frame face arrays.

    `boxes` are the tracked face boxes per output frame (x0, y0, x1, y1 in source pixels);
    `pose` and `expression` are the rigid/non-rigid landmark split of `dpe.landmarks`.
    """

    request: ClipRequest
    mp4: bytes
    boxes: np.ndarray
    landmarks: np.ndarray
    pose: np.ndarray
    expression: np.ndarray
    fps: float = OUTPUT_FPS
    detector: str = ""

    @property
    def frames(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def seconds(self) -> float:
        return self.frames / self.fps


@dataclass(frozen=True)
class ShardRecord:
    """A committed shard: where it is and what it holds (the content of its stats JSON)."""

    path: str
    split: str
    samples: int
    bytes: int
    frames: int
    seconds: float
    keys: tuple[str, ...] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "split": self.split,
            "samples": self.samples,
            "bytes": self.bytes,
            "frames": self.frames,
            "seconds": self.seconds,
            "keys": list(self.keys),
        }


def stats_path(shard_path: str) -> str:
    """The stats JSON committed next to a shard."""
    return f"{shard_path}.stats.json"


def sample_metadata(sample: ClipSample) -> dict[str, Any]:
    """The ``json`` entry of a sample: provenance of the clip and a summary of its face track."""
    request = sample.request
    boxes = sample.boxes.astype(np.float64)
    return {
        "clip_id": request.clip_id,
        "source": request.source,
        "identity": request.identity,
        "video_id": request.video_id,
        "url": request.url,
        "split": request.split,
        "span": [request.start_s, request.end_s],
        "fps": sample.fps,
        "frames": sample.frames,
        "seconds": sample.seconds,
        "detector": sample.detector,
        "track_box": {
            "mean": boxes.mean(axis=0).tolist(),
            "min": boxes.min(axis=0).tolist(),
            "max": boxes.max(axis=0).tolist(),
        },
    }


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def encode_sample(sample: ClipSample) -> dict[str, Any]:
    """The WebDataset entries of a sample as bytes, after checking key and array shapes."""
    key = sample.request.key
    assert "." not in key and not key.startswith("_"), f"unsafe WebDataset key {key!r}"
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(
            f"clip {sample.request.clip_id!r}: key of {len(key)} characters exceeds {MAX_KEY_LENGTH}; "
            "shorten the clip id (sources derive short ids)"
        )
    frames = sample.frames
    if frames < 1:
        raise ValueError(f"clip {sample.request.clip_id!r}: no frames")
    if not sample.mp4:
        raise ValueError(f"clip {sample.request.clip_id!r}: empty mp4")
    entries: dict[str, Any] = {"__key__": key, "mp4": bytes(sample.mp4)}
    for name, tail in _ARRAY_SHAPES.items():
        array = np.asarray(getattr(sample, name))
        if array.shape != (frames, *tail):
            raise ValueError(
                f"clip {sample.request.clip_id!r}: {name} has shape {array.shape}, expected {(frames, *tail)}"
            )
        entries[f"{name}.npy"] = _npy(array)
    entries["json"] = json.dumps(sample_metadata(sample), sort_keys=True).encode("utf-8")
    return entries


def _padded(size: int) -> int:
    return -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _tar_bytes(entries: dict[str, Any]) -> int:
    """Bytes the entries take in a ustar archive: one header block each plus padded data."""
    return sum(_TAR_BLOCK + _padded(len(v)) for k, v in entries.items() if k != "__key__")


def _closed_tar_bytes(member_bytes: int) -> int:
    """Final archive size: members, two zero blocks, padded to a whole tar record."""
    return -(-(member_bytes + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD


class ShardWriter:
    """Write clip samples of one split into shards of about `target_bytes` each.

    A shard is closed before a sample that would take it over `target_bytes`, so shards stay
    under the target unless one sample alone is larger. Use as a context manager: a normal
    exit commits the open shard, an exception discards it (committed shards stay).
    """

    def __init__(self, store: OutputStore, prefix: str, split: str, target_bytes: int, batch_name: str) -> None:
        for label, value in (("split", split), ("batch name", batch_name)):
            if not _NAME.fullmatch(value):
                raise ValueError(f"{label} {value!r} must be letters, digits, '_' and '-' (it names files)")
        if target_bytes <= 0:
            raise ValueError(f"target_bytes must be positive, got {target_bytes}")
        self.store = store
        self.directory = posixpath.join(clean_relpath(prefix, allow_empty=True), split)
        self.split = split
        self.target_bytes = target_bytes
        self.batch_name = batch_name
        self.records: list[ShardRecord] = []
        self._seen_keys: set[str] = set()
        self._output: AtomicOutput | None = None
        self._tar: wds.TarWriter | None = None
        self._keys: list[str] = []
        self._member_bytes = 0
        self._frames = 0
        self._seconds = 0.0

    @property
    def current_path(self) -> str:
        return posixpath.join(self.directory, f"{self.batch_name}-{len(self.records):04d}.tar")

    def write(self, sample: ClipSample) -> str:
        """Add a sample; return the path of the shard it goes into (committed at the latest on `close`)."""
        entries = encode_sample(sample)
        key = entries["__key__"]
        if key in self._seen_keys:
            raise ValueError(f"clip {sample.request.clip_id!r} was already written by this writer")
        size = _tar_bytes(entries)
        if self._tar is not None and _closed_tar_bytes(self._member_bytes + size) > self.target_bytes:
            self._commit_shard()
        if self._tar is None:
            self._output = self.store.open_output_atomic(self.current_path)
            self._tar = wds.TarWriter(self._output.file, encoder=False, mtime=0)
        self._tar.write(entries)
        self._seen_keys.add(key)
        self._keys.append(key)
        self._member_bytes += size
        self._frames += sample.frames
        self._seconds += sample.seconds
        return self.current_path

    def _commit_shard(self) -> None:
        assert self._tar is not None and self._output is not None
        self._tar.close()
        self._output.commit()
        record = ShardRecord(
            path=self._output.relpath,
            split=self.split,
            samples=len(self._keys),
            bytes=_closed_tar_bytes(self._member_bytes),
            frames=self._frames,
            seconds=self._seconds,
            keys=tuple(self._keys),
        )
        self.store.write_bytes_atomic(stats_path(record.path), json.dumps(record.to_json(), indent=1).encode())
        self.records.append(record)
        self._tar, self._output = None, None
        self._keys, self._member_bytes, self._frames, self._seconds = [], 0, 0, 0.0

    def close(self) -> list[ShardRecord]:
        """Commit the open shard (if any) and return the records of every committed shard."""
        if self._tar is not None:
            self._commit_shard()
        return list(self.records)

    def abort(self) -> None:
        """Discard the open shard; shards committed before stay."""
        if self._tar is not None:
            # Close the tar stream so it does not flush into a closed file later; the shard is
            # thrown away, so a failure to flush it (the likely cause of the abort) changes nothing.
            with contextlib.suppress(OSError, ValueError, tarfile.TarError):
                self._tar.close()
        if self._output is not None:
            self._output.discard()
        self._tar, self._output = None, None
        self._keys, self._member_bytes, self._frames, self._seconds = [], 0, 0, 0.0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


@dataclass(frozen=True)
class ShardSample:
    """One decoded sample read back from a shard."""

    key: str
    mp4: bytes
    meta: dict[str, Any]
    boxes: np.ndarray
    landmarks: np.ndarray
    pose: np.ndarray
    expression: np.ndarray
    shard: str


def read_samples(paths: Iterable[str | Any]) -> Iterator[ShardSample]:
    """Stream the samples of the given shards in order (local paths or URLs webdataset can open).

    Reads exactly the shards given (no shuffling, no splitting across nodes: the caller chooses
    each node's shards); inside a DataLoader, worker processes share them out as webdataset does.
    """
    urls = [str(path) for path in paths]
    if not urls:
        return
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False).decode()
    for sample in dataset:
        yield ShardSample(
            key=sample["__key__"],
            mp4=sample["mp4"],
            meta=sample["json"],
            boxes=sample["boxes.npy"],
            landmarks=sample["landmarks.npy"],
            pose=sample["pose.npy"],
            expression=sample["expression.npy"],
            shard=sample["__url__"],
        )
