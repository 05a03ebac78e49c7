"""Local files for inputs that live in an object store: video decoding seeks, so it needs a real file.

A copy is made once per machine and input (named by a digest of the URI, written atomically) and
shared by every stage and chunk that runs there; local paths are used as they are. The copies are a
cache bounded by `INPUT_CACHE_BYTES`: before a new copy is made, the least recently used ones are
deleted (never one used in the last `IN_USE_S` seconds, which a running stage may still read).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from pipelines.edit.jobs import is_uri
from pipelines.errors import MISSING_VIDEO, VideoError
from pipelines.storage import OutputStore, atomic_local_path

INPUT_CACHE_BYTES = 50 * 2**30
"""Local copies of object-store inputs kept per machine (least recently used ones go first)."""
IN_USE_S = 3600.0


def scratch_dir(workdir: str | None) -> Path:
    """The machine-local scratch folder of editing runs."""
    return Path(workdir).expanduser() if workdir else Path(tempfile.gettempdir()) / "dpe-portrait-edit"


def local_copy(path: str, workdir: str | None) -> Path:
    """A local file with the content of `path` (a local path, or an s3:// / gs:// URI copied once)."""
    if not is_uri(path):
        return Path(path[len("file://"):] if path.startswith("file://") else path)
    directory, name = posixpath.split(path.rstrip("/"))
    cache = scratch_dir(workdir) / "inputs"
    target = cache / hashlib.sha1(path.encode()).hexdigest()[:20] / name
    if target.is_file():
        os.utime(target)  # recently used: evicted last
        return target
    store = OutputStore(directory)
    if not store.exists(name):
        raise VideoError(MISSING_VIDEO, f"{path}: no such object")
    evict_least_recently_used(cache, INPUT_CACHE_BYTES)
    with atomic_local_path(target) as temporary, store.open_input(name) as stream, open(temporary, "wb") as out:
        shutil.copyfileobj(stream, out, length=8 << 20)
    return target


def evict_least_recently_used(cache: Path, limit_bytes: int, in_use_s: float = IN_USE_S) -> list[Path]:
    """Delete cached copies, least recently used first, until the cache holds at most `limit_bytes`;
    copies used within `in_use_s` seconds stay. Returns what was deleted."""
    files = sorted((entry.stat().st_mtime, entry) for entry in cache.glob("*/*") if entry.is_file())
    total = sum(entry.stat().st_size for _, entry in files)
    deleted = []
    for used, entry in files:
        if total <= limit_bytes or time.time() - used < in_use_s:
            break
        total -= entry.stat().st_size
        entry.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            entry.parent.rmdir()
        deleted.append(entry)
    return deleted


@contextlib.contextmanager
def store_output(store: OutputStore, relpath: str) -> Iterator[Path]:
    """A local path to write `relpath` of `store` to; it appears in the store, complete, when the block ends.

    Local stores: a temporary name beside the final file, renamed (`atomic_local_path`). Object
    stores: a local temporary file, uploaded only once complete (`OutputStore.open_output_atomic`).
    """
    if store.is_local:
        with atomic_local_path(store.local_path(relpath)) as temporary:
            yield temporary
        return
    with tempfile.TemporaryDirectory(prefix="edit-output-") as directory:
        temporary = Path(directory) / posixpath.basename(relpath)
        yield temporary
        with store.open_output_atomic(relpath) as output, open(temporary, "rb") as source:
            shutil.copyfileobj(source, output.file, length=8 << 20)
