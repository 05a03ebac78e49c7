"""The `portrait` command: one entry point with a subcommand per job.

Every option of a subcommand can also come from a YAML file (`--config FILE`), whose keys are the
long option names (dashes or underscores); flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from pipelines.prepare.download import DEFAULT_URL_TEMPLATE
from pipelines.media.faces import DETECTOR_NAMES

LOG = logging.getLogger("portrait")


def _set_service_defaults() -> None:
    """Embedded defaults that keep a laptop run offline and quiet (a cluster overrides them by env)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="prepare VoxCeleb-style clips into WebDataset shards (Prefect flow, work on Ray)",
        description=(
            "Download the needed time spans of each video with yt-dlp, track the face, crop it to "
            "256x256 at 25 fps with per-frame landmarks and head pose, and write WebDataset shards "
            "plus a Parquet manifest (one row per requested clip, with status and failure cause). "
            "A rerun with the same output completes only what is missing. "
            "Runs on a local Ray and Prefect's temporary server unless RAY_ADDRESS / "
            "PREFECT_API_URL point at a cluster."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    inputs = p.add_argument_group("inputs (at least one, or --sample)")
    inputs.add_argument("--vox1-txt", action="append", default=[], metavar="DIR",
                        help="VoxCeleb1 metadata tree txt/<identity>/<video>/<utterance>.txt (boxes in 360p pixels)")
    inputs.add_argument("--vox2-txt", action="append", default=[], metavar="DIR",
                        help="VoxCeleb2 metadata tree (boxes normalised 0..1)")
    inputs.add_argument("--clips", action="append", default=[], metavar="TABLE",
                        help="clip table, CSV or Parquet, in the style of vox-metadata.csv")
    inputs.add_argument("--urls", action="append", default=[], metavar="FILE",
                        help="plain list of video URLs or local files (whole videos, faces found automatically)")
    inputs.add_argument("--sample", action="store_true",
                        help="prepare the bundled sample: a real talking-face clip served from a loopback "
                             "HTTP server and described by generated VoxCeleb-format metadata")
    p.add_argument("--output", required=False, default="out/dataset", metavar="PATH_OR_URI",
                   help="output directory or object-store URI (s3://, gs://)")
    p.add_argument("--workdir", default=None, metavar="DIR",
                   help="local scratch and download cache, kept for reruns (default: OUTPUT/.work when OUTPUT "
                        "is local, else ~/.cache/dpe-portrait/<output>)")
    p.add_argument("--url-template", default=DEFAULT_URL_TEMPLATE,
                   help="maps video ids to URLs ({id} is replaced); use it for mirrors and local servers")
    p.add_argument("--detector", choices=DETECTOR_NAMES, default="auto",
                   help="face detector: face-alignment when its weights are in $TORCH_HOME, else dlib (logged)")
    p.add_argument("--detect-every", type=_positive_int, default=None, metavar="N",
                   help="run the detector every N frames and track in between (default: the tracker's)")
    p.add_argument("--shard-size-mb", type=_positive_float, default=256.0, help="target size of one tar shard")
    p.add_argument("--videos-per-batch", type=_positive_int, default=8,
                   help="videos per Prefect task; each video is one Ray task")
    p.add_argument("--test-fraction", type=float, default=0.0,
                   help="fraction of identities put in the test split when the input has no split")
    p.add_argument("--retry-failed", action="store_true",
                   help="retry clips that failed in an earlier run (permanent download failures included)")
    p.add_argument("--allow-file-urls", action="store_true",
                   help="accept file:// URLs and local paths as video sources (refused by default)")
    p.add_argument("--rate-limit", default=None, metavar="RATE", help="download rate limit, e.g. 2M (bytes/s)")
    p.add_argument("--sleep", type=float, default=0.0, metavar="S", help="seconds to sleep between downloads")
    p.add_argument("--cookies", default=None, metavar="FILE", help="cookies.txt for yt-dlp")
    p.add_argument("--proxy", default=None, metavar="URL", help="proxy for yt-dlp")
    p.add_argument("--retries", type=int, default=3, help="retries of transient download errors")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--contact-sheet", action="store_true",
                   help="also write contact_sheet.png: the first frame of each prepared clip with landmarks")
    p.set_defaults(handler=_run_prepare)


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        allow_abbrev=False,
        help="write the sample media and its VoxCeleb-format metadata to a directory",
        description="Make the offline sample (videos, VoxCeleb1/2 metadata trees, a clip table and a URL "
                    "list pointing at URL-BASE) so the inputs of `prepare` can be looked at and edited.",
    )
    p.add_argument("directory", type=Path)
    p.add_argument("--url-base", default="http://127.0.0.1:8000",
                   help="base URL the generated URL list and clip table point at")
    p.set_defaults(handler=_run_sample)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        allow_abbrev=False,
        help="summarise a prepared dataset and draw a contact sheet of its clips",
        description="Read the manifest and shards of a `prepare` output: counts by status and failure "
                    "class, and a PNG contact sheet (first frame of each clip with its landmarks).",
    )
    p.add_argument("output", metavar="PATH_OR_URI")
    p.add_argument("--sheet", type=Path, default=None, help="where to write the PNG (default: OUTPUT/contact_sheet.png)")
    p.set_defaults(handler=_run_inspect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portrait",
        allow_abbrev=False,
        description="Video portrait editing at scale with DPE: dataset preparation, training, bulk editing.",
    )
    parser.add_argument("--config", type=Path, default=None, metavar="YAML",
                        help="YAML file of option values (keys = long option names); flags override it")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_prepare(sub)
    _add_sample(sub)
    _add_inspect(sub)
    return parser


