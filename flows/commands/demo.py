"""`portrait demo`: the whole system on the bundled sample, ending in an HTML report."""

from __future__ import annotations

import argparse

from flows.commands import add_command, positive_int

NAME = "demo"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(
        sub, NAME, "prepare the sample, train a small model, edit sample videos, write an HTML report",
        "Runs the three jobs on the bundled sample, offline, on the embedded defaults (a local Ray, an embedded "
        "Prefect server, the local disk): prepares shards from a real talking-face clip served over loopback as "
        "VoxCeleb-style metadata, trains a small model for a few minutes with Ray Train, edits sample videos "
        "(with sound) through the Ray Data editing job, and writes OUTPUT/report/index.html: the dataset summary "
        "and failures, the contact sheet, loss curves, training grids, evaluation metrics, and every edited video "
        "beside its source and driver. A model trained for minutes shows the pipeline, not DPE's quality: give "
        "--checkpoint dpe.pt to skip training and edit with the official weights. A rerun reuses what is done.")
    p.add_argument("--output", default="out/demo", metavar="DIR", help="folder for the dataset, run, edits and report")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="edit with these weights (official dpe.pt, or a `portrait train` checkpoint) instead of "
                        "training a small model first")
    p.add_argument("--steps", type=positive_int, default=150, help="training steps of the small model")
    p.add_argument("--size", type=positive_int, default=64, help="crop size of the small model (32..256)")
    p.add_argument("--workers", type=positive_int, default=2, help="Ray Train workers")
    p.add_argument("--batch", type=positive_int, default=4, help="training pairs per step (all workers)")
    p.add_argument("--jobs", type=positive_int, default=None, help="edit only the first N demo videos (of 3)")
    return p


def run(args: argparse.Namespace) -> int:
    from flows.services import run_with_services

    def demo() -> dict:
        from flows.demo_flow import portrait_demo

        return portrait_demo(output=args.output, checkpoint=args.checkpoint, steps=args.steps, size=args.size,
                             workers=args.workers, batch=args.batch, jobs=args.jobs)

    result = run_with_services(NAME, None, demo)
    print(f"open the report: {result['report']}")
    return 0
