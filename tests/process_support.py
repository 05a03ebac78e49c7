"""Stopping a real `portrait` process as a cluster scheduler does, for the graceful-stop tests."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest


def sigterm_and_wait(command: subprocess.Popen, stderr: Path, limit: float) -> tuple[int, float]:
    """SIGTERM `command` (as Kubernetes or `ray job stop` would) and wait: its exit status and the seconds
    it took; the test fails with the tail of its `stderr` when it still runs after `limit` seconds."""
    command.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    try:
        code = command.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        command.kill()
        pytest.fail(f"still running {limit:g} s after SIGTERM: {stderr.read_text()[-3000:]}")
    return code, time.monotonic() - signalled
