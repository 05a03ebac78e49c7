"""The files of a run that a person reads, written by rank 0 only, each one atomically (their names
are `pipelines/runs.py`'s).

```
<run_dir>/<name>/run.json            settings, model, objective, data (written by the driver)
                 metrics.csv         one row per log interval: step, pairs/s (training steps alone, and over
                                     the wall clock), data share of step time, learning rates, every loss term,
                                     gradient norms, steps skipped as non-finite
                 tensorboard/        the same scalars, evaluations and grids as TensorBoard event files
                 progress.json       the latest step, pairs/s and ETA (the driver's progress bar reads it)
                 grids/grid_<step>.png   source, driving, expression / pose / both transfers on fixed pairs
                 evaluations.json    every evaluation: step and metrics
                 loss_curve.png      losses and evaluation over the run (updated at each checkpoint)
                 skipped.json        samples skipped: key -> failure class and message, counts by class
                 starts.json         every start of the worker group (first start, restarts, resumes)
                 metrics.json        at the end: steps, pairs/s, last losses, last evaluation, skips
                 stop-requested      while a stop is asked (written by the driver on SIGTERM/SIGINT; rank 0
                                     looks for it at each log step; removed when the run is launched again)
```

A resumed run (after a worker failure or a rerun) starts from its last checkpoint: rows and
evaluations logged after that checkpoint are dropped before training goes on, so every step
appears once; TensorBoard hides them with `purge_step`.

I/O stays flat as the run grows: on a local disk `metrics.csv` is appended to, one row per log
(rewritten only at a start, and when a row brings a new column); on an object store, which cannot
append, `metrics.csv` and the TensorBoard event files (written to a local folder) are uploaded at
each checkpoint and at the end, event files only when they changed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipelines.runs import (
    EVALUATIONS,
    FINAL_METRICS,
    LOSS_CURVE,
    METRICS_CSV,
    PROGRESS,
    SKIPPED,
    STARTS,
    TENSORBOARD,
    grid_path,
    read_json,
)
from pipelines.storage import OutputStore

LOG = logging.getLogger(__name__)

STOP_REQUEST = "stop-requested"
"""The file in the run folder by which the driver asks the workers to checkpoint and stop."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunOutputs:
    """Rank 0's writer of the run's files (see the module docstring)."""

    def __init__(self, run_dir: str, name: str, steps: int, start_step: int, world_size: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.store = OutputStore(run_dir)
        self.name = name
        self.steps = steps
        self.start_step = start_step
        self.rows = [row for row in self._read_rows() if int(row["step"]) <= start_step]
        self._columns: list[str] = []
        self._uploaded: dict[str, int] = {}  # event file -> size uploaded
        self.evaluations = [e for e in self.read(EVALUATIONS, []) if e["step"] <= start_step]
        self.skipped: dict[str, dict[str, str]] = self.read(SKIPPED, {}).get("samples", {})
        self._write_json(STARTS, [*self.read(STARTS, []),
                                  {"step": start_step, "world_size": world_size, "at": _now()}])
        if self.store.is_local:
            self._tensorboard_dir = self.store.local_path(f"{name}/{TENSORBOARD}")
            self._staging = None
        else:
            self._staging = tempfile.TemporaryDirectory(prefix="tensorboard-")
            self._tensorboard_dir = Path(self._staging.name)
        self.writer = SummaryWriter(str(self._tensorboard_dir), purge_step=start_step or None)
        self._started = time.monotonic()
        self._write_rows()

    # ------------------------------------------------------------------ files of the run
    def _path(self, relpath: str) -> str:
        return f"{self.name}/{relpath}"

    def read(self, relpath: str, default: Any) -> Any:
        return read_json(self.store, self._path(relpath), default)

    def _write_json(self, relpath: str, content: Any) -> None:
        self.store.write_bytes_atomic(self._path(relpath), json.dumps(content, indent=1, sort_keys=True).encode())

    def _read_rows(self) -> list[dict[str, str]]:
        try:
            text = self.store.read_bytes(self._path(METRICS_CSV)).decode()
        except FileNotFoundError:
            return []
        return list(csv.DictReader(io.StringIO(text)))

    # ------------------------------------------------------------------ what the loop reports
    def log(self, step: int, values: dict[str, float], eta_s: float | None) -> None:
        """One log interval: a CSV row, TensorBoard scalars, the progress file."""
        row = {"step": step, **{name: round(value, 6) for name, value in values.items()}}
        self.rows.append(row)
        if self.store.is_local:
            if set(row) <= set(self._columns):
                with open(self.store.local_path(self._path(METRICS_CSV)), "a", newline="") as handle:
                    csv.DictWriter(handle, fieldnames=self._columns, restval="").writerow(row)
            else:
                self._write_rows()
            self.writer.flush()
        for name, value in values.items():
            self.writer.add_scalar(_scalar_tag(name), value, step)
        self._write_json(PROGRESS, {"step": step, "steps": self.steps, "eta_s": eta_s, "values": values,
                                    "elapsed_s": round(time.monotonic() - self._started, 1), "updated_at": _now()})

    def _write_rows(self) -> None:
        """`metrics.csv` whole (atomically), with every column seen so far."""
        self._columns = ["step", *sorted({name for r in self.rows for name in r if name != "step"})]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self._columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        self.store.write_bytes_atomic(self._path(METRICS_CSV), buffer.getvalue().encode())

    def stop_requested(self) -> bool:
        """Whether the driver asked the run to stop (one existence check: a HEAD request on object stores)."""
        return self.store.exists(self._path(STOP_REQUEST))

    def skip(self, samples: dict[str, tuple[str, str]]) -> None:
        """Record skipped samples (key -> (failure class, message)); each is logged once."""
        new = {key: value for key, value in samples.items() if key not in self.skipped}
        if not new:
            return
        for key, (failure_class, message) in new.items():
            LOG.warning("skipped sample %s (%s): %s", key, failure_class, message)
            self.skipped[key] = {"failure_class": failure_class, "message": message}
        self._write_json(SKIPPED, {"counts": self.skip_counts(), "samples": self.skipped})

    def skip_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.skipped.values():
            counts[record["failure_class"]] = counts.get(record["failure_class"], 0) + 1
        return dict(sorted(counts.items()))

    def grid(self, step: int, png: bytes) -> str:
        relpath = grid_path(step)
        self.store.write_bytes_atomic(self._path(relpath), png)
        import cv2
        import numpy as np

        image = cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        self.writer.add_image("grid", image, step, dataformats="HWC")
        return relpath

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        self.evaluations = [e for e in self.evaluations if e["step"] != step] + [{"step": step, **metrics}]
        self._write_json(EVALUATIONS, self.evaluations)
        for name, value in metrics.items():
            self.writer.add_scalar(f"eval/{name}", value, step)
        LOG.info("evaluation at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))

    def checkpointed(self) -> None:
        """After a checkpoint: bring the loss curve up to date (an interrupted run still has one); on an
        object store, upload the metrics and the TensorBoard events."""
        self.store.write_bytes_atomic(self._path(LOSS_CURVE), loss_curve_png(self.rows, self.evaluations))
        self._sync_tensorboard()

    def finish(self, step: int) -> dict[str, Any]:
        """The final metrics file and loss curve; returns the final metrics."""
        last = self.rows[-1] if self.rows else {}
        final = {"step": step, "steps": self.steps,
                 "pairs_per_s": _float(last.get("pairs_per_s")),
                 "losses": {k: _float(v) for k, v in last.items() if k.startswith(("l1_", "vgg_", "g_", "d_", "r1",
                                                                                    "readout", "leakage"))},
                 "last_evaluation": self.evaluations[-1] if self.evaluations else None,
                 "skipped": self.skip_counts(), "finished_at": _now()}
        self._write_json(FINAL_METRICS, final)
        self.store.write_bytes_atomic(self._path(LOSS_CURVE), loss_curve_png(self.rows, self.evaluations))
        self.writer.close()
        self._sync_tensorboard()
        return final

    def _sync_tensorboard(self) -> None:
        self.writer.flush()
        if self._staging is None:
            return
        self._write_rows()
        for file in Path(self._tensorboard_dir).iterdir():
            size = file.stat().st_size
            if self._uploaded.get(file.name) != size:
                self.store.write_bytes_atomic(self._path(f"{TENSORBOARD}/{file.name}"), file.read_bytes())
                self._uploaded[file.name] = size


def _scalar_tag(name: str) -> str:
    if name.startswith("lr_"):
        return f"lr/{name[3:]}"
    if name in ("pairs_per_s", "pairs_per_s_wall", "data_fraction"):
        return f"throughput/{name}"
    if name.endswith("_grad_norm") or name == "skipped_steps":
        return f"health/{name}"
    return f"loss/{name}"


def _float(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


def loss_curve_png(rows: list[dict[str, Any]], evaluations: list[dict[str, Any]]) -> bytes:
    """Losses over steps (generator terms, GAN terms) and the evaluation metrics, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, gan, evaluation) = plt.subplots(1, 3, figsize=(15, 4))
    steps = [int(row["step"]) for row in rows]
    for name in ("g_total", "l1_self_expression", "l1_self_pose", "l1_cycle_a", "l1_cycle_b", "l1_middle"):
        _plot(losses, steps, rows, name)
    losses.set_yscale("log")
    losses.set_title("generator losses")
    for name in ("g_gan", "d_gan", "readout", "leakage"):
        _plot(gan, steps, rows, name)
    gan.set_title("adversarial and asymmetry terms")
    for name in ("train_self_l1", "l1"):
        points = [(e["step"], e[name]) for e in evaluations if name in e]
        if points:
            evaluation.plot(*zip(*points), marker="o", label={"train_self_l1": "self-reconstruction L1 (train)",
                                                              "l1": "both-transfer L1 (held out)"}[name])
    evaluation.set_title("evaluation")
    for axis in (losses, gan, evaluation):
        axis.set_xlabel("step")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()


def _plot(axis, steps: list[int], rows: list[dict[str, Any]], name: str) -> None:
    points = [(step, float(row[name])) for step, row in zip(steps, rows) if row.get(name) not in (None, "")]
    if points:
        axis.plot(*zip(*points), label=name)
