"""The README's examples run as a new user would run them: verbatim, in a fresh folder, one after another.

Every fenced block of the README carries a marker on the line above it:
`<!-- readme: run; makes PATH ... -->` (every command in it is run here, in order, in one temporary
working folder shared by all such blocks, and each PATH must exist afterwards), `<!-- readme: shown
(why) -->` (needs the user's own data, weights or a cluster) or `<!-- readme: output -->` (what a
command prints). An unmarked block fails the test, so the README and the tests cannot drift apart.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARKER = re.compile(r"<!--\s*readme:\s*(run|shown|output)\b(.*?)-->")
COMMAND_TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    line: int
    kind: str
    makes: tuple[str, ...]
    commands: tuple[str, ...]


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text with their markers; ValueError naming an unmarked block."""
    lines = text.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        if not lines[index].strip().startswith("```"):
            index += 1
            continue
        start = index
        end = next(i for i in range(start + 1, len(lines)) if lines[i].strip().startswith("```"))
        above = next((lines[i] for i in range(start - 1, -1, -1) if lines[i].strip()), "")
        marker = MARKER.search(above)
        if marker is None:
            raise ValueError(f"README.md line {start + 1}: a code block without a `<!-- readme: run|shown|output -->` "
                             "marker on the line above it")
        kind, rest = marker.group(1), marker.group(2)
        makes = tuple(rest.split("makes", 1)[1].split()) if kind == "run" and "makes" in rest else ()
        blocks.append(Block(start + 1, kind, makes, tuple(_commands(lines[start + 1:end]))))
        index = end + 1
    return blocks


def _commands(lines: list[str]) -> list[str]:
    """Command lines of a block: continuation backslashes joined, comments dropped."""
    commands, pending = [], ""
    for line in lines:
        text = line.strip()
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        text = (pending + text).strip()
        pending = ""
        if text and not text.startswith("#"):
            commands.append(text)
    return commands


def _argv(command: str) -> list[str]:
    """The command's words (no shell); `portrait` runs this checkout's CLI with this interpreter."""
    words = shlex.split(command, comments=True)
    assert words and words[0] == "portrait", f"a runnable README command must be a `portrait` command: {command}"
    return [sys.executable, "-m", "flows.cli", *words[1:]]


def test_every_block_is_marked_and_every_job_has_a_runnable_example():
    blocks = readme_blocks(README.read_text())
    runnable = " ".join(command for block in blocks if block.kind == "run" for command in block.commands)
    for command in ("portrait prepare", "portrait train", "portrait edit", "portrait inspect"):
        assert command in runnable, f"the README runs no `{command}` example on the sample"
    assert all(block.makes for block in blocks if block.kind == "run"), "each runnable block names what it makes"


def test_an_unmarked_block_is_named_by_its_line():
    with pytest.raises(ValueError, match="line 3: a code block without"):
        readme_blocks("text\n\n```\nportrait demo\n```\n")


@pytest.mark.slow
def test_the_readme_examples_run_verbatim_in_a_fresh_folder(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    for block in readme_blocks(README.read_text()):
        if block.kind != "run":
            continue
        for command in block.commands:
            done = subprocess.run(_argv(command), cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT_S)
            assert done.returncode == 0, f"README line {block.line}: `{command}` exited {done.returncode}:\n" \
                                         f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        missing = [path for path in block.makes if not (tmp_path / path).exists()]
        assert not missing, f"README line {block.line}: the block did not make {missing}"
