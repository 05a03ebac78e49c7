"""How a run's checkpoints are written all-or-nothing, and exported in the official format.

Where they live and how a location is resolved to one is `pipelines/runs.py`. `model.pt` holds the
generator, the discriminator and the probes, their three optimisers, the step, the model's
`ModelConfig` and, in `extra`, the training configuration, the run's settings, the sampler state and
the data location; `dpe.checkpoint.load_checkpoint` plus `config_from_checkpoint` rebuild the model
at its own size from it alone.

Ray Train copies checkpoints with a plain file copy, so a worker killed mid-copy would leave a
partial `model.pt`; `upload_checkpoint` (its `checkpoint_upload_fn`) writes through
`OutputStore.open_output_atomic` instead: the file appears complete (local rename, or one
object-store upload) or not at all, and a checkpoint folder without `model.pt` is never used.
Rank 0 stages the file once (no fsync) and Ray Train runs the upload asynchronously
(`CheckpointUploadMode.ASYNC`): the ranks train on while it is copied, and the checkpoint is
registered (and used for restarts) only once the upload has finished.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from typing import Any, Callable

from pipelines.runs import CHECKPOINT_FILE, point_latest, resolve_checkpoint
from pipelines.storage import OutputStore, local_copy


def upload_checkpoint(run_dir: str, name: str, registered_filesystem: Any = None) -> Callable[[Any, str], Any]:
    """A Ray Train `checkpoint_upload_fn` that writes `model.pt` into the run atomically, then points
    `latest` at it (it runs in the background on rank 0: nothing waits for it but the next upload).
    `registered_filesystem`: Ray Train's own storage file system, which the returned checkpoint must name
    to count as inside the run (default: the run folder's)."""
    from ray.train import Checkpoint

    store = OutputStore(run_dir)
    registered_filesystem = registered_filesystem or store.filesystem

    def upload(checkpoint: Checkpoint, dir_name: str) -> Checkpoint:
        relpath = posixpath.join(name, dir_name, CHECKPOINT_FILE)
        with open(os.path.join(checkpoint.path, CHECKPOINT_FILE), "rb") as source, \
                store.open_output_atomic(relpath) as target:
            shutil.copyfileobj(source, target.file, length=8 << 20)
        point_latest(run_dir, name, dir_name)
        return Checkpoint(filesystem=registered_filesystem, path=posixpath.join(store.base, name, dir_name))

    return upload


def export_official(checkpoint: str, output: str) -> tuple[str, int]:
    """Write the generator of a run's checkpoint as an official-format `{'gen': ...}` file (its
    moving average when the run kept one, `--ema-decay`).

    `checkpoint` takes every form `runs.resolve_checkpoint` does. Returns (the checkpoint file used,
    its step). The official code and `load_official_generator` read the output.
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
        averaged = "generator_ema" in payload.get("models", {})  # --ema-decay: the average is the model
        load_checkpoint(local, models={"generator_ema" if averaged else "generator": generator})
    export_official_generator(generator, output)
    return source, int(payload["step"])
