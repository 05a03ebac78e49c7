"""Where everything of a training run lives, and which checkpoint a location given by a user means.

```
RUN_DIR/NAME/checkpoint_<step:08d>/model.pt   a checkpoint (dpe.checkpoint format "dpe-portrait/1")
RUN_DIR/NAME/latest                           local runs: a link to the newest checkpoint folder
RUN_DIR/NAME/run.json                         settings, model, objective, data (written by the driver)
             metrics.csv, tensorboard/        one row / scalar per log interval
             progress.json                    the latest step, pairs/s and ETA
             grids/grid_<step:08d>.png        fixed pairs edited at each evaluation
             evaluations.json, loss_curve.png every evaluation; losses and evaluation over the run
             skipped.json, starts.json        samples skipped; every start of the worker group
             metrics.json                     at the end: steps, pairs/s, last losses, last evaluation, skips
```

(`pipelines/train/outputs.py` says what each file holds.) Training writes this layout; `portrait train
--export`, `portrait edit --checkpoint` and `portrait demo --checkpoint` read checkpoints through the one
`resolve_checkpoint`, so every command accepts the same forms of a checkpoint, local or on an object store.
Light on purpose (standard library and `pipelines.storage` only): reading a run needs no torch or Ray.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import uuid
from typing import Any

from pipelines.options import absolute_location
from pipelines.storage import OutputStore, redact

CHECKPOINT_FILE = "model.pt"
"""The file `portrait train` writes in each checkpoint folder."""
LATEST = "latest"
RUN_RECORD = "run.json"
METRICS_CSV = "metrics.csv"
PROGRESS = "progress.json"
EVALUATIONS = "evaluations.json"
SKIPPED = "skipped.json"
STARTS = "starts.json"
FINAL_METRICS = "metrics.json"
LOSS_CURVE = "loss_curve.png"
TENSORBOARD = "tensorboard"
GRIDS = "grids"

_CHECKPOINT_DIR = re.compile(r"checkpoint_(\d{8})")
_FORMS = (f"give a checkpoint file ({CHECKPOINT_FILE}, or an official dpe.pt), a checkpoint_<step> folder, a run "
          f"folder (<run-dir>/<name>: its newest checkpoint) or <run-dir>/<name>/{LATEST}; local or s3:// / gs://")


class CheckpointNotFound(FileNotFoundError):
    """No checkpoint at a location; the message names the location, what was looked for there, and the forms."""


def checkpoint_dir_name(step: int) -> str:
    """The folder of the checkpoint at `step`; zero-padded so that names sort by step."""
    return f"checkpoint_{step:08d}"


def grid_path(step: int) -> str:
    """The grid image of `step`, relative to the run folder."""
    return f"{GRIDS}/grid_{step:08d}.png"


def read_json(store: OutputStore, relpath: str, default: Any) -> Any:
    """A JSON file of the run, or `default` when it is absent (a run that has not written it yet)."""
    try:
        return json.loads(store.read_bytes(relpath))
    except FileNotFoundError:
        return default


def checkpoint_steps(run_dir: str, name: str) -> dict[int, str]:
    """Step -> relative path of `model.pt` for every complete checkpoint of a run (a folder whose
    upload never finished holds no `model.pt` and is left out)."""
    return _complete_checkpoints(OutputStore(run_dir), name)


def latest_checkpoint(run_dir: str, name: str) -> tuple[int, str] | None:
    """(step, relative path of model.pt) of the newest complete checkpoint of a run, or None."""
    return _newest(checkpoint_steps(run_dir, name))


def point_latest(run_dir: str, name: str, dir_name: str) -> None:
    """Make `<run>/latest` a link to the newest checkpoint folder (local runs; replaced atomically).

    Object stores have no links; there `resolve_checkpoint` finds the newest checkpoint by listing.
    """
    store = OutputStore(run_dir)
    if not store.is_local:
        return
    run = store.local_path(name)
    temporary = run / f".{LATEST}.{uuid.uuid4().hex[:12]}.part"
    temporary.symlink_to(dir_name, target_is_directory=True)
    os.replace(temporary, run / LATEST)


def resolve_checkpoint(location: str) -> str:
    """The checkpoint file a user means by `location`, local or on an object store: a file itself
    (`model.pt`, an official `dpe.pt`, any name), a checkpoint folder (its `model.pt`), a run folder
    or `<run>/latest` (the run's newest complete checkpoint).

    Raises `CheckpointNotFound` naming the location and what was looked for there.
    """
    if not location:
        raise CheckpointNotFound(f"no checkpoint given: {_FORMS}")
    text = absolute_location(location).rstrip("/") or "/"
    parent, last = posixpath.split(text)
    if last == LATEST:  # on object stores there is no link: the newest checkpoint of the run
        newest = _newest(_complete_checkpoints(OutputStore(parent), ""))
        if newest is not None:
            return posixpath.join(parent, newest[1])
    if last and OutputStore(parent).exists(last):
        return text
    store = OutputStore(text)
    if not store.is_folder():
        raise CheckpointNotFound(f"no checkpoint at {redact(location)}: no such file or folder; {_FORMS}")
    if store.exists(CHECKPOINT_FILE):
        return posixpath.join(text, CHECKPOINT_FILE)
    newest = _newest(_complete_checkpoints(store, ""))
    if newest is not None:
        return posixpath.join(text, newest[1])
    raise CheckpointNotFound(f"no checkpoint at {redact(location)}: the folder holds no {CHECKPOINT_FILE} and no "
                             f"complete checkpoint_<step>/{CHECKPOINT_FILE}; {_FORMS}")


def _complete_checkpoints(store: OutputStore, run: str) -> dict[int, str]:
    steps = {}
    for entry in store.list_dir(run):
        match = _CHECKPOINT_DIR.fullmatch(posixpath.basename(entry))
        model = posixpath.join(entry, CHECKPOINT_FILE)
        if match and store.exists(model):
            steps[int(match.group(1))] = model
    return steps


def _newest(steps: dict[int, str]) -> tuple[int, str] | None:
    if not steps:
        return None
    step = max(steps)
    return step, steps[step]
