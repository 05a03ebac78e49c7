"""`portrait inspect`: what a prepared dataset holds, whether it is whole, and a contact sheet."""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.commands import add_command

NAME = "inspect"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(
        sub, NAME, "summarise a prepared dataset or an editing output",
        "A `prepare` output: counts by status and failure class, every failure with its message, shards the "
        "manifest names but that are missing (exit status 1), and a PNG contact sheet (frames of each clip "
        "with its landmarks). An `edit` output (a folder with results.parquet): counts by status and failure "
        "class and every failed job. Nothing is changed or deleted.")
    p.add_argument("output", metavar="PATH_OR_URI")
    p.add_argument("--sheet", type=Path, default=None, help="where to write the PNG (default: OUTPUT/contact_sheet.png)")
    return p


def run(args: argparse.Namespace) -> int:
    from pipelines.dataset.inspect import inspect_output
    from pipelines.edit.results import RESULTS_PATH, inspect_results
    from pipelines.storage import OutputStore, absolute_location

    output = absolute_location(args.output)
    if OutputStore(output).exists(RESULTS_PATH):
        return inspect_results(output)
    return inspect_output(output, args.sheet)
