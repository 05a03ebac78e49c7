"""The training data path at scale: loader processes, frames decoded alone, one read per sample.

Runs on a small dataset written with the dataset package's own writers from the real talking-face
clip with a keyframe every 8 frames (as `portrait prepare` writes them, scaled down), and, for
object stores, on moto's S3 server behind a loopback proxy that counts GETs and can fail them.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from train_support import write_dataset

from pipelines.dataset.layout import stats_path
from pipelines.dataset.shards import read_stats
from pipelines.storage import OutputStore
from pipelines.train import clips
from pipelines.train.clips import ClipReader, load_catalogue
from pipelines.train.pairs import PairSampler, batch_to_device, pairs_to_batch, stack_pairs

SIZE = 32
CLIPS = {  # key: (identity, split, first frame of the real clip, frames)
    "kc1": ("id1", "train", 0, 40),
    "kc2": ("id1", "train", 40, 30),
    "kc3": ("id2", "train", 70, 40),
    "kt1": ("id3", "test", 110, 10),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, carphone_frames):
    return write_dataset(tmp_path_factory.mktemp("loader-data") / "ds", carphone_frames, CLIPS, keyframe_interval=8)


def _options(data: str) -> dict:
    return {"data": data, "size": SIZE, "cache_bytes": 1 << 20}


_COMPARE_LOADERS = """
import sys
import numpy as np
import torch
from pipelines.train.clips import ClipReader, load_catalogue
from pipelines.train.pairs import PairLoader, PairSampler, pairs_to_batch

data = sys.argv[1]
catalogue = load_catalogue(data, "train")
options = {"data": data, "size": 32, "cache_bytes": 1 << 20}
common = {"seed": 5, "rank": 1, "count": 3, "end": 6, "device": torch.device("cpu")}
def loaded(**kw):
    return [(step, {n: v.numpy() for n, v in batch.items()}) for step, batch in PairLoader(catalogue, options, **common, **kw)]
