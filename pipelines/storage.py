"""Where prepared data goes: a local directory or an object-store prefix, with atomic writes.

`OutputStore` wraps a `pyarrow.fs.FileSystem` and a base path so the shard and manifest writers
never see the difference between a laptop and a cluster bucket. Every write is all-or-nothing:
a reader (or a rerun after a crash) sees either the whole file or no file.

- Local file systems (also behind `SubTreeFileSystem`): the data goes to a hidden temporary
  name in the destination directory (`temporary_name`: ``.<name>.<12 hex>.part``), then one
  rename replaces the final name; a process killed before the rename leaves only such a file,
  which `list` ignores and `remove_temporaries` deletes (only names of exactly that form).
- Object stores (s3://, gs://, ...): the data is first spooled to a local temporary file and
  uploaded only once complete. An object becomes visible only when its upload finishes (single
  PUT, or the final step of a multipart upload), so upload is atomic by nature; spooling makes
  sure a writer that fails half-way never starts the upload at all.

Readers that need a real file (video decoding seeks, `torch.load` maps) get one from `local_copy`:
a local location is used as it is; an object is copied once per machine into a cache folder (named
by a digest of its URI, written atomically) that is bounded by `LOCAL_COPIES_BYTES`: before a new
copy is made, the least recently used ones are deleted (never one used in the last `IN_USE_S`
seconds, which a running reader may still hold).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Iterator
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import pyarrow.fs as pafs

_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{12}\.part")
_SECRET_PARAMETERS = {"access_key": "AWS_ACCESS_KEY_ID", "secret_key": "AWS_SECRET_ACCESS_KEY",
                      "session_token": "AWS_SESSION_TOKEN"}

LOCAL_COPIES_BYTES = 50 * 2**30
"""Local copies of objects kept per cache folder (least recently used ones go first)."""
IN_USE_S = 3600.0
"""A copy used this recently may still be read, so eviction keeps it."""


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """Take credentials out of an object-store URI: (the URI without them, the AWS_* environment
    variables that carry them instead). pyarrow accepts ``s3://KEY:SECRET@bucket/...`` and
    ``?access_key=..&secret_key=..``; a URI is printed, logged and stored as a Prefect parameter, a
    variable of this process is not. Other query parameters (endpoint_override, region, scheme) stay."""
    if "://" not in uri:
        return uri, {}
    parts = urlsplit(uri)
    env: dict[str, str] = {}
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        key, _, secret = userinfo.partition(":")
        env.update({"AWS_ACCESS_KEY_ID": unquote(key), "AWS_SECRET_ACCESS_KEY": unquote(secret)})
    kept = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in _SECRET_PARAMETERS:
            env[_SECRET_PARAMETERS[name]] = value
        else:
            kept.append((name, value))
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(kept), parts.fragment)), env


STORE_VARIABLES = ("AWS_", "GOOGLE_APPLICATION_CREDENTIALS")
"""The environment variables that configure object stores (endpoint, region, credentials)."""


def store_environment(location: str | None = None) -> dict | None:
    """A Ray runtime environment that lets a task reach `location` as this process does: the
    driver's object-store variables go with the task (a cluster's workers were started before the
    user set them); None for a local path, or when this process sets none. Without a location (work
    whose inputs may lie anywhere, as a job table's rows) they go whenever this process sets them."""
    if location is not None and "://" not in location:
        return None
    variables = {name: value for name, value in os.environ.items() if name.startswith(STORE_VARIABLES)}
    return {"env_vars": variables} if variables else None


def portable_filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(file system, path in it) for an object-store `location` that reaches it as this process does from
    any process it is pickled to: an S3 file system resolved here (endpoint, region) carries the
    credentials of this process's AWS_* variables, which a process started elsewhere (Ray Train's
    controller, whose runtime environment the caller cannot set) does not have."""
    filesystem, path = pafs.FileSystem.from_uri(location)
    if isinstance(filesystem, pafs.S3FileSystem):
        reconstruct, (options,) = filesystem.__reduce__()
        for option, variable in _SECRET_PARAMETERS.items():
            if os.environ.get(variable) and not options.get(option):
                options[option] = os.environ[variable]
        filesystem = reconstruct(options)
    return filesystem, path


class LocationNotVisible(RuntimeError):
    """A location the driver could read cannot be seen from this worker (another machine, no shared disk)."""


def require_visible(location: str, relpath: str, option: str) -> None:
    """Raise `LocationNotVisible` unless `relpath` of `location` can be seen from this process.

    For workers: the driver checked the same location before starting them, so a miss here means
    this machine does not see what the driver sees (or a relative path was resolved elsewhere).
    """
    try:
        visible = OutputStore(location).exists(relpath)
    except OSError as error:
        visible, why = False, f" ({error})"
    else:
        why = ""
    if not visible:
        import socket

        raise LocationNotVisible(
            f"{option} {location}: this worker (on {socket.gethostname()}) cannot see {relpath} there{why}, "
            f"although the driver could: a local path must be on a file system that every node mounts at the "
            f"same place; otherwise use object storage (s3://, gs://)")


def redact(uri: str) -> str:
    """The URI without the credentials it holds, marked as redacted (for messages, logs and records)."""
    clean, secrets = split_credentials(uri)
    return clean if not secrets else f"{clean} (credentials redacted)"


def temporary_name(name: str) -> str:
    """The hidden name an atomic write of `name` uses until it commits (beside the final file)."""
    return f".{name}.{uuid.uuid4().hex[:12]}.part"


def is_temporary(name: str) -> bool:
    """Whether a file name is one `temporary_name` makes (the only names clean-up may delete)."""
    return _TEMPORARY.fullmatch(posixpath.basename(name)) is not None


@contextlib.contextmanager
def atomic_local_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on error deleted.

    For writers that need a real file name (ffmpeg, PyAV): the final name appears only complete.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.with_name(temporary_name(final.name))
    try:
        yield temporary
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)


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
            self._temporary = posixpath.join(directory, temporary_name(name))
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
        self.uri = redact(text)
        """The location for people: credentials in the URI never appear here."""
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
        with self.open_input(relpath) as stream:
            return stream.read()

    def open_input(self, relpath: str) -> BinaryIO:
        """A readable binary stream of `relpath` (FileNotFoundError when absent)."""
        return self.filesystem.open_input_stream(self._full(clean_relpath(relpath)))  # type: ignore[return-value]

    def exists(self, relpath: str) -> bool:
        info = self.filesystem.get_file_info(self._full(clean_relpath(relpath)))
        return info.type == pafs.FileType.File

    def is_folder(self, relpath: str = "") -> bool:
        """Whether `relpath` (the store itself when empty) is a folder: on object stores, a prefix with objects."""
        return self.filesystem.get_file_info(self._full(relpath)).type == pafs.FileType.Directory

    def delete(self, relpath: str, *, missing_ok: bool = False) -> None:
        full = self._full(clean_relpath(relpath))
        if missing_ok and self.filesystem.get_file_info(full).type == pafs.FileType.NotFound:
            return
        self.filesystem.delete_file(full)

    def delete_folder(self, relpath: str) -> None:
        """Delete the folder `relpath` with everything in it; nothing when it is absent. On object stores one
        listing and batch deletes, and no empty folder marker left behind (deleting a folder's last object
        one by one leaves one)."""
        full = self._full(clean_relpath(relpath))
        if self.filesystem.get_file_info(full).type != pafs.FileType.NotFound:
            self.filesystem.delete_dir(full)

    def list(self, prefix: str = "", *, include_temporaries: bool = False) -> list[str]:
        """Sorted relative paths of all files under the directory `prefix` (recursive).

        Temporary files of unfinished atomic writes are left out unless asked for.
        """
        return self._list(prefix, recursive=True, files_only=True, include_temporaries=include_temporaries)

    def list_dir(self, prefix: str = "", *, include_temporaries: bool = True) -> list[str]:
        """Sorted relative paths of the files and folders directly inside `prefix` (not recursive)."""
        return self._list(prefix, recursive=False, files_only=False, include_temporaries=include_temporaries)

    def _list(self, prefix: str, *, recursive: bool, files_only: bool, include_temporaries: bool) -> list[str]:
        root = self._full(prefix)
        selector = pafs.FileSelector(root, recursive=recursive, allow_not_found=True)
        base = self.base.strip("/")
        paths = []
        for info in self.filesystem.get_file_info(selector):
            if files_only and info.type != pafs.FileType.File:
                continue
            if not include_temporaries and is_temporary(info.base_name):
                continue
            # Some file systems report paths with a leading '/' even for relative bases.
            path = info.path.strip("/")
            paths.append(posixpath.relpath(path, base) if base else path)
        return sorted(paths)

    def file_sizes(self, prefix: str = "") -> dict[str, int]:
        """Relative path -> size in bytes of every file directly inside `prefix` (not recursive)."""
        selector = pafs.FileSelector(self._full(prefix), recursive=False, allow_not_found=True)
        base = self.base.strip("/")
        return {(posixpath.relpath(info.path.strip("/"), base) if base else info.path.strip("/")): info.size
                for info in self.filesystem.get_file_info(selector) if info.type == pafs.FileType.File}

    def remove_temporaries(self, prefix: str = "") -> list[str]:
        """Delete leftovers of atomic writes that died before committing, directly inside `prefix`.

        Only names `temporary_name` makes are touched, and only in that one folder (never a
        recursive sweep); only safe while no writer of this store runs.
        """
        stale = [path for path in self.file_sizes(prefix) if is_temporary(path)]
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


def local_copy(location: str, cache: str | os.PathLike[str], limit_bytes: int = LOCAL_COPIES_BYTES) -> Path:
    """A local file with the content of `location`: the file itself when local, else a copy of the
    object in `cache` (made once, reused while it lasts; FileNotFoundError when there is no such object)."""
    if location.startswith("file://"):
        return Path(location[len("file://"):])
    if "://" not in location:
        return Path(location)
    folder, name = posixpath.split(location.rstrip("/"))
    target = Path(cache) / hashlib.sha1(location.encode()).hexdigest()[:20] / name
    if target.is_file():
        os.utime(target)  # recently used: evicted last
        return target
    store = OutputStore(folder)
    if not store.exists(name):
        raise FileNotFoundError(f"{redact(location)}: no such object")
    evict_least_recently_used(Path(cache), limit_bytes)
    with atomic_local_path(target) as temporary, store.open_input(name) as stream, open(temporary, "wb") as out:
        shutil.copyfileobj(stream, out, length=8 << 20)
    return target


def evict_least_recently_used(cache: Path, limit_bytes: int, in_use_s: float = IN_USE_S) -> list[Path]:
    """Delete copies in `cache`, least recently used first, until it holds at most `limit_bytes`;
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
