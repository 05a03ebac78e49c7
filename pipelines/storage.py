"""Where prepared data goes: a local directory or an object-store prefix, with atomic writes.

`OutputStore` wraps a `pyarrow.fs.FileSystem` and a base path so the shard and manifest writers
never see the difference between a laptop and a cluster bucket. Every write is all-or-nothing:
a reader (or a rerun after a crash) sees either the whole file or no file.

- Local file systems (also behind `SubTreeFileSystem`): the data goes to a hidden temporary
  name in the destination directory (``.<name>.<random>.part``), then one rename replaces the
  final name; a process killed before the rename leaves only a ``.part`` file, which `list`
  ignores and `remove_temporaries` deletes.
- Object stores (s3://, gs://, ...): the data is first spooled to a local temporary file and
  uploaded only once complete. An object becomes visible only when its upload finishes (single
  PUT, or the final step of a multipart upload), so upload is atomic by nature; spooling makes
  sure a writer that fails half-way never starts the upload at all.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import pyarrow.fs as pafs

TEMPORARY_SUFFIX = ".part"


def clean_relpath(relpath: str, *, allow_empty: bool = False) -> str:
    """Return `relpath` normalised to ``a/b/c``; refuse anything that could leave the store.

    Absolute paths, ``..``, backslashes and NUL characters are errors rather than silently
    rewritten, because they mean an id reached a path without being made safe first.
    """
    if not isinstance(relpath, str):
        raise TypeError(f"store paths are strings, got {type(relpath).__name__}")
    if "\\" in relpath or "\x00" in relpath:
        raise ValueError(f"store path {relpath!r} contains a backslash or NUL; use '/' separated safe names")
    if relpath.startswith("/"):
        raise ValueError(f"store path {relpath!r} is absolute; give a path relative to the store")
    parts = [part for part in relpath.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"store path {relpath!r} contains '..'; it must stay inside the store")
    if not parts and not allow_empty:
        raise ValueError("store path is empty; name a file inside the store")
    return "/".join(parts)


def _is_local(filesystem: pafs.FileSystem) -> bool:
    """True if renames on `filesystem` are atomic local renames."""
    if isinstance(filesystem, pafs.SubTreeFileSystem):
        return _is_local(filesystem.base_fs)
    return isinstance(filesystem, pafs.LocalFileSystem)


def _local_root(filesystem: pafs.FileSystem, base: str) -> str:
    if isinstance(filesystem, pafs.SubTreeFileSystem):
        return _local_root(filesystem.base_fs, posixpath.join(filesystem.base_path, base))
    return base


class AtomicOutput:
    """A binary file that becomes visible at its final name only on `commit()`.

    Used as a context manager it commits on normal exit and discards on an exception, so a
    failing writer never publishes a partial file.
    """

    def __init__(self, store: OutputStore, relpath: str) -> None:
        self.relpath = relpath
        self._store = store
        self._final = store._full(relpath)
        self._done = False
        if store.is_local:
            directory, name = posixpath.split(self._final)
            store.filesystem.create_dir(directory, recursive=True)
            self._temporary = posixpath.join(directory, f".{name}.{uuid.uuid4().hex[:12]}{TEMPORARY_SUFFIX}")
            self.file: BinaryIO = store.filesystem.open_output_stream(self._temporary)  # type: ignore[assignment]
        else:
            self.file = tempfile.TemporaryFile(prefix="store-spool-")

    def commit(self) -> None:
        """Publish the file under its final name (replacing an existing one)."""
        if self._done:
            raise RuntimeError(f"{self.relpath}: already committed or discarded")
        self._done = True
        fs = self._store.filesystem
        if self._store.is_local:
            self.file.close()
            fs.move(self._temporary, self._final)
            return
        self.file.seek(0)
        with fs.open_output_stream(self._final) as upload:
            shutil.copyfileobj(self.file, upload, length=8 << 20)
        self.file.close()

    def discard(self) -> None:
        """Drop everything written; the final name is left as it was."""
        if self._done:
            return
        self._done = True
        self.file.close()
        if self._store.is_local:
            self._store.filesystem.delete_file(self._temporary)

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


class OutputStore:
    """A directory tree on a local disk or in an object store, addressed by safe relative paths.

    `uri` is a local path (relative paths are made absolute), a ``file://`` URI or an object
    store URI such as ``s3://bucket/prefix`` (resolved by `pyarrow.fs.FileSystem.from_uri`).
    With `filesystem` given (for example a `pyarrow.fs.SubTreeFileSystem`), `uri` is the base
    path inside it.
    """

    def __init__(self, uri: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None) -> None:
        text = os.fspath(uri)
        if filesystem is not None:
            self.filesystem, self.base = filesystem, text.rstrip("/")
        elif "://" in text:
            self.filesystem, self.base = pafs.FileSystem.from_uri(text)
            self.base = self.base.rstrip("/")
        else:
            self.filesystem, self.base = pafs.LocalFileSystem(), os.path.abspath(text)
        self.uri = text
        self.is_local = _is_local(self.filesystem)

    def __repr__(self) -> str:
        return f"OutputStore({self.uri!r})"

    def _full(self, relpath: str) -> str:
        clean = clean_relpath(relpath, allow_empty=True)
        if not self.base:
            return clean
        return posixpath.join(self.base, clean) if clean else self.base

    def open_output_atomic(self, relpath: str) -> AtomicOutput:
        """An `AtomicOutput` for `relpath`; use it in a ``with`` block or call commit/discard."""
        return AtomicOutput(self, clean_relpath(relpath))

    def write_bytes_atomic(self, relpath: str, data: bytes) -> str:
        """Write `data` to `relpath` all-or-nothing; return the clean relative path."""
        with self.open_output_atomic(relpath) as output:
            output.file.write(data)
        return output.relpath

    def read_bytes(self, relpath: str) -> bytes:
        with self.filesystem.open_input_stream(self._full(clean_relpath(relpath))) as stream:
            return stream.read()

    def exists(self, relpath: str) -> bool:
        info = self.filesystem.get_file_info(self._full(clean_relpath(relpath)))
        return info.type == pafs.FileType.File

    def delete(self, relpath: str, *, missing_ok: bool = False) -> None:
        full = self._full(clean_relpath(relpath))
        if missing_ok and self.filesystem.get_file_info(full).type == pafs.FileType.NotFound:
            return
        self.filesystem.delete_file(full)

    def list(self, prefix: str = "", *, include_temporaries: bool = False) -> list[str]:
        """Sorted relative paths of all files under the directory `prefix` (recursive).

        Temporary files of unfinished atomic writes are left out unless asked for.
        """
        root = self._full(prefix)
        selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
        base = self.base.strip("/")
        paths = []
        for info in self.filesystem.get_file_info(selector):
            if info.type != pafs.FileType.File:
                continue
            if not include_temporaries and info.base_name.startswith(".") and info.base_name.endswith(TEMPORARY_SUFFIX):
                continue
            # Some file systems report paths with a leading '/' even for relative bases.
            path = info.path.strip("/")
            paths.append(posixpath.relpath(path, base) if base else path)
        return sorted(paths)

    def remove_temporaries(self, prefix: str = "") -> list[str]:
        """Delete leftovers of writers that died before committing; only safe while no writer runs."""
        stale = sorted(set(self.list(prefix, include_temporaries=True)) - set(self.list(prefix)))
        for relpath in stale:
            self.delete(relpath)
        return stale

    def local_path(self, relpath: str = "") -> Path:
        """The local file-system path of `relpath`; only for local stores."""
        if not self.is_local:
            raise ValueError(f"{self.uri} is not on a local file system; read it through the store instead")
        root = _local_root(self.filesystem, self.base)
        clean = clean_relpath(relpath, allow_empty=True)
        return Path(root) / clean if clean else Path(root)
