"""Options: every setting a user can give, declared once, as a field of its job's settings dataclass.

A field made with `option(...)` carries its default, help, group and the rules its value follows.
Everything else is derived from those fields, so adding an option means adding one field:
- the flags of the `portrait` subcommand (`flows.commands.add_options`),
- the keys a `--config` YAML file may hold (the same names, with dashes or underscores),
- the Prefect flow's parameters (each flow keeps an explicit signature for deployment forms;
  `tests/test_options.py` checks it names exactly these fields, with the same defaults),
- conversion of command-line text and YAML values to the field's type, and validation with one
  message format, ``--option: value: rule`` (`OptionError`),
- local paths (`path=True`) made absolute once, on the driver, when settings are built from what
  a user gave (`build`), before any worker sees them.

Fields without `option(...)` are internal tuning knobs with defaults, not part of the interface.
Only the standard library is imported here, so `portrait --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

_METADATA_KEY = "portrait.option"


class OptionError(ValueError):
    """A value an option cannot take: ``--option: value: rule``."""

    def __init__(self, name: str, value: Any, rule: str) -> None:
        super().__init__(f"{flag_of(name)}: {value!r}: {rule}")
        self.name, self.value, self.rule = name, value, rule


@dataclass(frozen=True)
class Rule:
    """A condition on a value and the words that state it ("must be at least 1")."""

    text: str
    holds: Callable[[Any], bool]


def at_least(minimum: float) -> Rule:
    return Rule(f"must be at least {minimum:g}", lambda value: value >= minimum)


def at_most(maximum: float) -> Rule:
    return Rule(f"must be at most {maximum:g}", lambda value: value <= maximum)


POSITIVE = Rule("must be positive", lambda value: value > 0)
NOT_NEGATIVE = Rule("must not be negative", lambda value: value >= 0)
FRACTION = Rule("must lie in [0, 1]", lambda value: 0.0 <= value <= 1.0)


def matches(pattern: str, text: str) -> Rule:
    compiled = re.compile(pattern)
    return Rule(text, lambda value: compiled.fullmatch(str(value)) is not None)


@dataclass(frozen=True)
class Option:
    """What the interface needs to know about one option besides its name, type and default."""

    help: str
    group: str = ""
    """The heading it is listed under in --help (empty: the command's own options)."""
    flag: str = ""
    """The long flag when it is not --<name with dashes> (e.g. 'no-colour-match' for a default-on switch)."""
    short: str = ""
    metavar: str | None = None
    choices: tuple[Any, ...] = ()
    rules: tuple[Rule, ...] = ()
    path: bool = False
    """A local path (or an object-store URI): made absolute against the working folder by `build`."""
    positional: bool = False
    """Given without a flag on the command line (`portrait inspect OUTPUT`)."""
    parse: Callable[[Any], Any] | None = None
    """Checks a text value beyond its type; raises ValueError whose message is the rule."""


def option(default: Any, help: str, **details: Any) -> Any:
    """A dataclass field that is a user-facing option (see the module docstring)."""
    if isinstance(default, list):
        raise TypeError("repeatable options default to a tuple, not a list")
    return dataclasses.field(default=default, metadata={_METADATA_KEY: Option(help, **details)})


@dataclass(frozen=True)
class OptionField:
    """One option of a settings class, resolved: name, declaration, value kind and default."""

    name: str
    spec: Option
    kind: str
    """'switch' (bool), 'int', 'float', 'str' or 'list' (a repeatable str option)."""
    optional: bool
    """None is a valid value."""
    default: Any

    @property
    def flag(self) -> str:
        return f"--{self.spec.flag}" if self.spec.flag else flag_of(self.name)


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


@functools.cache
def option_fields(cls: type) -> tuple[OptionField, ...]:
    """The options a settings dataclass declares, in declaration order."""
    hints = typing.get_type_hints(cls)
    found = []
    for field in dataclasses.fields(cls):
        spec = field.metadata.get(_METADATA_KEY)
        if spec is None:
            continue
        kind, optional = _kind(hints[field.name], f"{cls.__name__}.{field.name}")
        found.append(OptionField(field.name, spec, kind, optional, field.default))
    return tuple(found)


def options_of(*classes: type) -> dict[str, OptionField]:
    """Name -> option over several settings classes (a command's inputs and its settings)."""
    merged: dict[str, OptionField] = {}
    for cls in classes:
        for field in option_fields(cls):
            if field.name in merged:
                raise TypeError(f"option {field.name!r} is declared twice ({cls.__name__})")
            merged[field.name] = field
    return merged


def _kind(annotation: Any, where: str) -> tuple[str, bool]:
    arguments = typing.get_args(annotation)
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in arguments
    if optional:
        (annotation,) = [argument for argument in arguments if argument is not type(None)]
    if annotation is bool:
        return "switch", optional
    if annotation in (int, float, str):
        return annotation.__name__, optional
    if typing.get_origin(annotation) is tuple and typing.get_args(annotation) == (str, Ellipsis):
        return "list", optional
    raise TypeError(f"{where}: an option must be bool, int, float, str or tuple[str, ...], got {annotation}")


def convert(field: OptionField, value: Any) -> Any:
    """`value` (command-line text, a YAML value or a Python value) as the option's type (a list for
    a repeatable option), checked against its choices and rules; `OptionError` otherwise."""
    if value is None:
        if field.optional:
            return None
        if field.kind == "list":  # a flow parameter left empty
            return []
        raise OptionError(field.name, value, "must be given")
    if field.kind == "list":
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, (list, tuple, dict)):
                raise OptionError(field.name, value, "must be a list of paths or names")
        return [_checked(field, str(item)) for item in items]
    if isinstance(value, (list, tuple, dict)):
        raise OptionError(field.name, value, "takes one value, not a list")
    return _checked(field, _typed(field, value))