def _apply_config_file(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line, then fill every option it did not give from the --config file.

    File values go through the option's own type and choices, so a typo in the file fails as it
    would on the command line; a single value is accepted where an option may repeat.
    """
    args = parser.parse_args(argv)
    if args.config is None:
        return args
    try:
        values = yaml.safe_load(args.config.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        parser.error(f"cannot read config file {args.config}: {exc}")
    if not isinstance(values, dict):
        parser.error(f"config file {args.config} must hold a mapping of option names to values")
    subparser = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
    actions = {a.dest: a for a in subparser._actions if a.option_strings}
    normalised = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(normalised) - set(actions))
    if unknown:
        parser.error(f"config file {args.config}: unknown option(s) for '{args.command}': {', '.join(unknown)}")
    given = {dest for dest, action in actions.items()
             if any(token == option or token.startswith(option + "=")
                    for token in argv for option in action.option_strings)}
    for dest, value in normalised.items():
        if dest not in given:
            setattr(args, dest, _config_value(parser, actions[dest], value, args.config))
    return args


def _config_value(parser: argparse.ArgumentParser, action: argparse.Action, value: Any, source: Path) -> Any:
    repeatable = isinstance(action, argparse._AppendAction)
    if isinstance(value, list) and not repeatable:
        parser.error(f"config file {source}: '{action.dest}' takes one value, got a list")
    if action.nargs == 0:  # a flag such as --sample
        if not isinstance(value, bool):
            parser.error(f"config file {source}: '{action.dest}' must be true or false, got {value!r}")
        return value
    converted = []
    for item in value if isinstance(value, list) else [value]:
        if action.type is not None and item is not None:
            try:
                item = action.type(str(item))
            except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"config file {source}: bad value {item!r} for '{action.dest}': {exc}")
        if action.choices is not None and item not in action.choices:
            parser.error(f"config file {source}: '{action.dest}' must be one of "
                         f"{', '.join(map(str, action.choices))}, got {item!r}")
        converted.append(item)
    return converted if repeatable else converted[0]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _run_prepare(args: argparse.Namespace) -> int:
    from flows.prepare_flow import prepare_from_args

    return prepare_from_args(args)


def _run_sample(args: argparse.Namespace) -> int:
    from pipelines.sample.metadata import write_sample_inputs

    written = write_sample_inputs(args.directory, args.url_base)
    for name, path in written.items():
        print(f"{name:>12}: {path}")
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from pipelines.dataset.inspect import inspect_output

    return inspect_output(args.output, args.sheet)


def main(argv: Sequence[str] | None = None) -> int:
    _set_service_defaults()
    parser = build_parser()
    args = _apply_config_file(parser, list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # the Prefect client logs every API call at INFO
        logging.getLogger("httpx").setLevel(logging.WARNING)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