straight, pooled, resumed = loaded(start=0, workers=0), loaded(start=0, workers=2), loaded(start=4, workers=2)
assert [s for s, _ in straight] == list(range(6)) == [s for s, _ in pooled] and [s for s, _ in resumed] == [4, 5]
same = lambda x, y: all(np.array_equal(x[n], y[n]) for n in x)
assert all(same(x, y) for (_, x), (_, y) in zip(straight, pooled))
assert all(same(x, y) for (_, x), (_, y) in zip(straight[4:], resumed))
sampler = PairSampler(catalogue, ClipReader(**options), seed=5, rank=1)
assert same(pairs_to_batch(sampler.pairs(3, 3)), straight[3][1])  # the pairs of the training thread
assert straight[3][1]["frame_a"].std() > 0.1 and len({p.key for s in range(6) for p in sampler.pairs(s, 3)}) == 3
print("same pairs")
"""


def test_loader_processes_and_a_resume_give_the_pairs_of_an_uninterrupted_run(dataset):
    # in a fresh interpreter, as in a Ray Train worker: loader processes are forked, and forking this
    # test process (which holds a Ray driver and Prefect threads once other tests ran) is not what runs
    result = subprocess.run([sys.executable, "-c", _COMPARE_LOADERS, str(dataset)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0 and "same pairs" in result.stdout, result.stderr[-3000:]


def test_frames_are_handed_over_as_uint8_and_become_the_step_values_on_the_device(dataset):
    catalogue = load_catalogue(str(dataset), "train")
    pairs = PairSampler(catalogue, ClipReader(**_options(str(dataset))), seed=0, rank=0).pairs(0, 4)
    handed = stack_pairs(pairs)
    assert handed["frame_a"].dtype == np.uint8 and handed["frame_a"].shape == (4, 3, SIZE, SIZE)
    moved = batch_to_device({name: torch.from_numpy(value) for name, value in handed.items()}, torch.device("cpu"))
    expected = pairs_to_batch(pairs)
    assert all(moved[name].dtype == torch.float32 and np.array_equal(moved[name].numpy(), expected[name])
               for name in expected)


def test_a_pair_decodes_its_two_frames_alone_and_gets_the_frames_of_the_whole_clip(dataset):
    catalogue = load_catalogue(str(dataset), "train")
    whole = PairSampler(catalogue, ClipReader(**_options(str(dataset))), seed=2, rank=0, whole=True)
    seek = PairSampler(catalogue, ClipReader(**_options(str(dataset))), seed=2, rank=0, whole=False)
    for step in range(4):
        a, b = whole.pairs(step, 3), seek.pairs(step, 3)
        assert [(p.key, p.a, p.b) for p in a] == [(p.key, p.a, p.b) for p in b]
        assert all(np.array_equal(x.frames, y.frames) and np.allclose(x.landmarks, y.landmarks) for x, y in zip(a, b))
    assert max(p.a for s in range(4) for p in seek.pairs(s, 3)) > 8  # beyond the first keyframe interval
    # the default: whole clips when every window fits the cache, else seek
    assert PairSampler(catalogue, ClipReader(**_options(str(dataset))), seed=0, rank=0).whole
    assert not PairSampler(catalogue, ClipReader(str(dataset), SIZE, cache_bytes=1 << 10), seed=0, rank=0).whole


def test_samples_are_read_with_one_read_each_from_offsets_in_the_stats(dataset):
    catalogue = load_catalogue(str(dataset), "train")
    stats = read_stats(OutputStore(str(dataset)), catalogue.shards[0])
    assert set(stats.members) == {"kc1", "kc2", "kc3"}
    reader = ClipReader(str(dataset), SIZE)
    for clip in catalogue.clips:
        assert reader.pair(clip, np.array([0.1, 0.9]), whole=False) is not None
    assert reader.reads == 3 and not reader.skipped


def test_a_dataset_without_offsets_is_indexed_once_and_the_index_cached(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("PORTRAIT_CACHE", str(tmp_path / "cache"))
    old = tmp_path / "old"
    shutil.copytree(dataset, old)
    shard = load_catalogue(str(old), "train").shards[0]
    record = json.loads((old / stats_path(shard)).read_text())
    del record["members"]
    (old / stats_path(shard)).write_text(json.dumps(record))
    catalogue = load_catalogue(str(old), "train")
    first = PairSampler(catalogue, ClipReader(str(old), SIZE, cache_bytes=1), seed=0, rank=0).pairs(0, 3)
    assert len(list((tmp_path / "cache" / "shard-members").iterdir())) == 1

    def no_scan(handle):
        raise AssertionError("the shard was scanned again")

    monkeypatch.setattr(clips, "sample_spans", no_scan)
    again = PairSampler(catalogue, ClipReader(str(old), SIZE, cache_bytes=1), seed=0, rank=0).pairs(0, 3)
    assert all(np.array_equal(x.frames, y.frames) for x, y in zip(first, again))


class _CountingProxy(http.server.ThreadingHTTPServer):
    """Forwards S3 requests to moto; counts ranged GETs of shard tars and fails the next `fail` of them."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.gets = 0
        self.fail = 0
        self.failed = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _forward(self) -> None:
        server: _CountingProxy = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command == "GET" and self.path.split("?")[0].endswith(".tar") and "Range" in self.headers:
            with server.lock:
                server.gets += 1
                failing = server.fail > 0
                server.fail -= failing
                server.failed += failing
            if failing:
                payload = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                self.send_response(500)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
        connection = http.client.HTTPConnection(server.upstream)
        connection.request(self.command, self.path, body or None,
                           {k: v for k, v in self.headers.items() if k.lower() != "host"} | {"Host": server.upstream})
        response = connection.getresponse()
        data = response.read()
        self.send_response(response.status)
        dropped = ("transfer-encoding", "connection") if self.command == "HEAD" else (
            "transfer-encoding", "connection", "content-length")
        for name, value in response.getheaders():
            if name.lower() not in dropped:
                self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        connection.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


@pytest.fixture()
def proxied_s3(s3_server, dataset, monkeypatch):
    """The dataset in a moto bucket, read through the counting proxy."""
    bucket = s3_server.bucket("loader")
    for path in Path(dataset).rglob("*"):
        if path.is_file():
            s3_server.client.upload_file(str(path), "loader", f"ds/{path.relative_to(dataset)}")
    proxy = _CountingProxy(s3_server.endpoint)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
    yield f"{bucket}/ds", proxy
    proxy.shutdown()


def test_an_object_store_sample_costs_one_get_and_a_transient_error_is_retried(proxied_s3):
    data, proxy = proxied_s3
    catalogue = load_catalogue(data, "train")
    reader = ClipReader(data, SIZE, backoff_s=0.01)
    for clip in catalogue.clips:
        assert reader.pair(clip, np.array([0.2, 0.7]), whole=False) is not None
    assert proxy.gets == len(catalogue.clips) == reader.reads  # one GET per sample
    proxy.fail, proxy.failed = 10**6, 0  # an outage that outlasts the retries: the sample counts as bad, named
    gone = ClipReader(data, SIZE, retries=0)
    assert gone.pair(catalogue.clips[1], np.array([0.2, 0.7]), whole=False) is None
    assert gone.skipped["kc2"][0] == "bad_sample" and "cannot be read after 0 retries" in gone.skipped["kc2"][1]
    attempts = proxy.failed  # GETs the S3 client makes (its own retries) before it reports an error
    proxy.fail, proxy.failed = attempts, 0  # a transient error: a read of ours fails, a retry succeeds
    fresh = ClipReader(data, SIZE, backoff_s=0.01)
    assert fresh.pair(catalogue.clips[1], np.array([0.2, 0.7]), whole=False) is not None
    assert proxy.failed == attempts and fresh.retried >= 1 and not fresh.skipped