def _typed(field: OptionField, value: Any) -> Any:
    if field.kind == "switch":
        if isinstance(value, bool):
            return value
        raise OptionError(field.name, value, "must be true or false")
    if field.kind == "str":
        return str(value)
    if isinstance(value, bool):
        raise OptionError(field.name, value, f"must be {'a whole number' if field.kind == 'int' else 'a number'}")
    try:
        number = float(value) if field.kind == "float" else _whole(value)
    except (TypeError, ValueError):
        raise OptionError(field.name, value,
                          f"must be {'a whole number' if field.kind == 'int' else 'a number'}") from None
    if field.kind == "float" and number != number:  # NaN passes every comparison rule
        raise OptionError(field.name, value, "must be a number")
    return number


def _whole(value: Any) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    return int(str(value).strip())


def _checked(field: OptionField, value: Any) -> Any:
    spec = field.spec
    if spec.choices and value not in spec.choices:
        raise OptionError(field.name, value, f"must be one of {', '.join(map(str, spec.choices))}")
    for rule in spec.rules:
        if not rule.holds(value):
            raise OptionError(field.name, value, rule.text)
    if spec.parse is not None:
        try:
            spec.parse(value)
        except ValueError as error:
            raise OptionError(field.name, value, str(error)) from None
    return value


def check(settings: Any, relations: Iterable[tuple[str, bool, str]] = ()) -> None:
    """Validate every option of a settings object, then relations between them given as
    (option, holds, rule); raises `OptionError` for the first that fails. For `__post_init__`."""
    for field in option_fields(type(settings)):
        convert(field, getattr(settings, field.name))
    for name, holds, rule in relations:
        if not holds:
            raise OptionError(name, getattr(settings, name), rule)


def build(cls: type, values: Mapping[str, Any]) -> Any:
    """An instance of settings class `cls` from user values (names of its options; others are
    ignored): converted, checked, local paths made absolute; defaults for what is not given."""
    given = {}
    for field in option_fields(cls):
        if field.name not in values:
            continue
        value = convert(field, values[field.name])
        if field.spec.path:
            value = list(map(absolute_location, value)) if field.kind == "list" else absolute_location(value)
        given[field.name] = tuple(value) if field.kind == "list" else value
    return cls(**given)


def absolute_location(location: str | None) -> str | None:
    """A local path made absolute against this process's working folder (``~`` expanded); URIs
    (s3://, gs://, file://, http://) and empty values unchanged.

    Done once on the driver before any worker starts: workers run in other folders (Ray Train
    moves each into its run folder) and on other machines, where a relative path means something else.
    """
    if not location or "://" in location:
        return location
    return os.path.abspath(os.path.expanduser(location))


def values_of(settings: Any) -> dict[str, Any]:
    """The option values of a settings object by name (what a flow passes on, or a run records)."""
    return {field.name: getattr(settings, field.name) for field in option_fields(type(settings))}
