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


def session_prefect_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a `portrait` subprocess that records its flow runs on the session's Prefect API (the
    `prefect_harness` fixture must be active) instead of starting an embedded server, which costs seconds
    per command; the README test and the embedded-services tests keep the embedded default."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url, "the prefect_harness fixture is not active"
    return {**env, "PREFECT_API_URL": str(url)}
