"""The training clips of a prepared dataset: which there are, and random access to one of them.

`load_catalogue` reads only the dataset's records (the shard index and the manifest), never a
shard, so the driver can refuse a missing dataset or an empty split before any worker starts.

`ClipReader` reads one sample on demand: the first time a shard is touched its tar headers are
scanned (`tarfile` seeks past the data; on object stores each header is a ranged read) to learn
where each member lies, then a sample's entries are read by offset and rebuilt with
`ClipSample.from_entries`, the schema every reader shares. The mp4 is decoded in memory
(`media.video.read_clip`: only the frames the sampler may draw), resized to the model size, and
kept in a small LRU cache bounded in bytes: memory holds the clips in use, never a whole shard.

A shard that cannot be opened or scanned, or a sample that does not match the schema, cannot be
decoded or whose video length disagrees with its arrays, is skipped: recorded once with its
failure class (`pipelines.errors`) and a message naming it, and never read again.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

import numpy as np

from pipelines.dataset import manifest
from pipelines.dataset.layout import SHARD_INDEX_PATH
from pipelines.dataset.schema import ClipSample
from pipelines.errors import BAD_SAMPLE, UNREADABLE_SHARD, RecordedFailure, VideoError
from pipelines.media.video import read_clip
from pipelines.storage import OutputStore, clean_relpath

LOG = logging.getLogger(__name__)


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


class ClipReader:
    """Random access to the clips of a dataset, decoded at `size` px, with a bounded LRU cache.

    `frame_window` limits decoding (and sampling) to the first N frames of each clip.
    `skipped` maps each unusable sample's key to (failure class, message).
    """

    def __init__(self, data: str, size: int, *, frame_window: int | None = None, cache_bytes: int = 256 << 20) -> None:
        self.store = OutputStore(data)
        self.size = size
        self.frame_window = frame_window
        self.cache_bytes = cache_bytes
        self.skipped: dict[str, tuple[str, str]] = {}
        self.decoded = 0
        self._cache: OrderedDict[str, LoadedClip] = OrderedDict()
        self._cached_bytes = 0
        self._members: dict[str, dict[str, dict[str, tuple[int, int]]] | None] = {}

    @property
    def cached_bytes(self) -> int:
        """Bytes of decoded frames held in the cache now."""
        return self._cached_bytes

    def load(self, clip: ClipEntry) -> LoadedClip | None:
        """The decoded clip, or None when it is unusable (then recorded in `skipped`)."""
        cached = self._cache.get(clip.key)
        if cached is not None:
            self._cache.move_to_end(clip.key)
            return cached
        if clip.key in self.skipped:
            return None
        try:
            loaded = self._read(clip)
        except RecordedFailure as failure:
            self.skipped[clip.key] = (failure.failure_class, failure.message)
            LOG.warning("skipping training sample %s: %s", clip.key, failure)
            return None
        self._remember(loaded)
        return loaded

    def _read(self, clip: ClipEntry) -> LoadedClip:
        members = self._shard_members(clip.shard)
        if members is None:
            raise RecordedFailure(UNREADABLE_SHARD, f"shard {self.store.uri}/{clip.shard} of sample {clip.key} "
                                                    "cannot be read (see the log for why)")
        entries = members.get(clip.key)
        if entries is None:
            raise RecordedFailure(BAD_SAMPLE, f"sample {clip.key} is recorded in {clip.shard} but not in that shard")
        try:
            with self._open(clip.shard) as handle:
                record: dict[str, object] = {"__key__": clip.key}
                for entry, (offset, length) in entries.items():
                    handle.seek(offset)
                    record[entry] = handle.read(length)
            sample = ClipSample.from_entries(record, clip.shard)
        except (OSError, ValueError) as error:
            raise RecordedFailure(BAD_SAMPLE, f"{error}") from None
        return self._decoded(sample)

    def _decoded(self, sample: ClipSample) -> LoadedClip:
        wanted = sample.frames if self.frame_window is None else min(sample.frames, self.frame_window)
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

    def _open(self, shard: str):
        """A seekable file of a shard (local file or ranged object-store reads)."""
        path = clean_relpath(shard)
        return self.store.filesystem.open_input_file(posixpath.join(self.store.base, path) if self.store.base else path)

    def _shard_members(self, shard: str) -> dict[str, dict[str, tuple[int, int]]] | None:
        """key -> entry -> (offset, size) of a shard's members, from its tar headers; None if unreadable."""
        if shard in self._members:
            return self._members[shard]
        members: dict[str, dict[str, tuple[int, int]]] | None = defaultdict(dict)
        try:
            with self._open(shard) as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
                for member in archive:
                    if member.isfile():
                        key, _, entry = posixpath.basename(member.name).partition(".")
                        members[key][entry] = (member.offset_data, member.size)
        except (OSError, tarfile.TarError, EOFError) as error:
            LOG.warning("skipping unreadable shard %s/%s: %s: %s", self.store.uri, shard, type(error).__name__, error)
            members = None
        self._members[shard] = members
        return members

    def _remember(self, clip: LoadedClip) -> None:
        self._cache[clip.key] = clip
        self._cached_bytes += clip.frames.nbytes
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= evicted.frames.nbytes

