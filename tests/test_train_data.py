"""Training data: the catalogue of a prepared dataset, in-memory decoding, the pair sampler, skipped samples.

Runs on a small dataset written with the dataset package's own writers from the real talking-face
clip (no Ray, no Prefect); the real prepared sample is used by tests/test_train_job.py.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from train_support import add_damage, write_dataset

from pipelines.dataset.layout import SHARD_INDEX_PATH
from pipelines.errors import UNREADABLE_SHARD
from pipelines.train.clips import ClipReader, TrainingDataError, load_catalogue
from pipelines.train.pairs import PairSampler, fixed_pairs, pairs_to_batch

SIZE = 32
CLIPS = {  # key: (identity, split, first frame of the real clip, frames)
    "kc1": ("id1", "train", 0, 30),
    "kc2": ("id1", "train", 30, 24),
    "kc3": ("id2", "train", 60, 30),
    "kt1": ("id3", "test", 90, 30),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, carphone_frames):
    return write_dataset(tmp_path_factory.mktemp("train-data") / "ds", carphone_frames, CLIPS)


@pytest.fixture()
def damaged(dataset, tmp_path):
    copy = tmp_path / "damaged"
    shutil.copytree(dataset, copy)
    return copy, add_damage(copy)


def test_catalogue_reads_the_records_and_groups_clips_by_identity(dataset):
    catalogue = load_catalogue(str(dataset), "train")
    assert [clip.key for clip in catalogue.clips] == ["kc1", "kc2", "kc3"]
    assert {identity: [c.key for c in clips] for identity, clips in catalogue.by_identity.items()} == {
        "id1": ["kc1", "kc2"], "id2": ["kc3"]}
    assert [clip.frames for clip in catalogue.clips] == [30, 24, 30]
    assert len(catalogue.shards) == 1 and all(clip.shard == catalogue.shards[0] for clip in catalogue.clips)


def test_a_missing_dataset_or_an_empty_split_is_refused_with_the_fix(dataset, tmp_path):
    with pytest.raises(TrainingDataError, match="does not exist.*portrait prepare"):
        load_catalogue(str(tmp_path / "nowhere"), "train")
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(TrainingDataError, match="no shards.json"):
        load_catalogue(str(tmp_path / "unfinished"), "train")
    with pytest.raises(TrainingDataError, match=r"no shards in split 'val' \(splits: \['test', 'train'\]\)"):
        load_catalogue(str(dataset), "val")
    emptied = tmp_path / "emptied"
    shutil.copytree(dataset, emptied)
    shutil.rmtree(emptied / "manifest")
    with pytest.raises(TrainingDataError, match="records no prepared clip"):
        load_catalogue(str(emptied), "train")


def test_clips_are_decoded_in_memory_at_model_size_with_a_bounded_cache(dataset):
    catalogue = load_catalogue(str(dataset), "train")
    one_clip = 30 * SIZE * SIZE * 3
    reader = ClipReader(str(dataset), SIZE, cache_bytes=one_clip)
    first = reader.load(catalogue.clips[0])
    assert first.frames.shape == (30, SIZE, SIZE, 3) and first.frames.dtype == np.uint8
    assert first.pose.shape == (30, 6) and first.expression.shape == (30, 68, 2)
    assert 40 < first.frames.mean() < 220  # a real picture, not a blank
    assert reader.load(catalogue.clips[0]) is first and reader.decoded == 1  # served from the cache
    for clip in catalogue.clips:
        reader.load(clip)
        assert reader.cached_bytes <= one_clip
    assert reader.decoded == 3
    assert reader.load(catalogue.clips[0]) is not first and reader.decoded == 4  # evicted, decoded again


def test_pairs_of_a_step_depend_only_on_seed_rank_and_step(dataset):
    catalogue = load_catalogue(str(dataset), "train")
    straight = PairSampler(catalogue, ClipReader(str(dataset), SIZE), seed=3, rank=0)
    history = [straight.pairs(step, 4) for step in range(6)]
    resumed = PairSampler(catalogue, ClipReader(str(dataset), SIZE), seed=3, rank=0)
    again = resumed.pairs(5, 4)  # straight to step 5, as after a resume
    assert [(p.key, p.a, p.b) for p in again] == [(p.key, p.a, p.b) for p in history[5]]
    assert np.array_equal(pairs_to_batch(again)["frame_a"], pairs_to_batch(history[5])["frame_a"])
    drawn = [(p.key, p.a, p.b) for step in history for p in step]
    assert len(set(drawn)) > len(drawn) // 2  # steps differ from each other
    assert {key for key, _, _ in drawn} == {"kc1", "kc2", "kc3"}


def test_one_shard_serves_two_ranks_with_different_pairs(dataset):
    catalogue = load_catalogue(str(dataset), "train")
    assert len(catalogue.shards) == 1
    ranks = [PairSampler(catalogue, ClipReader(str(dataset), SIZE), seed=0, rank=rank) for rank in (0, 1)]
    batches = [[(p.key, p.a, p.b) for step in range(5) for p in sampler.pairs(step, 2)] for sampler in ranks]
    assert all(len(batch) == 10 for batch in batches)
    assert batches[0] != batches[1]


def test_a_batch_has_the_training_step_layout(dataset):
    catalogue = load_catalogue(str(dataset), "train")
    batch = PairSampler(catalogue, ClipReader(str(dataset), SIZE), seed=0, rank=0).batch(0, 3)
    assert {key: value.shape for key, value in batch.items()} == {
        "frame_a": (3, 3, SIZE, SIZE), "frame_b": (3, 3, SIZE, SIZE), "pose_a": (3, 6), "pose_b": (3, 6),
        "expression_a": (3, 68, 2), "expression_b": (3, 68, 2)}
    assert all(value.dtype == np.float32 for value in batch.values())
    assert -1.0 <= batch["frame_a"].min() < batch["frame_a"].max() <= 1.0


def test_the_frame_window_limits_decoding_and_drawing(dataset):
    catalogue = load_catalogue(str(dataset), "train")
    reader = ClipReader(str(dataset), SIZE, frame_window=10)
    pairs = [p for step in range(8) for p in PairSampler(catalogue, reader, seed=0, rank=0).pairs(step, 4)]
    assert max(max(p.a, p.b) for p in pairs) < 10
    assert all(reader.load(clip).length == 10 for clip in catalogue.clips)


def test_a_damaged_sample_and_an_unreadable_shard_are_skipped_and_counted(damaged):
    folder, expected = damaged
    catalogue = load_catalogue(str(folder), "train")
    assert {"kdamaged", "kbroken"} <= {clip.key for clip in catalogue.clips}
    reader = ClipReader(str(folder), SIZE)
    sampler = PairSampler(catalogue, reader, seed=0, rank=0)
    drawn = {p.key for step in range(12) for p in sampler.pairs(step, 4)}
    assert {key: failure for key, (failure, _) in reader.skipped.items()} == expected
    assert "kdamaged" in reader.skipped["kdamaged"][1] and "broken-0000.tar" in reader.skipped["kbroken"][1]
    assert drawn == {"kc1", "kc2", "kc3"}
    # skipping is a property of the data, so the pairs stay reproducible
    again = PairSampler(catalogue, ClipReader(str(folder), SIZE), seed=0, rank=0)
    assert [(p.key, p.a, p.b) for p in again.pairs(7, 4)] == [(p.key, p.a, p.b) for p in sampler.pairs(7, 4)]


def test_a_shard_missing_from_disk_is_unreadable(dataset, tmp_path):
    folder = tmp_path / "lost"
    shutil.copytree(dataset, folder)
    catalogue = load_catalogue(str(folder), "train")
    (folder / catalogue.shards[0]).unlink()
    reader = ClipReader(str(folder), SIZE)
    assert reader.load(catalogue.clips[0]) is None
    assert reader.skipped["kc1"][0] == UNREADABLE_SHARD


def test_no_usable_clip_left_is_an_error_naming_the_skips(dataset, tmp_path):
    folder = tmp_path / "all-bad"
    shutil.copytree(dataset, folder)
    catalogue = load_catalogue(str(folder), "train")
    (folder / catalogue.shards[0]).write_bytes(b"garbage")
    with pytest.raises(TrainingDataError, match="no usable clip left.*3 unreadable_shard"):
        PairSampler(catalogue, ClipReader(str(folder), SIZE), seed=0, rank=0).pairs(0, 1)


def test_fixed_pairs_spread_over_clips_and_stay_the_same(dataset):
    catalogue = load_catalogue(str(dataset), "test")
    first = fixed_pairs(catalogue, ClipReader(str(dataset), SIZE), 3, seed=0)
    second = fixed_pairs(catalogue, ClipReader(str(dataset), SIZE), 3, seed=0)
    assert [(p.key, p.a, p.b) for p in first] == [(p.key, p.a, p.b) for p in second]
    assert {p.key for p in first} == {"kt1"} and len(first) == 3
    assert json.loads((dataset / SHARD_INDEX_PATH).read_text())["test"] == list(catalogue.shards)


def test_portrait_train_refuses_a_missing_dataset_before_starting_anything(tmp_path, capsys):
    from flows.cli import main

    assert main(["train", "--data", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "runs")]) == 2
    assert "does not exist; give --data the output folder of `portrait prepare`" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_an_object_store_dataset_gives_the_same_pairs_through_ranged_reads(dataset, s3_server):
    import pyarrow.fs as pafs

    bucket = s3_server.bucket("train-data")
    pafs.copy_files(str(dataset), f"{bucket.removeprefix('s3://')}/ds", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=pafs.FileSystem.from_uri(bucket)[0])
    remote = load_catalogue(f"{bucket}/ds", "train")
    local = load_catalogue(str(dataset), "train")
    assert [(c.key, c.identity, c.frames) for c in remote.clips] == [(c.key, c.identity, c.frames) for c in local.clips]
    batches = [PairSampler(catalogue, ClipReader(catalogue.data, SIZE), seed=1, rank=0).batch(4, 3)
               for catalogue in (remote, local)]
    assert all(np.array_equal(batches[0][key], batches[1][key]) for key in batches[1])
