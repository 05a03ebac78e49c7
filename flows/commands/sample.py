"""`portrait sample`: write the bundled sample media and its metadata, to look at or edit."""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.commands import add_command

NAME = "sample"


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(
        sub, NAME, "write the sample media and its VoxCeleb-format metadata to a folder",
        "Make the offline sample (videos, VoxCeleb1/2 metadata trees, a clip table and a URL list pointing "
        "at URL-BASE) so the inputs of `prepare` can be looked at and edited, and the short videos `portrait "
        "demo` edits (DIRECTORY/demo: source.mp4, driver.mp4, driver.png and a job table, jobs.csv) to try "
        "`portrait edit` on.")
    p.add_argument("directory", type=Path)
    p.add_argument("--url-base", default="http://127.0.0.1:8000",
                   help="base URL the generated URL list and clip table point at")
    return p


def run(args: argparse.Namespace) -> int:
    from pipelines.sample.demo import make_demo_media
    from pipelines.sample.metadata import write_sample_inputs

    written = write_sample_inputs(args.directory, args.url_base)
    written["demo"] = make_demo_media(args.directory / "demo")["jobs.csv"].parent
    for name, path in written.items():
        print(f"{name:>12}: {path}")
    return 0
