"""`portrait inspect`: what a prepared dataset holds, whether it is whole, and a contact sheet."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pipelines.options import build, check, option

NAME = "inspect"


@dataclass(frozen=True)
class InspectOptions:
    output: str = option("", "a `portrait prepare` or `portrait edit` output folder or URI", positional=True,
                         metavar="PATH_OR_URI", path=True)
    sheet: str | None = option(None, "where to write the PNG (default: OUTPUT/contact_sheet.png)", path=True)

    def __post_init__(self) -> None:
        check(self)


OPTIONS = (InspectOptions,)


SUMMARY = "summarise a prepared dataset or an editing output"
DESCRIPTION = (
    "A `prepare` output: counts by status and failure class, every failure with its message, shards the "
    "manifest names but that are missing (exit status 1), and a PNG contact sheet (frames of each clip "
    "with its landmarks). An `edit` output (a folder with results.parquet): counts by status and failure "
    "class and every failed job. Nothing is changed or deleted.")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipelines.dataset.inspect import inspect_output
    from pipelines.edit.results import has_results, inspect_results
    from pipelines.storage import OutputStore

    options = build(InspectOptions, vars(args))
    if has_results(OutputStore(options.output)):
        return inspect_results(options.output)
    return inspect_output(options.output, Path(options.sheet) if options.sheet else None)
