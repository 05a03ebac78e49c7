"""`portrait train`: distributed DPE training on prepared shards (Ray Train), and export of its checkpoints."""

from __future__ import annotations

import argparse
import sys

from flows.commands import STOPPED
from pipelines.train.settings import TrainSettings

NAME = "train"
OPTIONS = (TrainSettings,)


SUMMARY = "train DPE on prepared shards with Ray Train (resumable, fault tolerant)"
DESCRIPTION = (
    "Train the DPE model on a dataset written by `portrait prepare` (local folder or s3:// / gs://). "
    "Training pairs are drawn as in the official trainer: identity -> clip -> two frames. Each worker "
    "draws its own pairs and runs the same steps; gradients are averaged across workers.\n\n"
    "The run lives in RUN_DIR/NAME: checkpoints (checkpoint_<step>/model.pt, the newest also as "
    "'latest' on local disks), metrics.csv, TensorBoard events, grids of transfers on fixed held-out "
    "pairs, evaluations, loss_curve.png and metrics.json. Running the same command again resumes from "
    "the newest checkpoint (give a larger --steps to train further); a dead worker restarts the group "
    "from it (--max-failures times). On a multi-node cluster a local RUN_DIR must be one every node "
    "sees (else it is refused): give s3:// or gs://.\n\n"
    "A step with a non-finite loss or gradient is skipped (logged; --max-skipped-steps in a row stop "
    "the run); gradient norms are logged (--grad-clip clips them); --ema-decay keeps an averaged "
    "generator for evaluation and export; checkpoints are uploaded in the background. The first SIGTERM "
    "or Ctrl-C checkpoints the step the workers are at (at their next log step) and exits with status 130; "
    "the same command resumes; a second one stops at once.\n\n"
    "  portrait train --data out/sample --run-dir runs --name demo --steps 200 --size 64 --workers 2\n"
    "  portrait train --export runs/demo/latest dpe.pt      # the generator in the official format")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Not a training option (and so not a flow parameter): another action of the same command.
    parser.add_argument("--export", nargs=2, default=None, metavar=("CHECKPOINT", "OUTPUT"),
                        help="instead of training: write a checkpoint's generator as an official-format "
                             "{'gen': ...} file (CHECKPOINT: model.pt, a checkpoint folder, a run folder or "
                             "RUN/latest)")


def run(args: argparse.Namespace) -> int:
    if args.export:
        return _export(*args.export)
    from flows.services import hand_over, run_with_services
    from pipelines.options import build, values_of
    from pipelines.runtime import LocationNotShared
    from pipelines.storage import LocationNotVisible
    from pipelines.train.clips import TrainingDataError
    from pipelines.train.job import prepare_run
    from pipelines.train.loop import NonFiniteTraining

    try:
        settings = build(TrainSettings, vars(args))
        hand_over(settings, prepare_run(settings))  # checked before services start; the flow reuses it
    except (ValueError, FileNotFoundError) as error:
        print(f"portrait train: {error}", file=sys.stderr)
        return 2
    try:
        summary = run_with_services(NAME, settings.ray_address, lambda: _flow()(**values_of(settings)))
    except (TrainingDataError, LocationNotVisible, LocationNotShared, NonFiniteTraining) as error:  # not a crash
        print(f"portrait train: {error}", file=sys.stderr)
        return 1
    if summary.get("stopped"):
        print(f"portrait train: stopped at step {summary['step']} of {summary['steps']}; newest checkpoint "
              f"{summary.get('checkpoint')}: run the same command again to resume from it", file=sys.stderr)
        return STOPPED
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
