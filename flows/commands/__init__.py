"""The subcommands of `portrait`, one module per job: NAME, SUMMARY, DESCRIPTION, OPTIONS and `run`.

A command's options are the option fields of its settings dataclasses (`pipelines.options`): its
module names those classes in `OPTIONS`, and `add_options` derives the flags, groups and help.
Flags are collected as given (text, no defaults); `flows.cli` merges them over a `--config` file
and the dataclass defaults, converting and checking every value in one place.

Modules here import only what their options need (settings dataclasses, argparse); the job
itself (torch, Ray, Prefect, yt-dlp, detectors) is imported inside `run`, so `--help` is fast.
"""

from __future__ import annotations

import argparse
from types import ModuleType
from typing import Any

from pipelines.options import OptionField, options_of

STOPPED = 130
"""Exit status of a job stopped by SIGINT/SIGTERM (what a shell reports for Ctrl-C), every job's."""


def add_command(subcommands: Any, module: ModuleType) -> argparse.ArgumentParser:
    """The parser of one command module: its NAME, SUMMARY and DESCRIPTION, the common options, the
    options its settings classes declare (OPTIONS), and arguments of its own (`add_arguments`)."""
    parser = subcommands.add_parser(module.NAME, help=module.SUMMARY, description=module.DESCRIPTION,
                                    formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_common_options(parser, suppress_defaults=True)
    add_options(parser, *module.OPTIONS)
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    parser.set_defaults(handler=module.run, option_classes=module.OPTIONS)
    return parser


def add_options(parser: argparse.ArgumentParser, *option_classes: type) -> None:
    """One argument per option field, in declaration order, under its group's heading."""
    groups: dict[str, Any] = {"": parser}
    for field in options_of(*option_classes).values():
        group = field.spec.group
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        _add_argument(groups[group], field)


def _add_argument(target: Any, field: OptionField) -> None:
    spec = field.spec
    text = spec.help + _default_note(field)
    if spec.positional:
        target.add_argument(field.name, metavar=spec.metavar or field.name.upper(), help=text)
        return
    flags = [spec.short, field.flag] if spec.short else [field.flag]
    common = {"dest": field.name, "default": argparse.SUPPRESS, "help": text}
    if field.kind == "switch":
        target.add_argument(*flags, action="store_false" if field.default else "store_true", **common)
        return
    metavar = spec.metavar or ("{" + ",".join(map(str, spec.choices)) + "}" if spec.choices else None)
    target.add_argument(*flags, action="append" if field.kind == "list" else "store", metavar=metavar, **common)


def _default_note(field: OptionField) -> str:
    """The default where it says something (not for switches, None or empty values)."""
    if field.kind == "switch" or field.default in (None, "", ()):
        return ""
    return f" (default: {field.default:g})" if isinstance(field.default, float) else f" (default: {field.default})"


def add_common_options(parser: argparse.ArgumentParser, *, suppress_defaults: bool = False) -> None:
    """--config and -v, accepted before or after the subcommand (a subcommand's copy must not reset
    the value given before it, hence SUPPRESS there)."""
    config_default: Any = argparse.SUPPRESS if suppress_defaults else None
    verbose_default: Any = argparse.SUPPRESS if suppress_defaults else False
    parser.add_argument("--config", default=config_default, metavar="YAML",
                        help="YAML file of option values (keys = long option names); flags override it")
    parser.add_argument("-v", "--verbose", action="store_true", default=verbose_default, help="debug logging")
