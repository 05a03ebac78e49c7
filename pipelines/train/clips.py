"""The training clips of a prepared dataset: which there are, and random access to one of them.

`load_catalogue` reads only the dataset's records (the shard index and the manifest), never a
shard, so the driver can refuse a missing dataset or an empty split before any worker starts.

`ClipReader` reads one sample on demand with one ranged read: where each sample lies in its
shard comes from the shard's stats (`dataset.shards.ShardRecord.members`, recorded by the writer);
for a dataset written before those were recorded, the shard's tar headers are scanned once and
the result kept in a local cache file, so a restart does not scan again. A read that fails with a
transient error (any I/O error but a missing or forbidden file) is retried with exponential
backoff before the sample counts as bad. Entries are rebuilt with `ClipSample.from_entries`, the
schema every reader shares.

Two ways to decode, the same frames either way (`pair`):
- seek (`whole=False`, the default at scale): decode only the two frames of a pair, each from the
  keyframe before it (`media.video.read_frames_at`); stored samples (compressed) are kept in an LRU
  cache bounded in bytes.
- whole clips (`whole=True`, when every clip's decoded window fits the cache, as in demos): decode
  a clip's window once (`media.video.read_clip`) and keep it decoded in the same bounded cache.

A shard that cannot be opened or scanned, or a sample that does not match the schema, cannot be
decoded or whose video length disagrees with its arrays, is skipped: recorded once with its
failure class (`pipelines.errors`) and a message naming it, and never read again. The length is
checked against the container's packets in seek mode too, so whether a clip is usable never
depends on which frames a draw picked.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import tarfile
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from pipelines.dataset import manifest
from pipelines.dataset.layout import SHARD_INDEX_PATH
from pipelines.dataset.schema import ClipSample
from pipelines.dataset.shards import read_stats, sample_spans
from pipelines.errors import BAD_SAMPLE, UNREADABLE_SHARD, RecordedFailure, VideoError
from pipelines.media.video import read_clip, read_frames_at
from pipelines.storage import OutputStore, atomic_local_path, clean_relpath

LOG = logging.getLogger(__name__)


_T = TypeVar("_T")
Span = tuple[int, int]
"""(offset, length) of a sample's members in its shard."""
OPEN_SHARDS = 8
"""Shard files each reader keeps open (an open object-store file costs one HEAD, each read one GET)."""


