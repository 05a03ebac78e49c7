"""Output store and WebDataset shards: atomic commits, target sizes, exact read-back, crash safety."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pipelines.dataset.layout import stats_path
from pipelines.dataset.schema import ClipSample, SampleMeta, safe_key
from pipelines.dataset.shards import ShardWriter, read_samples
from pipelines.storage import OutputStore, clean_relpath, is_temporary

REPO = Path(__file__).resolve().parents[1]


def make_sample(index: int, frames: int = 8, mp4_bytes: int = 2000, video: str = "-vid_ABC") -> ClipSample:
    rng = np.random.default_rng(index)
    clip_id = f"id{index:05d}/{video}/{index:05d}"
    meta = SampleMeta(clip_id=clip_id, identity=f"id{index:05d}", video_id=video,
                      url=f"https://www.youtube.com/watch?v={video}", split="train", source="voxceleb2",
                      requested_span=(1.0 * index, 1.0 * index + frames / 25),
                      span=(1.0 * index, 1.0 * index + frames / 25), fps=25.0, frames=frames, crop_size=256,
                      source_size=(640, 360), detector="dlib")
    return ClipSample(
        key=safe_key(clip_id),
        mp4=rng.bytes(mp4_bytes),  # stands in for an encoded clip: the shard stores bytes as given
        boxes=rng.uniform(0, 300, (frames, 4)),
        landmarks=rng.uniform(0, 256, (frames, 68, 2)),
        pose=rng.normal(size=(frames, 6)),
        expression=rng.normal(size=(frames, 68, 2)),
        meta=meta,
    )


def temporaries(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if is_temporary(p.name)]


# --- storage -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", "a\\b", "", "a/\x00b", "./"])
def test_paths_that_could_leave_the_store_are_refused(tmp_path, bad):
    store = OutputStore(tmp_path)
    with pytest.raises(ValueError):
        store.write_bytes_atomic(bad, b"x")
    assert list(tmp_path.iterdir()) == []


def test_clean_relpath_normalises_harmless_forms():
    assert clean_relpath("a//b/./c/") == "a/b/c"


def test_local_store_round_trip_and_listing(tmp_path):
    store = OutputStore(tmp_path / "out")
    store.write_bytes_atomic("train/a.tar", b"one")
    store.write_bytes_atomic("train/a.tar", b"two")  # replaces
    store.write_bytes_atomic("manifest/parts/b.parquet", b"p")
    assert store.read_bytes("train/a.tar") == b"two"
    assert store.exists("train/a.tar") and not store.exists("train/missing.tar")
    assert store.list() == ["manifest/parts/b.parquet", "train/a.tar"]
    assert store.list("train") == ["train/a.tar"]
    assert store.list("nothing-here") == []
    assert store.local_path("train/a.tar") == tmp_path / "out/train/a.tar"
    store.delete("train/a.tar")
    store.delete("train/a.tar", missing_ok=True)
    with pytest.raises(FileNotFoundError):
        store.delete("train/a.tar")
    assert temporaries(tmp_path) == []


def test_file_uri_and_subtree_file_system_reach_the_same_files(tmp_path):
    OutputStore(tmp_path).write_bytes_atomic("x/y.bin", b"data")
    by_uri = OutputStore(tmp_path.as_uri())
    subtree = OutputStore("", filesystem=pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()))
    nested = OutputStore("x", filesystem=pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()))
    for store in (by_uri, subtree):
        assert store.is_local and store.list() == ["x/y.bin"] and store.read_bytes("x/y.bin") == b"data"
    assert nested.list() == ["y.bin"]
    assert subtree.local_path("x/y.bin") == tmp_path / "x/y.bin"
    subtree.write_bytes_atomic("z/w.bin", b"w")
    assert (tmp_path / "z/w.bin").read_bytes() == b"w" and temporaries(tmp_path) == []


def test_failed_write_publishes_nothing_and_leaves_no_temporary(tmp_path):
    store = OutputStore(tmp_path)
    store.write_bytes_atomic("a.bin", b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with store.open_output_atomic("a.bin") as output:
            output.file.write(b"half of the new")
            raise RuntimeError("disk full")
    assert store.read_bytes("a.bin") == b"old" and temporaries(tmp_path) == []


def test_unfinished_write_stays_hidden_until_removed(tmp_path):
    store = OutputStore(tmp_path)
    output = store.open_output_atomic("d/a.bin")
    output.file.write(b"partial")  # the writer "dies" here: neither commit nor discard
    assert store.list() == [] and not store.exists("d/a.bin")
    assert len(store.list(include_temporaries=True)) == 1
    assert store.remove_temporaries() == []  # only the folder named, never a recursive sweep
    assert len(store.remove_temporaries("d")) == 1
    assert store.list(include_temporaries=True) == []


def test_clean_up_deletes_only_its_own_temporary_names(tmp_path):
    store = OutputStore(tmp_path)
    foreign = [".draft.part", ".notes.txt.part", "x.part", ".a.0123456789ab.partial"]
    for name in foreign:
        (tmp_path / name).write_bytes(b"someone else's")
    ours = store.open_output_atomic("a.bin")
    ours.file.write(b"partial")
    assert len(store.remove_temporaries()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(foreign)


def test_object_store_path_uploads_only_complete_files():
    memory = pafs.PyFileSystem(pafs.FSSpecHandler(MemoryFileSystem()))
    store = OutputStore("bucket/run1", filesystem=memory)
    assert not store.is_local
    store.write_bytes_atomic("train/a.tar", b"complete")
    with pytest.raises(RuntimeError):
        with store.open_output_atomic("train/b.tar") as output:
            output.file.write(b"partial")
            raise RuntimeError("encoder crashed")
    assert store.list() == ["train/a.tar"] and store.read_bytes("train/a.tar") == b"complete"
    with pytest.raises(ValueError, match="not on a local file system"):
        store.local_path("train/a.tar")


# --- shards ------------------------------------------------------------------------------------


def test_samples_read_back_exactly(tmp_path):
    store = OutputStore(tmp_path)
    samples = [make_sample(i, frames=3 + i, video=v) for i, v in enumerate(["-dash", "_under", "plain"])]
    with ShardWriter(store, "train", 10**9, "batch-a") as writer:
        paths = [writer.write(s) for s in samples]
    assert set(paths) == {"train/batch-a-0000.tar"}
    (record,) = writer.records
    read = list(read_samples([store.local_path(record.path)]))
    assert [r.key for r in read] == [s.key for s in samples]
    for got, sample in zip(read, samples):
        assert got.key[0].isalpha() and "." not in got.key
        assert got.mp4 == sample.mp4
        assert got.meta == sample.meta
        for name in ("boxes", "landmarks", "pose", "expression"):
            array = getattr(got, name)
            assert array.dtype == np.float32
            np.testing.assert_array_equal(array, getattr(sample, name).astype(np.float32))
    assert temporaries(tmp_path) == []


def test_shards_respect_the_target_size_and_record_their_stats(tmp_path):
    store = OutputStore(tmp_path)
    target = 60_000
    samples = [make_sample(i, frames=4 + i % 3, mp4_bytes=3000 + 2000 * (i % 4)) for i in range(20)]
    samples.append(make_sample(99, frames=5, mp4_bytes=100_000))  # larger than the target on its own
    with ShardWriter(store, "train", target, "b7") as writer:
        for sample in samples:
            writer.write(sample)
    records = writer.records
    assert len(records) >= 4
    assert [r.path for r in records] == [f"train/b7-{n:04d}.tar" for n in range(len(records))]
    for record in records:
        size = store.local_path(record.path).stat().st_size
        assert record.bytes == size
        assert size <= target or record.samples == 1
        stats = json.loads(store.read_bytes(stats_path(record.path)))
        assert stats == record.to_json()
        assert len(list(read_samples([store.local_path(record.path)]))) == record.samples
    assert [k for r in records for k in r.keys] == [s.key for s in samples]
    assert sum(r.frames for r in records) == sum(s.frames for s in samples)
    assert sum(r.seconds for r in records) == pytest.approx(sum(s.frames for s in samples) / 25)


def test_an_exception_mid_shard_keeps_committed_shards_only(tmp_path):
    store = OutputStore(tmp_path)
    with pytest.raises(RuntimeError, match="detector crashed"):
        with ShardWriter(store, "train", 40_000, "b") as writer:
            for i in range(10):
                writer.write(make_sample(i, mp4_bytes=8000))
            raise RuntimeError("detector crashed")
    committed = [p for p in store.list() if p.endswith(".tar")]
    assert committed == [r.path for r in writer.records] and committed
    assert sum(len(list(read_samples([store.local_path(p)]))) for p in committed) == sum(
        r.samples for r in writer.records
    )
    assert sum(r.samples for r in writer.records) < 10
    assert temporaries(tmp_path) == []


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[2])
    sys.path.insert(0, os.path.dirname(sys.argv[3]))
    from test_shards import make_sample
    from pipelines.dataset.shards import ShardWriter
    from pipelines.storage import OutputStore

    writer = ShardWriter(OutputStore(sys.argv[1]), "train", 40_000, "b")
    for i in range(7):
        writer.write(make_sample(i, mp4_bytes=8000))
    os.kill(os.getpid(), signal.SIGKILL)  # dies with a shard half written
    """
)


