"""The `portrait` command line: help, config files, and clear errors for bad invocations."""

from __future__ import annotations

import pytest

from flows.cli import _apply_config_file, build_parser, main


@pytest.mark.parametrize("command", [[], ["prepare"], ["sample"], ["inspect"]])
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "usage: portrait" in text and len(text.splitlines()) > 5


def test_prepare_help_names_the_inputs_and_the_cluster_settings(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    text = capsys.readouterr().out
    for option in ("--vox1-txt", "--vox2-txt", "--clips", "--urls", "--sample", "--retry-failed", "RAY_ADDRESS"):
        assert option in text


def test_config_file_sets_options_and_flags_win(tmp_path):
    config = tmp_path / "prepare.yaml"
    config.write_text("output: s3://bucket/ds\nvideos-per-batch: 3\ndetector: dlib\nvox2_txt: [a, b]\n")
    args = _apply_config_file(build_parser(), ["--config", str(config), "prepare", "--detector", "auto"])
    assert args.output == "s3://bucket/ds" and args.videos_per_batch == 3
    assert args.vox2_txt == ["a", "b"]
    assert args.detector == "auto"


def test_config_file_with_an_unknown_option_is_refused_by_name(tmp_path, capsys):
    config = tmp_path / "prepare.yaml"
    config.write_text("output: out\nshard_size: 10\n")
    with pytest.raises(SystemExit) as done:
        main(["--config", str(config), "prepare"])
    assert done.value.code == 2
    assert "shard_size" in capsys.readouterr().err


def test_unreadable_config_file_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--config", str(tmp_path / "missing.yaml"), "prepare"])
    assert "missing.yaml" in capsys.readouterr().err


def test_prepare_without_inputs_says_what_to_give():
    with pytest.raises(SystemExit) as done:
        main(["prepare", "--output", "out"])
    assert "--vox1-txt" in str(done.value.code) and "--sample" in str(done.value.code)


def test_inspect_of_an_empty_output_says_nothing_is_there(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 1
    assert "no manifest" in capsys.readouterr().out


def test_config_file_single_value_fills_a_repeatable_option_and_flags_replace_it(tmp_path):
    config = tmp_path / "prepare.yaml"
    config.write_text("clips: meta.csv\n")
    parser = build_parser()
    assert _apply_config_file(parser, ["--config", str(config), "prepare"]).clips == ["meta.csv"]
    args = _apply_config_file(build_parser(), ["--config", str(config), "prepare", "--clips", "other.csv"])
    assert args.clips == ["other.csv"]


@pytest.mark.parametrize("line, complaint", [
    ("detector: dlb", "detector"),
    ("videos_per_batch: 0", "videos_per_batch"),
    ("shard_size_mb: -1", "shard_size_mb"),
    ("sample: maybe", "sample"),
    ("output: [a, b]", "output"),
])
def test_config_file_values_are_checked_like_flags(tmp_path, capsys, line, complaint):
    config = tmp_path / "prepare.yaml"
    config.write_text(line + "\n")
    with pytest.raises(SystemExit) as done:
        _apply_config_file(build_parser(), ["--config", str(config), "prepare"])
    assert done.value.code == 2
    assert complaint in capsys.readouterr().err


@pytest.mark.parametrize("failed", [0, 1])
def test_a_demo_that_lost_an_edit_says_so_and_exits_1(failed, monkeypatch, tmp_path, capsys):
    # The demo's own work is stood in for: what is under test is how its result becomes the exit status.
    from flows import services

    edits = {"output": f"{tmp_path}/edited/", "jobs": 3, "ok": 3 - failed, "failed": failed}
    monkeypatch.setattr(services, "run_with_services",
                        lambda name, address, work: {"report": f"{tmp_path}/report/index.html", "edits": edits})
    assert main(["demo", "--output", str(tmp_path)]) == failed
    complaint = capsys.readouterr().err
    assert (f"{tmp_path}/edited/results.parquet" in complaint) == bool(failed)
