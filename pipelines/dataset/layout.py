"""Where everything of a dataset lives, and the marker that makes a folder a dataset of ours.

```
OUT/portrait-dataset.json            the marker: format version and the settings that shape samples
OUT/<split>/<batch>-<n:04d>.tar      shards, with <shard>.stats.json beside each
OUT/manifest/parts/<batch>.parquet   one commit record per batch (and per run's rejected inputs)
OUT/manifest/runs/<run>.json         the batches a run planned, written before any of them starts
OUT/manifest.parquet                 the consolidated manifest: the latest row per requested clip
OUT/shards.json, OUT/summary.json    shard index per split; the last run's counts
```

A folder becomes a dataset only when `claim_output` finds it empty (or absent) and writes the
marker; from then on only files named here are ever written or deleted in it. A non-empty folder
without the marker, a folder inside a dataset, and a rerun whose sample-shaping settings differ
from the marker's are refused before any work starts, so a mistyped ``--output`` cannot delete or
overwrite what someone else keeps there.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

import pyarrow.fs as pafs

from pipelines.storage import OutputStore

FORMAT = "dpe-portrait-dataset"
FORMAT_VERSION = 1
MARKER_PATH = "portrait-dataset.json"
MANIFEST_PATH = "manifest.parquet"
PARTS_PREFIX = "manifest/parts"
RUNS_PREFIX = "manifest/runs"
SHARD_INDEX_PATH = "shards.json"
SUMMARY_PATH = "summary.json"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_SPLIT = re.compile(r"[a-z0-9][a-z0-9-]*")
_SHARD_NAME = re.compile(r"(?P<batch>[A-Za-z0-9][A-Za-z0-9_-]*)-(?P<index>\d{4})\.tar")


class OutputRefused(Exception):
    """The output cannot be used as a dataset folder; the message names it and says what to do."""


def check_batch_name(batch: str) -> str:
    if not _NAME.fullmatch(batch):
        raise ValueError(f"batch name {batch!r} must be letters, digits, '_' and '-' (it names files)")
    return batch


def check_split(split: str) -> str:
    if not _SPLIT.fullmatch(split):
        raise ValueError(f"split {split!r} must be lower-case letters, digits and '-' (it names a folder)")
    return split


def shard_path(split: str, batch: str, index: int) -> str:
    """The relative path of shard `index` of a batch in a split."""
    return f"{check_split(split)}/{check_batch_name(batch)}-{index:04d}.tar"


def shard_batch(relpath: str) -> str | None:
    """The batch a shard path belongs to, or None when the name is not one `shard_path` makes."""
    match = _SHARD_NAME.fullmatch(posixpath.basename(relpath))
    return match.group("batch") if match else None


def stats_path(shard: str) -> str:
    """The stats JSON committed next to a shard."""
    return f"{shard}.stats.json"


def part_path(batch: str) -> str:
    return f"{PARTS_PREFIX}/{check_batch_name(batch)}.parquet"


def run_path(run_id: str) -> str:
    return f"{RUNS_PREFIX}/{check_batch_name(run_id)}.json"


# --- the marker ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetMarker:
    """What the marker file says: the format, when the dataset was created, and the settings that
    decide what a sample contains (crop size, frame rate, detector, tracking and framing, encoder;
    `STORAGE_SETTINGS` among them as first recorded)."""

    version: int
    created_at: str
    sample_settings: dict[str, Any]

    def to_json(self) -> bytes:
        return json.dumps({"format": FORMAT, "version": self.version, "created_at": self.created_at,
                           "sample_settings": self.sample_settings}, indent=1, sort_keys=True).encode()


def read_marker(store: OutputStore) -> DatasetMarker | None:
    """The marker of the dataset at `store`, None when there is none; a damaged one is refused."""
    if not store.exists(MARKER_PATH):
        return None
    try:
        record = json.loads(store.read_bytes(MARKER_PATH))
        if record.get("format") != FORMAT:
            raise ValueError(f"format is {record.get('format')!r}")
        return DatasetMarker(int(record["version"]), str(record["created_at"]), dict(record["sample_settings"]))
    except (ValueError, KeyError, TypeError) as error:
        raise OutputRefused(f"{store.uri}/{MARKER_PATH} is not a readable dataset marker ({error}); "
                            "restore it or prepare into a new folder") from error


STORAGE_SETTINGS = ("keyframe_interval",)
"""Recorded settings that change how a sample is stored, not what it shows: a dataset may mix their
values (a rerun with another value, or into a dataset made before the setting existed, is not
refused). `keyframe_interval`: frames between keyframes at most in the stored mp4s (absent in
datasets made before it was recorded: x264's default, 250); readers seek either way."""


def settings_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Lines ``name: recorded -> current`` for every sample-shaping setting that differs."""
    names = sorted((set(recorded) | set(current)) - set(STORAGE_SETTINGS))
    return [f"{name}: {recorded.get(name, '(absent)')!r} -> {current.get(name, '(absent)')!r}"
            for name in names if recorded.get(name) != current.get(name)]


def claim_output(store: OutputStore, sample_settings: Mapping[str, Any]) -> DatasetMarker:
    """Make sure `store` may hold this dataset, before any work: return its marker (new or existing).

    Refused (`OutputRefused`) when the folder lies inside another dataset, when it is not empty
    and has no marker (it holds someone else's files, or other datasets), or when its marker
    records other sample-shaping settings than `sample_settings` (samples would be mixed).
    """
    settings = json.loads(json.dumps(dict(sample_settings)))  # the form it takes in the marker
    try:
        return _claim(store, settings)
    except OSError as error:  # a missing bucket, no permission, a read-only disk, a file in the way
        raise OutputRefused(f"{store.uri} cannot be used as the dataset folder: {error}. Check that it (or its "
                            "bucket) exists and is writable, and that credentials and endpoint are set "
                            "(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY for S3-compatible "
                            "storage)") from error


def _claim(store: OutputStore, settings: dict[str, Any]) -> DatasetMarker:
    if store.filesystem.get_file_info(store.base).type == pafs.FileType.File:
        raise OutputRefused(f"{store.uri} is a file, not a folder; give --output a folder (new or empty) or a "
                            "bucket prefix")
    outer = _enclosing_dataset(store)
    if outer is not None:
        raise OutputRefused(f"{store.uri} lies inside the dataset {outer}; prepare into that dataset's own "
                            "folder, or into a folder outside it")
    marker = read_marker(store)
    if marker is not None:
        if marker.version != FORMAT_VERSION:
            raise OutputRefused(f"{store.uri} holds a dataset of format version {marker.version}; this version "
                                f"writes {FORMAT_VERSION}: prepare into a new folder")
        differences = settings_differences(marker.sample_settings, settings)
        if differences:
            raise OutputRefused(
                f"{store.uri} was prepared with other settings that change what a sample contains; mixing "
                f"both kinds in one dataset is refused. Differences (dataset -> this run): "
                + "; ".join(differences) + ". Use the dataset's settings, or prepare into a new folder.")
        return marker
    entries = store.list_dir("")
    if entries:
        nested = [entry for entry in entries if store.exists(posixpath.join(entry, MARKER_PATH))]
        what = (f"it holds other datasets ({', '.join(nested[:3])})" if nested
                else f"it holds files that portrait did not write ({', '.join(entries[:5])}"
                     f"{', ...' if len(entries) > 5 else ''})")
        raise OutputRefused(f"{store.uri} is not empty and is not a dataset folder: {what}. Nothing was written "
                            f"or deleted. Give --output a new or empty folder.")
    marker = DatasetMarker(FORMAT_VERSION, datetime.now(timezone.utc).isoformat(timespec="seconds"), settings)
    store.write_bytes_atomic(MARKER_PATH, marker.to_json())
    return marker


def _enclosing_dataset(store: OutputStore) -> str | None:
    """The nearest folder above `store` that holds a dataset marker, if any."""
    path = store.base.rstrip("/")
    while True:
        parent = posixpath.dirname(path)
        if parent == path or not parent:
            return None
        path = parent
        info = store.filesystem.get_file_info(posixpath.join(path, MARKER_PATH))
        if info.type == pafs.FileType.File:
            return path
