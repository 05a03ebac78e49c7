"""Where a run's checkpoints live, how they are written all-or-nothing, found again, and exported.

Layout (Ray Train's experiment folder is the run folder, `RunConfig(name, storage_path=run_dir)`):

```
<run_dir>/<name>/checkpoint_<step:08d>/model.pt   dpe.checkpoint format "dpe-portrait/1"
<run_dir>/<name>/latest                           local runs: a link to the newest checkpoint folder
```

`model.pt` holds the generator, the discriminator and the probes, their three optimisers, the
step, the model's `ModelConfig` and, in `extra`, the training configuration, the run's settings,
the sampler state and the data location; `dpe.checkpoint.load_checkpoint` plus
`config_from_checkpoint` rebuild the model at its own size from it alone.

Ray Train copies checkpoints with a plain file copy, so a worker killed mid-copy would leave a
partial `model.pt`; `upload_checkpoint` (its `checkpoint_upload_fn`) writes through
`OutputStore.open_output_atomic` instead: the file appears complete (local rename, or one
object-store upload) or not at all, and a checkpoint folder without `model.pt` is never used.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

from pipelines.storage import OutputStore

CHECKPOINT_FILE = "model.pt"
LATEST = "latest"
_CHECKPOINT_DIR = re.compile(r"checkpoint_(\d{8})")


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def checkpoint_steps(run_dir: str, name: str) -> dict[int, str]:
    """Step -> relative path of `model.pt` for every complete checkpoint of a run."""
    store = OutputStore(run_dir)
    steps = {}
    for entry in store.list_dir(name):
        match = _CHECKPOINT_DIR.fullmatch(posixpath.basename(entry))
        model = posixpath.join(entry, CHECKPOINT_FILE)
        if match and store.exists(model):
            steps[int(match.group(1))] = model
    return steps


def latest_checkpoint(run_dir: str, name: str) -> tuple[int, str] | None:
    """(step, relative path of model.pt) of the newest complete checkpoint of a run, or None."""
    steps = checkpoint_steps(run_dir, name)
    if not steps:
        return None
    step = max(steps)
    return step, steps[step]


def upload_checkpoint(run_dir: str, name: str) -> Callable[[Any, str], Any]:
    """A Ray Train `checkpoint_upload_fn` that writes `model.pt` into the run atomically."""
    from ray.train import Checkpoint

    store = OutputStore(run_dir)

    def upload(checkpoint: Checkpoint, dir_name: str) -> Checkpoint:
        relpath = posixpath.join(name, dir_name, CHECKPOINT_FILE)
        with open(os.path.join(checkpoint.path, CHECKPOINT_FILE), "rb") as source, \
                store.open_output_atomic(relpath) as target:
            shutil.copyfileobj(source, target.file, length=8 << 20)
        return Checkpoint(filesystem=store.filesystem, path=posixpath.join(store.base, name, dir_name))

    return upload


def point_latest(run_dir: str, name: str, dir_name: str) -> None:
    """Make `<run>/latest` a link to the newest checkpoint folder (local runs; replaced atomically)."""
    store = OutputStore(run_dir)
    if not store.is_local:
        return
    run = store.local_path(name)
    temporary = run / f".{LATEST}.{uuid.uuid4().hex[:12]}.part"
    temporary.symlink_to(dir_name, target_is_directory=True)
    os.replace(temporary, run / LATEST)


def resolve_checkpoint(path: str) -> str:
    """The `model.pt` a user means by `path`: the file itself, a checkpoint folder, a run folder or
    `<run>/latest` (the newest checkpoint). FileNotFoundError naming what was looked for."""
    text = path.rstrip("/")
    if text.endswith(CHECKPOINT_FILE):
        candidates = [text]
    else:
        parent, last = posixpath.split(text)
        run = parent if last == LATEST else text
        run_parent, run_name = posixpath.split(run)
        newest = latest_checkpoint(run_parent or ".", run_name) if run_name else None
        candidates = [posixpath.join(text, CHECKPOINT_FILE)]
        if newest is not None:
            candidates.insert(0, posixpath.join(run_parent or ".", newest[1]))
    for candidate in candidates:
        folder, file = posixpath.split(candidate)
        if OutputStore(folder or ".").exists(file):
            return candidate
    raise FileNotFoundError(f"no checkpoint at {path}: give a model.pt, a checkpoint_<step> folder, a run folder "
                            f"(<run-dir>/<name>) or <run-dir>/<name>/latest")


def local_copy(path: str, scratch: str | os.PathLike) -> Path:
    """A local file for `path` (itself when local; downloaded into `scratch` from an object store)."""
    folder, file = posixpath.split(path)
    store = OutputStore(folder or ".")
    if store.is_local:
        return store.local_path(file)
    target = Path(scratch) / file
    with store.open_input(file) as source, open(target, "wb") as output:
        shutil.copyfileobj(source, output, length=8 << 20)
    return target


def export_official(checkpoint: str, output: str) -> tuple[str, int]:
    """Write the generator of a run's checkpoint as an official-format `{'gen': ...}` file.

    Returns (the model.pt used, its step). The official code and `load_official_generator` read it.
    """
    from dpe.checkpoint import config_from_checkpoint, export_official_generator, load_checkpoint
    from dpe.model import DPEGenerator

    source = resolve_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory(prefix="export-") as scratch:
        local = local_copy(source, scratch)
        payload = load_checkpoint(local)
        config = config_from_checkpoint(payload)
        if config is None:
            raise ValueError(f"{source} records no model configuration; it was not written by `portrait train`")
        generator = DPEGenerator(config)
        load_checkpoint(local, models={"generator": generator})
    export_official_generator(generator, output)
    return source, int(payload["step"])
