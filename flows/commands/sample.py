"""`portrait sample`: write the bundled sample media and its metadata, to look at or edit."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from pipelines.options import build, check, option

NAME = "sample"


@dataclass(frozen=True)
class SampleOptions:
    directory: str = option("", "folder to write the sample into", positional=True, metavar="DIRECTORY", path=True)
    url_base: str = option("http://127.0.0.1:8000", "base URL the generated URL list and clip table point at")

    def __post_init__(self) -> None:
        check(self)


OPTIONS = (SampleOptions,)


SUMMARY = "write the sample media and its VoxCeleb-format metadata to a folder"
DESCRIPTION = (
    "Make the offline sample (videos, VoxCeleb1/2 metadata trees, a clip table and a URL list pointing "
    "at URL-BASE) so the inputs of `prepare` can be looked at and edited, and the short videos `portrait "
    "demo` edits (DIRECTORY/demo: source.mp4, driver.mp4, driver.png and a job table, jobs.csv) to try "
    "`portrait edit` on.")


def run(args: argparse.Namespace) -> int:
    from pipelines.sample.demo import make_demo_media
    from pipelines.sample.metadata import write_sample_inputs

    options = build(SampleOptions, vars(args))
    directory = Path(options.directory)
    written = write_sample_inputs(directory, options.url_base)
    written["demo"] = make_demo_media(directory / "demo")["jobs.csv"].parent
    for name, path in written.items():
        print(f"{name:>12}: {path}")
    return 0
