"""Each option is declared once, as a settings field; flags, config keys and flow parameters follow from it."""

from __future__ import annotations

import inspect
import math
import re
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows.cli import _apply_config_file, build_parser, command_modules, main
from flows.commands import add_command
from pipelines.options import OptionError, at_least, build, check, convert, option, options_of

REPO = Path(__file__).resolve().parents[1]
COMMON_FLAGS = {"--help", "--config", "--verbose"}
OWN_ARGUMENTS = {"train": {"--export"}}
"""Arguments a command adds besides its options: another action, not a flow parameter."""


def _flows():
    from flows.demo_flow import portrait_demo
    from flows.edit_flow import edit_videos
    from flows.prepare_flow import prepare_dataset
    from flows.train_flow import train_model

    return {"prepare": prepare_dataset, "train": train_model, "edit": edit_videos, "demo": portrait_demo}


def _help_flags(command: str, capsys) -> set[str]:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    return set(re.findall(r"^  (?:-\w(?: \S+)?, )?(--[a-z][a-z0-9-]*)", text, re.MULTILINE))


@pytest.mark.parametrize("command", ["prepare", "train", "edit", "demo"])
def test_flags_config_keys_and_flow_parameters_are_the_same_options(command, capsys, tmp_path):
    module = command_modules()[command]
    options = options_of(*module.OPTIONS)
    flags = _help_flags(command, capsys) - COMMON_FLAGS - OWN_ARGUMENTS.get(command, set())
    assert flags == {field.flag for field in options.values()}

    config = tmp_path / "all.yaml"
    config.write_text("".join(f"{name}: {_yaml(field.default)}\n" for name, field in options.items()))
    args = _apply_config_file(build_parser(), ["--config", str(config), command])
    assert {name: getattr(args, name) for name in options} == {
        name: list(field.default) if field.kind == "list" else field.default for name, field in options.items()}

    parameters = inspect.signature(_flows()[command].fn).parameters
    assert list(parameters) == list(options), "the flow's parameters, in the order the options are declared"
    for name, parameter in parameters.items():
        default = options[name].default
        assert parameter.default == (None if default == () else default), name


def _yaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[]"
    return repr(value) if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class _Trial:
    """A command with one option, as a new option would be added: one field."""

    sharpness: float = option(0.5, "how sharp the trial is", rules=(at_least(0),))

    def __post_init__(self) -> None:
        check(self)


def test_adding_an_option_is_adding_one_field(tmp_path, capsys):
    import argparse

    module = types.SimpleNamespace(NAME="trial", SUMMARY="a trial", DESCRIPTION="a trial command",
                                   OPTIONS=(_Trial,), run=lambda args: build(_Trial, vars(args)).sharpness)
    parser = argparse.ArgumentParser(prog="portrait")
    parser.add_argument("--config", default=None)
    add_command(parser.add_subparsers(dest="command"), module)
    args = _apply_config_file(parser, ["trial", "--sharpness", "0.75"])
    assert args.handler(args) == 0.75
    config = tmp_path / "trial.yaml"
    config.write_text("sharpness: 0.25\n")
    assert _apply_config_file(parser, ["--config", str(config), "trial"]).sharpness == 0.25
    assert _apply_config_file(parser, ["trial"]).sharpness == 0.5
    with pytest.raises(SystemExit):
        _apply_config_file(parser, ["trial", "--sharpness", "-1"])
    assert "--sharpness: -1.0: must be at least 0" in capsys.readouterr().err


def test_one_message_format_from_flags_config_files_and_flows(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["edit", "--source", "a.mp4", "--driving", "b.mp4", "--chunk-frames", "0"])
    assert done.value.code == 2 and "--chunk-frames: 0: must be at least 1" in capsys.readouterr().err
    config = tmp_path / "edit.yaml"
    config.write_text("chunk-frames: 0\n")
    with pytest.raises(SystemExit) as done:
        main(["--config", str(config), "edit", "--source", "a.mp4", "--driving", "b.mp4"])
    assert done.value.code == 2 and "key chunk-frames: --chunk-frames: 0: must be at least 1" in capsys.readouterr().err
    with pytest.raises(OptionError, match="--chunk-frames: 0: must be at least 1"):
        _flows()["edit"].fn(source="a.mp4", driving="b.mp4", chunk_frames=0)
    with pytest.raises(OptionError, match="--batch: 5: must be a multiple of --workers"):
        _flows()["train"].fn(workers=2, batch=5)


def test_values_are_converted_by_type_and_refused_with_the_rule():
    fields = options_of(*command_modules()["prepare"].OPTIONS)
    assert convert(fields["videos_per_batch"], "3") == 3 and convert(fields["videos_per_batch"], 3.0) == 3
    assert convert(fields["shard_size_mb"], "2.5") == 2.5
    assert convert(fields["urls"], "a.txt") == ["a.txt"] and convert(fields["urls"], None) == []
    assert convert(fields["cookies"], None) is None
    for name, value, rule in [("videos_per_batch", "3.5", "must be a whole number"),
                              ("videos_per_batch", True, "must be a whole number"),
                              ("videos_per_batch", 0, "must be at least 1"),
                              ("shard_size_mb", "nan", "must be a number"),
                              ("shard_size_mb", math.inf * -1, "must be positive"),
                              ("test_fraction", 2, "must lie in [0, 1]"),
                              ("retry_failed", "yes", "must be true or false"),
                              ("output", ["a", "b"], "takes one value, not a list"),
                              ("detector", "dlb", "must be one of auto, dlib, face-alignment"),
                              ("rate_limit", "fast", "must be a number of bytes/s"),
                              ("url_template", "https://x/", "needs an {id} placeholder")]:
        with pytest.raises(OptionError) as raised:
            convert(fields[name], value)
        assert str(raised.value).startswith(f"--{name.replace('_', '-')}: ") and rule in str(raised.value)


def test_local_paths_are_made_absolute_once_and_uris_left_alone(tmp_path, monkeypatch):
    from pipelines.prepare.settings import PrepareSettings, SourceInputs

    monkeypatch.chdir(tmp_path)
    inputs = build(SourceInputs, {"urls": ["list.txt", "s3://bucket/list.txt"]})
    assert inputs.urls == (str(tmp_path / "list.txt"), "s3://bucket/list.txt")
    settings = build(PrepareSettings, {"output": "out", "cookies": "~/cookies.txt", "proxy": "http://proxy:3128"})
    assert settings.output == str(tmp_path / "out") and settings.proxy == "http://proxy:3128"
    assert settings.cookies == str(Path.home() / "cookies.txt")


def test_the_cli_uses_no_private_argparse_names():
    for path in sorted((REPO / "flows").rglob("*.py")):
        assert "argparse._" not in path.read_text(), path
