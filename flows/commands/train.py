"""`portrait train`: distributed DPE training on prepared shards (Ray Train), and export of its checkpoints."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from flows.commands import add_command, non_negative_float, non_negative_int, positive_float, positive_int
from pipelines.train.settings import MODEL_WIDTHS, OBJECTIVES, PERCEPTUAL_MODES, TrainSettings

NAME = "train"
_DEFAULTS = TrainSettings()


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = _DEFAULTS
    p = add_command(
        sub, NAME, "train DPE on prepared shards with Ray Train (resumable, fault tolerant)",
        "Train the DPE model on a dataset written by `portrait prepare` (local folder or s3:// / gs://). "
        "Training pairs are drawn as in the official trainer: identity -> clip -> two frames. Each worker "
        "draws its own pairs and runs the same steps; gradients are averaged across workers.\n\n"
        "The run lives in RUN_DIR/NAME: checkpoints (checkpoint_<step>/model.pt, the newest also as "
        "'latest' on local disks), metrics.csv, TensorBoard events, grids of transfers on fixed held-out "
        "pairs, evaluations, loss_curve.png and metrics.json. Running the same command again resumes from "
        "the newest checkpoint (give a larger --steps to train further); a dead worker restarts the group "
        "from it (--max-failures times).\n\n"
        "  portrait train --data out/sample --run-dir runs --name demo --steps 200 --size 64 --workers 2\n"
        "  portrait train --export runs/demo/latest dpe.pt      # the generator in the official format")
    data = p.add_argument_group("data and run")
    data.add_argument("--data", default=d.data, metavar="PATH_OR_URI", help="dataset folder of `portrait prepare`")
    data.add_argument("--run-dir", default=d.run_dir, metavar="PATH_OR_URI",
                      help="folder (or s3:// / gs:// URI) that holds runs")
    data.add_argument("--name", default=d.name, help="run name; the same name and --run-dir resume the run")
    data.add_argument("--train-split", default=d.train_split, help="split to train on")
    data.add_argument("--eval-split", default=d.eval_split,
                      help="split of the held-out pairs (training clips when the dataset has none)")
    data.add_argument("--frame-window", type=positive_int, default=d.frame_window, metavar="N",
                      help="draw pair frames from the first N frames of a clip (default: the whole clip; "
                           "500 with --objective official)")
    data.add_argument("--clip-cache-mb", type=positive_int, default=d.clip_cache_mb,
                      help="decoded clips kept per worker")
    model = p.add_argument_group("model and objective")
    model.add_argument("--steps", type=positive_int, default=d.steps, help="total optimiser steps of the run")
    model.add_argument("--size", type=positive_int, default=d.size, help="model resolution (power of two)")
    model.add_argument("--model-width", choices=MODEL_WIDTHS, default=d.model_width,
                       help="channel widths: official, or small for CPU demos; auto = official at 256 px and above")
    model.add_argument("--batch", type=positive_int, default=d.batch,
                       help="pairs per step over all workers (the official trainer: 64); a multiple of --workers")
    model.add_argument("--micro-batches", type=positive_int, default=d.micro_batches,
                       help="gradient accumulation: chunks of each worker's share of the batch")
    model.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPUs)")
    model.add_argument("--objective", choices=OBJECTIVES, default=d.objective,
                       help="ours (with the landmark constraint) or official (the official trainer exactly)")
    model.add_argument("--init", default=d.init, metavar="FILE",
                       help="start a new run from an official dpe.pt or LIA's vox.pt (detected from its keys)")
    model.add_argument("--perceptual", choices=PERCEPTUAL_MODES, default=d.perceptual,
                       help="VGG19 perceptual term: auto uses it when the weights file is present (logged)")
    model.add_argument("--vgg-weights", default=d.vgg_weights, metavar="FILE",
                       help="vgg19-dcbb9e9d.pth (default: $TORCH_HOME/hub/checkpoints)")
    model.add_argument("--seed", type=int, default=d.seed, help="seed of the weights and of every pair drawn")
    cluster = p.add_argument_group("workers")
    cluster.add_argument("--workers", type=positive_int, default=d.workers, help="Ray Train workers")
    cluster.add_argument("--cpus-per-worker", type=positive_float, default=d.cpus_per_worker)
    cluster.add_argument("--gpus-per-worker", type=non_negative_float, default=d.gpus_per_worker)
    cluster.add_argument("--max-failures", type=non_negative_int, default=d.max_failures,
                         help="worker-group restarts from the newest checkpoint before giving up")
    cluster.add_argument("--ray-address", default=d.ray_address, metavar="ADDR",
                         help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    every = p.add_argument_group("outputs")
    every.add_argument("--checkpoint-every", type=positive_int, default=d.checkpoint_every, metavar="N")
    every.add_argument("--keep-checkpoints", type=positive_int, default=d.keep_checkpoints, metavar="K")
    every.add_argument("--log-every", type=positive_int, default=d.log_every, metavar="N",
                       help="steps per CSV / TensorBoard row and progress update")
    every.add_argument("--grid-every", type=positive_int, default=d.grid_every, metavar="N")
    every.add_argument("--eval-every", type=positive_int, default=d.eval_every, metavar="N")
    every.add_argument("--eval-pairs", type=positive_int, default=d.eval_pairs, metavar="N",
                       help="fixed held-out pairs of the grids and evaluations")
    p.add_argument("--export", nargs=2, default=None, metavar=("CHECKPOINT", "OUTPUT"),
                   help="instead of training: write a checkpoint's generator as an official-format {'gen': ...} "
                        "file (CHECKPOINT: model.pt, a checkpoint folder, a run folder or RUN/latest)")
    return p


def flow_options(args: argparse.Namespace) -> dict:
    """The `train_model` flow's parameters from parsed options (the same names as `TrainSettings`)."""
    return {field.name: getattr(args, field.name) for field in fields(TrainSettings)}


def run(args: argparse.Namespace) -> int:
    if args.export:
        return _export(*args.export)
    from flows.services import run_with_services
    from pipelines.train.job import prepare_run

    options = flow_options(args)
    try:
        prepare_run(TrainSettings(**options))
    except (ValueError, FileNotFoundError) as error:
        print(f"portrait train: {error}", file=sys.stderr)
        return 2
    from pipelines.storage import LocationNotVisible
    from pipelines.train.clips import TrainingDataError

    try:
        summary = run_with_services(NAME, args.ray_address, lambda: _flow()(**options))
    except (TrainingDataError, LocationNotVisible) as error:  # found by a worker: the data, not a crash
        print(f"portrait train: {error}", file=sys.stderr)
        return 1
    return 0 if summary["step"] >= summary["steps"] else 1


def _flow():
    from flows.train_flow import train_model

    return train_model


def _export(checkpoint: str, output: str) -> int:
    from pipelines.train.checkpoints import export_official

    try:
        source, step = export_official(checkpoint, output)
    except (ValueError, FileNotFoundError) as error:
        print(f"portrait train --export: {error}", file=sys.stderr)
        return 2
    print(f"exported the generator of {source} (step {step}) to {output} in the official format ({{'gen': ...}})")
    return 0
