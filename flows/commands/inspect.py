"""`portrait inspect`: what a prepared dataset holds, whether it is whole, and a contact sheet."""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.commands import add_command

NAME = "inspect"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(
        sub, NAME, "summarise a prepared dataset, check its shards, and draw a contact sheet",
        "Read the manifest and shards of a `prepare` output: counts by status and failure class, every "
        "failure with its message, shards the manifest names but that are missing (exit status 1), and a "
        "PNG contact sheet (frames of each clip with its landmarks). Nothing is changed or deleted.")
    p.add_argument("output", metavar="PATH_OR_URI")
    p.add_argument("--sheet", type=Path, default=None, help="where to write the PNG (default: OUTPUT/contact_sheet.png)")
    return p


def run(args: argparse.Namespace) -> int:
    from pipelines.dataset.inspect import inspect_output

    return inspect_output(args.output, args.sheet)
