"""Mistakes on the command line are one clear line naming the input, found before any service starts.

Each case runs `portrait prepare` in-process with the service start-up replaced by a trap, so a
test fails if Ray or Prefect would have been started before the mistake was found.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import flows.services
from flows.cli import main

REPO = Path(__file__).resolve().parents[1]
VOX2_TEXT = ("Identity  : \tid00012\nReference : \t21Uxsk56VDQ\nOffset    : \t1\nFV Conf   : \t16.647\t(1)\n"
             "ASD Conf  : \t4.465\n\nFRAME \tX \tY \tW \tH \n00001\t0.398\t0.153\t0.164\t0.363\n")


@pytest.fixture
def no_services(monkeypatch):
    @contextlib.contextmanager
    def trap(*args, **kwargs):
        raise AssertionError("services were started before the mistake was found")
        yield

    monkeypatch.setattr(flows.services, "job_services", trap)


def _refused(capsys, *argv: str) -> str:
    code = main(["prepare", *argv])
    assert code == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and "Traceback" not in message, message
    return message


def test_missing_and_wrong_kinds_of_input_are_named(tmp_path, capsys, no_services):
    utterance = tmp_path / "vox" / "txt" / "id00012" / "21Uxsk56VDQ" / "00001.txt"
    utterance.parent.mkdir(parents=True)
    utterance.write_text(VOX2_TEXT)
    (tmp_path / "empty").mkdir()
    table = tmp_path / "clips.csv"
    table.write_text("video_id,start,end\nabc,0,1\n")
    output = ["--output", str(tmp_path / "out")]
    cases = [
        (["--vox1-txt", "/nonexistent"], "--vox1-txt /nonexistent: missing"),
        (["--vox2-txt", str(tmp_path / "empty")], "holds no VoxCeleb utterance files"),
        (["--vox2-txt", str(utterance)], "a file; expected the folder of a VoxCeleb metadata tree"),
        (["--urls", str(table)], "a clip table; give it with --clips"),
    ]
    for argv, complaint in cases:
        assert complaint in _refused(capsys, *argv, *output)
    assert not (tmp_path / "out").exists(), "nothing may be created for a refused run"


@pytest.mark.parametrize("where, complaint", [
    ("file", "is a file, not a folder"),
    ("under-a-file", "cannot be used as the dataset folder"),
    ("proc", "cannot be used as the dataset folder"),
])
def test_outputs_that_cannot_hold_a_dataset_are_named(tmp_path, capsys, no_services, where, complaint):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    output = {"file": afile, "under-a-file": afile / "ds", "proc": Path("/proc/portrait-dataset")}[where]
    message = _refused(capsys, "--sample", "--output", str(output), "--detector", "dlib")
    assert complaint in message and str(output) in message


def test_a_missing_bucket_is_named(s3_server, capsys, no_services):
    message = _refused(capsys, "--sample", "--output", "s3://no-such-bucket/ds", "--detector", "dlib")
    assert "s3://no-such-bucket/ds" in message and "bucket" in message


@pytest.mark.parametrize("argv, complaint", [
    (["--rate-limit", "abc"], "--rate-limit"),
    (["--test-fraction", "2"], "--test-fraction"),
    (["--min-clip-frames", "0"], "--min-clip-frames"),
    (["--face", "biggest"], "--face"),
])
def test_bad_values_are_usage_errors(capsys, argv, complaint):
    with pytest.raises(SystemExit) as done:
        main(["prepare", "--sample", *argv])
    assert done.value.code == 2 and complaint in capsys.readouterr().err


def test_config_and_verbose_work_after_the_subcommand(tmp_path, capsys, no_services):
    config = tmp_path / "prepare.yaml"
    config.write_text(f"vox1-txt: [/nonexistent]\noutput: {tmp_path / 'out'}\n")
    assert "--vox1-txt /nonexistent" in _refused(capsys, "--config", str(config), "-v")
    config.write_text("vox1_txt: [a]\nshard-size: 3\n")
    with pytest.raises(SystemExit):
        main(["prepare", "--config", str(config)])
    error = capsys.readouterr().err
    assert "shard_size" in error and "valid options:" in error and "shard-size-mb" in error


def test_a_ray_address_where_nothing_listens_is_one_line_in_seconds(tmp_path):
    """In a fresh interpreter: the test session's own Ray would otherwise be reused."""
    done = subprocess.run([sys.executable, "-m", "flows.cli", "prepare", "--sample", "--output", str(tmp_path / "out"),
                           "--detector", "dlib", "--ray-address", "127.0.0.1:9"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("portrait prepare:")]
    assert len(lines) == 1 and "nothing answers at the Ray address 127.0.0.1:9" in lines[0]
    assert "Traceback" not in done.stderr


def test_help_shows_defaults_only_where_they_say_something(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
    assert "(default: 25)" in text  # --detect-every


def _descendants(pid: int) -> dict[int, str]:
    table = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    children: dict[int, list[tuple[int, str]]] = {}
    for line in table.splitlines():
        child, parent, args = line.split(None, 2)
        children.setdefault(int(parent), []).append((int(child), args))
    found, stack = {}, [pid]
    while stack:
        for child, args in children.get(stack.pop(), []):
            found[child] = args
            stack.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


@pytest.mark.slow
def test_embedded_services_end_when_the_command_is_killed(tmp_path):
    """SIGKILL leaves no chance to clean up: the embedded Prefect server and Ray must go by themselves."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), RAY_TMPDIR=ray_tmp)
    command = subprocess.Popen([sys.executable, "-m", "flows.cli", "prepare", "--sample", "--output",
                                str(tmp_path / "out"), "--detector", "dlib"], env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stderr.txt", "w"))
    services: dict[int, str] = {}
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and command.poll() is None:
        services = {pid: args for pid, args in _descendants(command.pid).items()
                    if "uvicorn" in args or "raylet" in args or "gcs_server" in args}
        if any("uvicorn" in a for a in services.values()) and any("raylet" in a for a in services.values()):
            break
        time.sleep(0.5)
    assert command.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert any("uvicorn" in a for a in services.values()) and any("raylet" in a for a in services.values())
    command.send_signal(signal.SIGKILL)
    command.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_alive(pid) for pid in services):
        time.sleep(0.5)
    assert [args[:80] for pid, args in services.items() if _alive(pid)] == []


@pytest.mark.slow
def test_a_cluster_that_needs_a_token_is_one_line_saying_how_to_give_it(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port", str(port),
                             "--num-cpus", "0", "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.5)
        done = subprocess.run([sys.executable, "-m", "flows.cli", "prepare", "--sample", "--detector", "dlib",
                               "--output", str(tmp_path / "out"), "--ray-address", f"127.0.0.1:{port}"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        # The head's processes are its session's (never `ray stop`: it stops every Ray); `ray start --block`
        # takes seconds to stop them on SIGTERM, and none of them holds anything the test keeps.
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("portrait prepare:")]
    assert len(lines) == 1 and "RAY_AUTH_MODE=token" in lines[0] and f"127.0.0.1:{port}" in lines[0]
    assert "Traceback" not in done.stderr