def index_cache_folder() -> Path:
    """Where scanned indexes of shards without recorded member offsets are kept ($PORTRAIT_CACHE, else
    $XDG_CACHE_HOME/portrait, else ~/.cache/portrait)."""
    root = os.environ.get("PORTRAIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "portrait")
    return Path(root) / "shard-members"


class TrainingDataError(ValueError):
    """The dataset cannot be trained on (missing, not prepared, empty split); the message says what to do."""


@dataclass(frozen=True)
class ClipEntry:
    """A clip the manifest records as prepared: where it is and whose face it shows."""

    key: str
    identity: str
    shard: str
    frames: int


@dataclass(frozen=True)
class Catalogue:
    """The clips of one split, grouped by identity (the first draw of the official pair sampler)."""

    data: str
    split: str
    clips: tuple[ClipEntry, ...]
    shards: tuple[str, ...]
    by_identity: dict[str, tuple[ClipEntry, ...]] = field(repr=False, compare=False)

    @property
    def identities(self) -> tuple[str, ...]:
        return tuple(self.by_identity)

    def describe(self) -> str:
        return (f"{self.data} [{self.split}]: {len(self.clips)} clips of {len(self.by_identity)} identities "
                f"in {len(self.shards)} shard(s)")


def load_catalogue(data: str, split: str) -> Catalogue:
    """The prepared clips of `split` in the dataset at `data`; TrainingDataError when there are none."""
    store = OutputStore(data)
    if store.is_local and not store.local_path().is_dir():
        raise TrainingDataError(f"dataset {data} does not exist; give --data the output folder of `portrait prepare`")
    if not store.exists(SHARD_INDEX_PATH):
        raise TrainingDataError(f"{data} has no {SHARD_INDEX_PATH}: it is not a finished `portrait prepare` output "
                                "(run or rerun `portrait prepare --output` on it first)")
    index = json.loads(store.read_bytes(SHARD_INDEX_PATH))
    shards = tuple(sorted(index.get(split, ())))
    if not shards:
        raise TrainingDataError(f"{data} has no shards in split {split!r} (splits: {sorted(index) or 'none'}); "
                                "prepare clips of that split, or choose another with --train-split/--eval-split")
    in_split = set(shards)
    rows = sorted((row for row in manifest.load_state(store).values()
                   if row.status == manifest.OK and row.split == split and row.shard in in_split),
                  key=lambda row: row.key)
    clips = tuple(ClipEntry(row.key, row.identity, row.shard, int(row.frames or 0)) for row in rows)
    if not clips:
        raise TrainingDataError(f"{data}: the manifest records no prepared clip in the {len(shards)} shard(s) of "
                                f"split {split!r}; check it with `portrait inspect {data}`")
    by_identity: dict[str, list[ClipEntry]] = defaultdict(list)
    for clip in clips:
        by_identity[clip.identity].append(clip)
    return Catalogue(data, split, clips, shards, {k: tuple(v) for k, v in sorted(by_identity.items())})


@dataclass(frozen=True)
class LoadedClip:
    """A decoded clip at model size with the per-frame arrays the training pair needs."""

    key: str
    frames: np.ndarray = field(repr=False)  # (T, S, S, 3) uint8 RGB, T <= the frame window
    pose: np.ndarray = field(repr=False)  # (T, 6)
    expression: np.ndarray = field(repr=False)  # (T, 68, 2)
    landmarks: np.ndarray = field(repr=False)  # (T, 68, 2) in pixels of the model-size frames

    @property
    def length(self) -> int:
        return len(self.frames)

    @property
    def nbytes(self) -> int:
        return self.frames.nbytes


@dataclass(frozen=True)
class Pair:
    """Frames A and B of one clip (copies: a pair does not keep its clip in memory), with their arrays.

    Each array has a leading axis of 2: index 0 is frame A, index 1 frame B.
    """

    key: str
    a: int
    b: int
    frames: np.ndarray = field(repr=False)  # (2, S, S, 3) uint8 RGB
    pose: np.ndarray = field(repr=False)  # (2, 6)
    expression: np.ndarray = field(repr=False)  # (2, 68, 2)
    landmarks: np.ndarray = field(repr=False)  # (2, 68, 2) in pixels of the frames

    @classmethod
    def of(cls, clip: LoadedClip, a: int, b: int) -> Pair:
        index = [a, b]
        return cls(clip.key, a, b, clip.frames[index], clip.pose[index], clip.expression[index], clip.landmarks[index])


class ClipReader:
    """Random access to the clips of a dataset, decoded at `size` px, with a bounded LRU cache.

    `frame_window` limits decoding (and sampling) to the first N frames of each clip.
    `skipped` maps each unusable sample's key to (failure class, message); `reads` counts ranged
    sample reads, `retried` the reads tried again after a transient error.
    """

    def __init__(self, data: str, size: int, *, frame_window: int | None = None, cache_bytes: int = 256 << 20,
                 decode_threads: int = 1, retries: int = 4, backoff_s: float = 0.1) -> None:
        self.store = OutputStore(data)
        self.size = size
        self.frame_window = frame_window
        self.cache_bytes = cache_bytes
        self.decode_threads = decode_threads
        self.retries = retries
        self.backoff_s = backoff_s
        self.skipped: dict[str, tuple[str, str]] = {}
        self.decoded = 0
        self.reads = 0
        self.retried = 0
        self._cache: OrderedDict[str, LoadedClip | ClipSample] = OrderedDict()
        self._cached_bytes = 0
        self._spans: dict[str, dict[str, Span] | None] = {}
        self._sizes: dict[str, int] = {}  # bytes the stats record for a shard
        self._handles: OrderedDict[str, object] = OrderedDict()

    @property
    def cached_bytes(self) -> int:
        """Bytes held in the cache now (decoded frames, or stored samples in seek mode)."""
        return self._cached_bytes

    def length(self, frames: int) -> int:
        """The frames a pair may be drawn from in a clip of `frames` frames."""
        return frames if self.frame_window is None else min(frames, self.frame_window)

    def load(self, clip: ClipEntry) -> LoadedClip | None:
        """The decoded clip window, or None when it is unusable (then recorded in `skipped`)."""
        cached = self._cached(clip.key)
        if isinstance(cached, LoadedClip):
            return cached
        return self._recording(clip, lambda: self._remember(self._decoded(self._sample(clip))))

    def pair(self, clip: ClipEntry, draw: np.ndarray, *, whole: bool) -> Pair | None:
        """Frames int(draw * length) of `clip` (draw: two numbers in [0, 1)), decoded from the whole clip
        window (cached) or alone after a seek; None when the clip is unusable (recorded in `skipped`)."""
        if whole:
            loaded = self.load(clip)
            if loaded is None:
                return None
            a, b = (int(x) for x in draw * loaded.length)
            return Pair.of(loaded, a, b)
        return self._recording(clip, lambda: self._seek_pair(clip, draw))

    def _recording(self, clip: ClipEntry, read: Callable[[], _T]) -> _T | None:
        if clip.key in self.skipped:
            return None
        try:
            return read()
        except RecordedFailure as failure:
            self.skipped[clip.key] = (failure.failure_class, failure.message)
            LOG.warning("skipping training sample %s: %s", clip.key, failure)
            return None

    def _seek_pair(self, clip: ClipEntry, draw: np.ndarray) -> Pair:
        cached = self._cached(clip.key)
        sample = cached if isinstance(cached, ClipSample) else self._remember(self._sample(clip))
        a, b = (int(x) for x in draw * self.length(sample.frames))
        try:
            frames = read_frames_at(sample.mp4, [a, b], self.size, frames=sample.frames, threads=self.decode_threads)
        except VideoError as error:
            raise RecordedFailure(BAD_SAMPLE, f"sample {sample.key} in {sample.shard}: {error.message}") from None
        self.decoded += 1
        index = [a, b]
        return Pair(clip.key, a, b, frames, sample.pose[index], sample.expression[index],
                    sample.landmarks[index] * (self.size / sample.meta.crop_size))

    def _sample(self, clip: ClipEntry) -> ClipSample:
        """The stored sample, read with one ranged read."""
        spans = self._shard_spans(clip.shard)
        if spans is None:
            raise RecordedFailure(UNREADABLE_SHARD, f"shard {self.store.uri}/{clip.shard} of sample {clip.key} "
                                                    "cannot be read (see the log for why)")
        span = spans.get(clip.key)
        if span is None:
            raise RecordedFailure(BAD_SAMPLE, f"sample {clip.key} is recorded in {clip.shard} but not in that shard")
        try:
            data = self._retrying(f"{clip.shard}:{clip.key}", lambda: self._read_range(clip.shard, *span))
        except (FileNotFoundError, PermissionError) as error:
            raise RecordedFailure(UNREADABLE_SHARD, f"shard {self.store.uri}/{clip.shard} of sample {clip.key} "
                                                    f"cannot be read: {error}") from None
        except OSError as error:
            raise RecordedFailure(BAD_SAMPLE, f"sample {clip.key} in {clip.shard} cannot be read after "
                                              f"{self.retries} retries: {error}") from None
        try:
            record: dict[str, object] = {"__key__": clip.key}
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
                for member in archive:
                    if member.isfile():
                        record[posixpath.basename(member.name).partition(".")[2]] = archive.extractfile(member).read()
            return ClipSample.from_entries(record, clip.shard)
        except (tarfile.TarError, EOFError, ValueError) as error:
            raise RecordedFailure(BAD_SAMPLE, f"{error}") from None

    def _decoded(self, sample: ClipSample) -> LoadedClip:
        wanted = self.length(sample.frames)
        try:
            frames = read_clip(sample.mp4, self.size, limit=wanted)
        except VideoError as error:
            raise RecordedFailure(BAD_SAMPLE, f"sample {sample.key} in {sample.shard}: {error.message}") from None
        if len(frames) != wanted:
            raise RecordedFailure(BAD_SAMPLE, f"sample {sample.key} in {sample.shard}: its video has {len(frames)} "
                                              f"frames where its arrays have {sample.frames}")
        self.decoded += 1
        scale = self.size / sample.meta.crop_size
        return LoadedClip(sample.key, frames, sample.pose[:wanted], sample.expression[:wanted],
                          sample.landmarks[:wanted] * scale)

    def _retrying(self, what: str, read: Callable[[], _T]) -> _T:
        """`read()`, tried again after a transient I/O error (with backoff `backoff_s` * 2^attempt)."""
        for attempt in range(self.retries + 1):
            try:
                return read()
            except (FileNotFoundError, PermissionError):
                raise
            except OSError as error:
                if attempt == self.retries:
                    raise
                self.retried += 1
                LOG.info("reading %s/%s failed (%s); retry %d of %d", self.store.uri, what, error, attempt + 1,
                         self.retries)
                time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _read_range(self, shard: str, offset: int, length: int) -> bytes:
        handle = self._handle(shard)
        try:
            data = handle.read_at(length, offset)
        except OSError:
            self._handles.pop(shard, None)  # reopen on the retry
            raise
        self.reads += 1
        if len(data) != length:
            raise RecordedFailure(UNREADABLE_SHARD, f"shard {self.store.uri}/{shard} ends {length - len(data)} bytes "
                                                    "before the end of a sample recorded in it (truncated)")
        return data

    def _handle(self, shard: str):
        """A random-access file of the shard, kept open (one HEAD per open on object stores)."""
        if shard in self._handles:
            self._handles.move_to_end(shard)
            return self._handles[shard]
        path = clean_relpath(shard)
        handle = self.store.filesystem.open_input_file(posixpath.join(self.store.base, path) if self.store.base else path)
        expected = self._sizes.get(shard)
        found = handle.size()
        if expected is not None and found != expected:
            handle.close()
            raise RecordedFailure(UNREADABLE_SHARD, f"shard {self.store.uri}/{shard} is {found} bytes where "
                                                    f"its stats record {expected} (replaced or damaged)")
        self._handles[shard] = handle
        while len(self._handles) > OPEN_SHARDS:
            self._handles.popitem(last=False)[1].close()
        return handle

    def _shard_spans(self, shard: str) -> dict[str, Span] | None:
        """key -> (offset, length) of a shard's samples: from its stats, else scanned once and cached."""
        if shard not in self._spans:
            stats = read_stats(self.store, shard)
            if stats is not None and stats.members is not None:
                self._spans[shard] = dict(stats.members)
                self._sizes[shard] = stats.bytes
            else:
                self._spans[shard] = self._scanned_spans(shard)
        return self._spans[shard]

    def _scanned_spans(self, shard: str) -> dict[str, Span] | None:
        """Spans of a shard written before they were recorded, from its tar headers (each one a ranged
        read on object stores): scanned once, then kept in `index_cache_folder()`; None if unreadable."""
        try:
            path = clean_relpath(shard)
            info = self.store.filesystem.get_file_info(posixpath.join(self.store.base, path) if self.store.base
                                                       else path)
            identity = f"{self.store.uri}/{shard}:{info.size}:{info.mtime_ns}"
            cached = index_cache_folder() / f"{hashlib.sha256(identity.encode()).hexdigest()}.json"
            if cached.is_file():
                return {key: (int(o), int(n)) for key, (o, n) in json.loads(cached.read_text()).items()}
            with self.store.filesystem.open_input_file(info.path) as handle:
                spans = sample_spans(handle)
        except (OSError, tarfile.TarError, EOFError, ValueError) as error:
            LOG.warning("skipping unreadable shard %s/%s: %s: %s", self.store.uri, shard, type(error).__name__, error)
            return None
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            with atomic_local_path(cached) as temporary:
                temporary.write_text(json.dumps(spans))
        except OSError as error:
            LOG.info("the index of %s/%s is not cached (%s)", self.store.uri, shard, error)
        return spans

    def _cached(self, key: str) -> LoadedClip | ClipSample | None:
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
        return cached

    def _remember(self, item: _T) -> _T:
        previous = self._cache.pop(item.key, None)
        if previous is not None:
            self._cached_bytes -= _nbytes(previous)
        self._cache[item.key] = item
        self._cached_bytes += _nbytes(item)
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= _nbytes(evicted)
        return item


def _nbytes(item: LoadedClip | ClipSample) -> int:
    if isinstance(item, LoadedClip):
        return item.nbytes
    return len(item.mp4) + sum(array.nbytes for array in item.arrays().values())
