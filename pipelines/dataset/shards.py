"""WebDataset tar shards of `ClipSample`s: written atomically at a target size, read back as a stream.

Shards go to ``<split>/<batch_name>-<n:04d>.tar`` (see `pipelines.dataset.layout`); each is written
under a temporary name and renamed when complete (`pipelines.storage`), then a
``<shard>.stats.json`` with its sample count, size, frames, seconds, keys and where each sample's
members lie (`ShardRecord.members`: one ranged read fetches a sample) is committed next to it. A
writer that dies mid-shard therefore leaves no partial ``.tar`` that a reader could pick up.

Reading needs no webdataset pipeline: shards are plain tars whose members are ``<key>.<entry>``,
so `read_shard` streams one from any file object (a local file or an object-store stream) with
`tarfile`, one sample in memory at a time.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import webdataset as wds

from pipelines.dataset.layout import shard_path, stats_path
from pipelines.dataset.schema import ClipSample
from pipelines.storage import AtomicOutput, OutputStore

_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK


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
    members: dict[str, tuple[int, int]] | None = field(default=None, repr=False, compare=False)
    """key -> (offset, length): the bytes of the sample's members (headers included) in the tar, a
    valid tar stream on their own; None in stats written before they were recorded."""

    def to_json(self) -> dict[str, Any]:
        record = {"path": self.path, "split": self.split, "samples": self.samples, "bytes": self.bytes,
                  "frames": self.frames, "seconds": self.seconds, "keys": list(self.keys)}
        if self.members is not None:
            record["members"] = {key: list(span) for key, span in self.members.items()}
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> ShardRecord:
        members = record.get("members")
        return cls(path=record["path"], split=record["split"], samples=int(record["samples"]),
                   bytes=int(record["bytes"]), frames=int(record["frames"]), seconds=float(record["seconds"]),
                   keys=tuple(record["keys"]),
                   members=None if members is None else {key: (int(o), int(n)) for key, (o, n) in members.items()})


def read_stats(store: OutputStore, shard: str) -> ShardRecord | None:
    """The stats committed next to `shard`, or None when there are none (or they cannot be read)."""
    try:
        return ShardRecord.from_json(json.loads(store.read_bytes(stats_path(shard))))
    except (FileNotFoundError, OSError, ValueError, KeyError, TypeError):
        return None


def _padded(size: int) -> int:
    return -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _tar_bytes(entries: dict[str, Any]) -> int:
    """Bytes the entries take in a ustar archive: one header block each plus padded data."""
    return sum(_TAR_BLOCK + _padded(len(v)) for k, v in entries.items() if k != "__key__")


def _closed_tar_bytes(member_bytes: int) -> int:
    """Final archive size: members, two zero blocks, padded to a whole tar record."""
    return -(-(member_bytes + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD


class ShardWriter:
    """Write samples of one split into shards of about `target_bytes` each.

    A shard is closed before a sample that would take it over `target_bytes`, so shards stay
    under the target unless one sample alone is larger. Use as a context manager: a normal
    exit commits the open shard, an exception discards it (committed shards stay).
    """

    def __init__(self, store: OutputStore, split: str, target_bytes: int, batch_name: str) -> None:
        if target_bytes <= 0:
            raise ValueError(f"target_bytes must be positive, got {target_bytes}")
        shard_path(split, batch_name, 0)  # checks both names
        self.store = store
        self.split = split
        self.target_bytes = target_bytes
        self.batch_name = batch_name
        self.records: list[ShardRecord] = []
        self._seen_keys: set[str] = set()
        self._output: AtomicOutput | None = None
        self._tar: wds.TarWriter | None = None
        self._keys: list[str] = []
        self._members: dict[str, tuple[int, int]] = {}
        self._member_bytes = 0
        self._frames = 0
        self._seconds = 0.0

    @property
    def current_path(self) -> str:
        return shard_path(self.split, self.batch_name, len(self.records))

    def write(self, sample: ClipSample) -> str:
        """Add a sample; return the path of the shard it goes into (committed at the latest on `close`)."""
        entries = sample.to_entries()
        if sample.key in self._seen_keys:
            raise ValueError(f"clip {sample.meta.clip_id!r} was already written by this writer")
        size = _tar_bytes(entries)
        if self._tar is not None and _closed_tar_bytes(self._member_bytes + size) > self.target_bytes:
            self._commit_shard()
        if self._tar is None:
            self._output = self.store.open_output_atomic(self.current_path)
            self._tar = wds.TarWriter(self._output.file, encoder=False, mtime=0)
        first = self._tar.tarstream.offset
        self._tar.write(entries)
        self._members[sample.key] = (first, self._tar.tarstream.offset - first)
        self._seen_keys.add(sample.key)
        self._keys.append(sample.key)
        self._member_bytes += size
        self._frames += sample.frames
        self._seconds += sample.seconds
        return self.current_path

    def _commit_shard(self) -> None:
        assert self._tar is not None and self._output is not None
        self._tar.close()
        self._output.commit()
        record = ShardRecord(path=self._output.relpath, split=self.split, samples=len(self._keys),
                             bytes=_closed_tar_bytes(self._member_bytes), frames=self._frames,
                             seconds=self._seconds, keys=tuple(self._keys), members=dict(self._members))
        self.store.write_bytes_atomic(stats_path(record.path), json.dumps(record.to_json(), indent=1).encode())
        self.records.append(record)
        self._reset()

    def _reset(self) -> None:
        self._tar, self._output = None, None
        self._keys, self._members, self._member_bytes, self._frames, self._seconds = [], {}, 0, 0, 0.0

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
        self._reset()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def sample_spans(handle: IO[bytes]) -> dict[str, tuple[int, int]]:
    """key -> (offset, length) of each sample's members in a seekable tar, from its headers (`tarfile`
    seeks past the data): the `ShardRecord.members` of a shard whose stats predate them."""
    spans: dict[str, tuple[int, int]] = {}
    with tarfile.open(fileobj=handle, mode="r:") as archive:
        for member in archive:
            if member.isfile():
                key = posixpath.basename(member.name).partition(".")[0]
                first = spans[key][0] if key in spans else member.offset
                spans[key] = (first, member.offset_data + _padded(member.size) - first)
    return spans


SampleErrorHandler = Callable[[str, Exception], None]
"""Called with (where, error) for a sample or shard that cannot be read; the reader then skips it."""


def read_shard(stream: IO[bytes], shard: str, on_error: SampleErrorHandler | None = None) -> Iterator[ClipSample]:
    """Stream the samples of one shard from a binary file object, in order.

    A sample that does not match the schema, or a shard that ends in the middle (truncated),
    raises ValueError naming it, unless `on_error` is given: then it is reported there and skipped.
    """
    record: dict[str, Any] = {}
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, _, entry = posixpath.basename(member.name).partition(".")
                if record and key != record["__key__"]:
                    yield from _finish_record(record, shard, on_error)
                    record = {}
                record["__key__"] = key
                record[entry] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        _report(ValueError(f"shard {shard} cannot be read to the end ({type(error).__name__}: {error}); "
                           "it is truncated or not a tar"), shard, on_error)
        return
    if record:
        yield from _finish_record(record, shard, on_error)


def _finish_record(record: dict[str, Any], shard: str, on_error: SampleErrorHandler | None) -> Iterator[ClipSample]:
    try:
        yield ClipSample.from_entries(record, shard)
    except ValueError as error:
        _report(error, f"{shard}:{record.get('__key__')}", on_error)


def _report(error: ValueError, where: str, on_error: SampleErrorHandler | None) -> None:
    if on_error is None:
        raise error
    on_error(where, error)


def read_samples(paths: Iterable[str | Path], on_error: SampleErrorHandler | None = None) -> Iterator[ClipSample]:
    """Stream the samples of the given local shard files in order (see `read_shard`)."""
    for path in paths:
        try:
            stream = open(path, "rb")
        except OSError as error:
            _report(ValueError(f"shard {path} cannot be opened: {error}"), str(path), on_error)
            continue
        with stream:
            yield from read_shard(stream, str(path), on_error)


def read_store_samples(store: OutputStore, shards: Iterable[str],
                       on_error: SampleErrorHandler | None = None) -> Iterator[ClipSample]:
    """Stream the samples of shards inside a dataset store (local folder or object store)."""
    for shard in shards:
        try:
            stream = store.open_input(shard)
        except OSError as error:
            _report(ValueError(f"shard {store.uri}/{shard} cannot be opened: {error}"), shard, on_error)
            continue
        with stream:
            yield from read_shard(stream, shard, on_error)