def test_a_killed_writer_leaves_no_partial_tar_visible(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(out), str(REPO), __file__], capture_output=True, timeout=60
    )
    assert result.returncode == -9, result.stderr.decode()
    store = OutputStore(out)
    tars = [p for p in store.list() if p.endswith(".tar")]
    assert tars, "the writer should have committed at least one full shard before dying"
    for tar in tars:
        stats = json.loads(store.read_bytes(stats_path(tar)))
        assert len(list(read_samples([store.local_path(tar)]))) == stats["samples"]
    assert sum(json.loads(store.read_bytes(stats_path(t)))["samples"] for t in tars) < 7
    assert len(temporaries(out)) == 1  # the half-written shard, hidden
    assert store.remove_temporaries("train") and temporaries(out) == []


def test_invalid_samples_and_names_are_refused(tmp_path):
    store = OutputStore(tmp_path)
    writer = ShardWriter(store, "train", 10**6, "b")
    good = make_sample(1)
    bad_shape = dataclasses.replace(good, landmarks=good.landmarks[:, :5])
    with pytest.raises(ValueError, match="landmarks has shape"):
        writer.write(bad_shape)
    writer.write(good)
    with pytest.raises(ValueError, match="already written"):
        writer.write(good)
    long_id = make_sample(2, video="v" * 80)
    with pytest.raises(ValueError, match="more than 85"):
        writer.write(long_id)
    dotted = dataclasses.replace(good, key="k.x")
    with pytest.raises(ValueError, match="must start with a letter"):
        writer.write(dotted)
    assert writer.close()[0].samples == 1
    for split, batch in (("../train", "b"), ("train", "b.c"), ("train", "_b"), ("Train", "b")):
        with pytest.raises(ValueError, match="names"):
            ShardWriter(store, split, 10, batch)


def test_damaged_samples_and_truncated_shards_are_reported_by_name(tmp_path):
    store = OutputStore(tmp_path)
    with ShardWriter(store, "train", 10**9, "b") as writer:
        for index in range(3):
            writer.write(make_sample(index, mp4_bytes=20_000))
    shard = tmp_path / writer.records[0].path
    data = shard.read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 2])
    problems = []
    read = list(read_samples([truncated], on_error=lambda where, error: problems.append((where, str(error)))))
    assert 0 < len(read) < 3
    assert problems and "truncated.tar" in problems[-1][0]
    with pytest.raises(ValueError, match="truncated.tar"):
        list(read_samples([truncated]))
    problems.clear()
    assert list(read_samples([tmp_path / "missing.tar"], on_error=lambda w, e: problems.append(w))) == []
    assert problems == [str(tmp_path / "missing.tar")]


def test_reading_no_shards_yields_nothing():
    assert list(read_samples([])) == []
