"""The `portrait` command: one entry point with a subcommand per job (`flows.commands`).

Every option of a subcommand can also come from a YAML file (`--config FILE`, before or after the
subcommand), whose keys are the long option names (dashes or underscores); flags given on the
command line win over the file. Option defaults come from each job's settings dataclasses.
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

from flows.commands import add_common_options

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
    for name, module in command_modules().items():
        module.register(sub).set_defaults(handler=module.run)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def _apply_config_file(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line, then fill every option it did not give from the --config file.

    File values go through the option's own type and choices, so a typo in the file fails as it
    would on the command line; a single value is accepted where an option may repeat.
    """
    args = parser.parse_args(argv)
    if args.config is None:
        return args
    try:
        with open(args.config, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as exc:
        parser.error(f"cannot read config file {args.config}: {exc}")
    if not isinstance(values, dict):
        parser.error(f"config file {args.config} must hold a mapping of option names to values")
    subparser = _subparser(parser, args.command)
    actions = {a.dest: a for a in subparser._actions if a.option_strings and a.dest not in ("help", "config")}
    normalised = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(normalised) - set(actions))
    if unknown:
        valid = ", ".join(sorted(name.replace("_", "-") for name in actions))
        parser.error(f"config file {args.config}: unknown option(s) for '{args.command}': {', '.join(unknown)}; "
                     f"valid options: {valid}")
    given = {dest for dest, action in actions.items()
             if any(token == option or token.startswith(option + "=")
                    for token in argv for option in action.option_strings)}
    for dest, value in normalised.items():
        if dest not in given:
            setattr(args, dest, _config_value(parser, actions[dest], value, args.config))
    return args


def _config_value(parser: argparse.ArgumentParser, action: argparse.Action, value: Any, source: str) -> Any:
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
