"""The layout holds: dependencies point one way, reading a dataset or a run stays light, --help stays light,
nothing in production imports the bundled sample, and the README lists the failure registry."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import errors

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "prefect", "yt_dlp", "dlib", "face_alignment", "webdataset")


def _modules_after(code: str) -> set[str]:
    """Top-level packages imported by `code` run in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_reading_a_dataset_imports_no_ray_ytdlp_prefect_or_detector():
    loaded = _modules_after("import pipelines.dataset.schema, pipelines.dataset.layout, pipelines.dataset.manifest, "
                            "pipelines.dataset.integrity, pipelines.dataset.inspect")
    assert loaded.isdisjoint({"ray", "prefect", "yt_dlp", "dlib", "face_alignment"}), loaded


def test_reading_a_run_imports_no_torch_or_ray():
    loaded = _modules_after("import pipelines.runs")
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))


@pytest.mark.parametrize("command", ["", "prepare", "inspect", "sample", "train", "edit", "demo"])
def test_help_imports_no_job_machinery(command):
    from flows.cli import COMMANDS

    if command and command not in COMMANDS:
        pytest.skip(f"no '{command}' command yet")
    argv = [command, "--help"] if command else ["--help"]
    loaded = _modules_after(f"import contextlib, io\nfrom flows.cli import main\n"
                            f"with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
                            f"    main({argv!r})")
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


LAYERS = {
    "pipelines/media": {"pipelines.dataset", "pipelines.prepare", "pipelines.train", "pipelines.edit", "flows"},
    "pipelines/dataset": {"pipelines.media.faces", "pipelines.media.tracking", "pipelines.prepare",
                          "pipelines.train", "pipelines.edit", "flows"},
    "pipelines/prepare": {"pipelines.train", "pipelines.edit", "flows"},
    "pipelines/train": {"pipelines.prepare", "pipelines.edit", "flows"},
    "pipelines/edit": {"pipelines.prepare", "pipelines.train", "flows"},
    "pipelines/report": {"pipelines.prepare", "flows"},
    "pipelines/runs.py": {"pipelines.media", "pipelines.dataset", "pipelines.prepare", "pipelines.train",
                          "pipelines.edit", "pipelines.report", "flows"},
    "pipelines/options.py": {"pipelines", "flows"},
    "pipelines/runtime.py": {"pipelines.media", "pipelines.dataset", "pipelines.prepare", "pipelines.train",
                             "pipelines.edit", "pipelines.report", "flows"},
    "dpe": {"pipelines", "flows"},
}


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_dependencies_point_one_way(folder):
    forbidden = LAYERS[folder] | ({"pipelines.sample"} if folder != "pipelines/sample" else set())
    offenders = []
    paths = [REPO / folder] if folder.endswith(".py") else sorted((REPO / folder).rglob("*.py"))
    for path in paths:
        for name in _imports(path):
            if any(name == bad or name.startswith(bad + ".") for bad in forbidden):
                offenders.append(f"{path.relative_to(REPO)} imports {name}")
    assert offenders == []


def test_no_production_module_imports_the_sample():
    offenders = [f"{path.relative_to(REPO)} imports {name}"
                 for path in sorted((REPO / "pipelines").rglob("*.py")) if "sample" not in path.parts
                 for name in _imports(path) if name.startswith("pipelines.sample")]
    assert offenders == []


def test_readme_lists_exactly_the_registered_failure_classes():
    readme = (REPO / "README.md").read_text()
    assert errors.markdown_table() in readme, "regenerate the README table with pipelines.errors.markdown_table()"


def test_failure_classes_are_named_only_through_the_registry():
    """No production module writes a registered class name as a string literal (a typo would be a new class)."""
    names = set(errors.REGISTRY)
    offenders = []
    for path in sorted((REPO / "pipelines").rglob("*.py")):
        if path.name == "errors.py" or "sample" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value!r}")
    assert offenders == []


def test_video_files_are_read_and_written_in_one_module():
    """PyAV and the ffmpeg binary are used only in pipelines/media/ (video.py and the pixel and format
    helpers beside it; sample media aside)."""
    offenders = [f"{path.relative_to(REPO)} imports {name}"
                 for folder in ("pipelines", "flows") for path in sorted((REPO / folder).rglob("*.py"))
                 if "media" not in path.parts and "sample" not in path.parts
                 for name in _imports(path) if name == "av" or name.startswith("av.") or name == "ffmpeg"]
    assert offenders == []


def test_options_and_settings_load_no_job_machinery():
    loaded = _modules_after("import pipelines.options, pipelines.prepare.settings, pipelines.train.settings, "
                            "pipelines.edit.settings")
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))
