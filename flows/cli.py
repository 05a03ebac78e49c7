"""The `portrait` command: one entry point with a subcommand per job (`flows.commands`).

Every option of a subcommand can also come from a YAML file (`--config FILE`, before or after the
subcommand), whose keys are the long option names (dashes or underscores); flags given on the
command line win over the file, and the file over the defaults of the job's settings dataclasses.
Values from both are converted and checked by the options' own declarations
(`pipelines.options`), so a typo in the file fails as it would on the command line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from types import ModuleType
from typing import Any, Sequence

import yaml

from flows.commands import add_command, add_common_options
from pipelines.options import OptionError, convert, options_of

LOG = logging.getLogger("portrait")

COMMANDS = ("demo", "prepare", "train", "edit", "inspect", "sample")
"""Modules of `flows.commands`, in the order `portrait --help` lists them."""


def _set_service_defaults() -> None:
    """Embedded defaults that keep a laptop run offline and quiet (a cluster overrides them by env)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def command_modules() -> dict[str, ModuleType]:
    return {name: importlib.import_module(f"flows.commands.{name}") for name in COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portrait",
        allow_abbrev=False,
        description="Video portrait editing at scale with DPE: dataset preparation, training, bulk editing. "
                    "`portrait COMMAND --help` explains each command. Local paths (flags and config files) are "
                    "relative to the folder the command runs in; s3:// and gs:// locations work everywhere.",
    )
    add_common_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in command_modules().values():
        add_command(sub, module)
    return parser


def _apply_config_file(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line, fill every option it did not give from the --config file, then from
    the defaults; every value converted and checked (a bad one is a usage error, exit status 2)."""
    args = parser.parse_args(argv)
    options = options_of(*args.option_classes)
    from_file = _config_values(parser, args.config, args.command, options) if args.config else {}
    for name, field in options.items():
        if hasattr(args, name):
            try:
                value = convert(field, getattr(args, name))
            except OptionError as error:
                parser.error(str(error))
        else:
            value = from_file.get(name, field.default)
        setattr(args, name, value)
    return args


def _config_values(parser: argparse.ArgumentParser, path: str, command: str, options: dict) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as error:
        parser.error(f"cannot read config file {path}: {error}")
    if not isinstance(values, dict):
        parser.error(f"config file {path} must hold a mapping of option names to values")
    normalised = {str(key).replace("-", "_"): (key, value) for key, value in values.items()}
    unknown = sorted(name for name in normalised if name not in options)
    if unknown:
        valid = ", ".join(sorted(name.replace("_", "-") for name in options))
        parser.error(f"config file {path}: unknown option(s) for '{command}': {', '.join(unknown)}; "
                     f"valid options: {valid}")
    converted = {}
    for name, (key, value) in normalised.items():
        try:
            converted[name] = convert(options[name], value)
        except OptionError as error:
            parser.error(f"config file {path}, key {key}: {error}")
    return converted


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
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
