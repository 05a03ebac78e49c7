"""Local files for editing: inputs that live in an object store (video decoding seeks, so it needs a
real file), and outputs written locally and then stored.

An input is copied once per machine (`storage.local_copy`, into the run's scratch folder, a cache
bounded by `storage.LOCAL_COPIES_BYTES`) and shared by every stage and chunk that runs there; local
paths are used as they are.
"""

from __future__ import annotations

import contextlib
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from pipelines.errors import MISSING_VIDEO, VideoError
from pipelines.storage import OutputStore, atomic_local_path, local_copy


def scratch_dir(workdir: str | None) -> Path:
    """The machine-local scratch folder of editing runs."""
    return Path(workdir).expanduser() if workdir else Path(tempfile.gettempdir()) / "dpe-portrait-edit"


def local_input(path: str, workdir: str | None) -> Path:
    """A local file with the content of input `path` (a local path, or an s3:// / gs:// URI copied once)."""
    try:
        return local_copy(path, scratch_dir(workdir) / "inputs")
    except FileNotFoundError as error:
        raise VideoError(MISSING_VIDEO, str(error)) from None


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
