"""The subcommands of `portrait`, one module per job: each `register`s its options and `run`s.

Modules here import only what their options need (settings dataclasses, argparse); the job
itself (torch, Ray, Prefect, yt-dlp, detectors) is imported inside `run`, so `--help` is fast.
"""

from __future__ import annotations

import argparse
from typing import Any


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows a default only where it says something (not for flags, None, empty values)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or action.nargs == 0 or not action.option_strings
                or default in (None, "", [], (), argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def add_command(sub: argparse._SubParsersAction, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    """A subcommand parser with the project's help style and the common options."""
    parser = sub.add_parser(name, help=summary, description=description, formatter_class=HelpFormatter,
                            allow_abbrev=False)
    add_common_options(parser, suppress_defaults=True)
    return parser


def add_common_options(parser: argparse.ArgumentParser, *, suppress_defaults: bool = False) -> None:
    """--config and -v, accepted before or after the subcommand (a subcommand's copy must not reset
    the value given before it, hence SUPPRESS there)."""
    config_default: Any = argparse.SUPPRESS if suppress_defaults else None
    verbose_default: Any = argparse.SUPPRESS if suppress_defaults else False
    parser.add_argument("--config", default=config_default, metavar="YAML",
                        help="YAML file of option values (keys = long option names); flags override it")
    parser.add_argument("-v", "--verbose", action="store_true", default=verbose_default, help="debug logging")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
    return value
