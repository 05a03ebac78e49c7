"""The services a command needs, started before its flow and ended with it.

`portrait <job>` first connects to Ray (a cluster named by RAY_ADDRESS / --ray-address, else a
local Ray) and to the Prefect API (PREFECT_API_URL, else an embedded server), so a wrong address
is one clear line before any work. Prefect's own temporary server would outlive a driver killed
with SIGKILL; the embedded server started here is the same uvicorn app, but on Linux it is told
(PR_SET_PDEATHSIG) to stop when this process dies, however it dies. Ray's local processes already
share the driver's fate.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Hashable, Iterator, TypeVar

LOG = logging.getLogger(__name__)
Result = TypeVar("Result")

STARTUP_TIMEOUT_S = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90"))
_PR_SET_PDEATHSIG = 1


_CHECKED: dict[Hashable, Any] = {}


def hand_over(settings: Hashable, checked: Any) -> None:
    """Keep what a command checked before starting its services (a loaded checkpoint, the training
    catalogues) for its flow, which runs in this process: each expensive check is done once."""
    _CHECKED[settings] = checked


def take_over(settings: Hashable) -> Any | None:
    """What `hand_over` kept for exactly these settings (once), else None: a flow started any other
    way (a deployment, a test) does its own checks."""
    return _CHECKED.pop(settings, None)


@contextlib.contextmanager
def stop_on_signals(command: str) -> Iterator[None]:
    """While the block runs, the first SIGINT or SIGTERM asks the job to stop feeding new work
    (`pipelines.runtime.request_stop`: it finishes what is in flight, records it and exits non-zero
    with a line saying how to resume); a second one stops at once (KeyboardInterrupt).

    Installed inside a flow, on the main thread, over Prefect's own SIGTERM handler (which would
    abort the flow run mid-work); elsewhere (a worker thread) it does nothing.
    """
    from pipelines.runtime import request_stop, stop_requested

    def handle(signum: int, frame: Any) -> None:
        if stop_requested():
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} again: stopping at once")
        request_stop()
        print(f"portrait {command}: {signal.Signals(signum).name}: finishing what is in flight, then stopping "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class ServiceUnavailable(RuntimeError):
    """A service the command needs could not be reached or started; the message says what to do."""


@contextlib.contextmanager
def job_services(ray_address: str | None, use_ray: bool = True) -> Iterator[None]:
    """Ray connected (unless the job runs without it) and a Prefect API in place for the block;
    embedded ones end with the process."""
    from pipelines.runtime import ensure_ray

    if use_ray:
        ensure_ray(ray_address)
    with prefect_api():
        yield


def run_with_services(command: str, ray_address: str | None, start: Callable[[], Result],
                      use_ray: bool = True) -> Result:
    """`start()` (a flow) with the job's services up; a service that cannot be reached or started is one
    line naming it and exit status 2, not a traceback."""
    from pipelines.runtime import LocationNotShared, RayUnavailable

    try:
        with job_services(ray_address, use_ray):
            return start()
    except (RayUnavailable, ServiceUnavailable, LocationNotShared) as error:
        print(f"portrait {command}: {error}", file=sys.stderr)
        raise SystemExit(2) from None


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """The configured Prefect API, else an embedded server (SQLite under PREFECT_HOME) for the block."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield str(configured)
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    LOG.info("starting an embedded Prefect server on %s (set PREFECT_API_URL to use your own)", url)
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", _prefect_root(), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "error", "--lifespan", "on"],
        env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"},
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    try:
        _wait_healthy(url, process)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _flush_prefect_logs()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _flush_prefect_logs() -> None:
    """Send the run's buffered log records while the server still listens."""
    from prefect.logging.handlers import APILogWorker

    with contextlib.suppress(Exception):
        APILogWorker.drain_all(timeout=5)


def _prefect_root() -> str:
    import prefect

    return str(prefect.__module_path__.parent)


def _die_with_parent() -> None:
    """Runs in the child before exec: deliver SIGTERM to it when its parent dies."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen) -> None:
    import httpx

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServiceUnavailable(f"the embedded Prefect server exited with code {process.returncode}; "
                                     "check PREFECT_HOME is writable, or set PREFECT_API_URL to a running server")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise ServiceUnavailable(f"the embedded Prefect server did not answer within {STARTUP_TIMEOUT_S:.0f} s; "
                             "raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set PREFECT_API_URL")
