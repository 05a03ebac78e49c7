"""Datasets for the training tests.

* `write_dataset`: a small dataset written with the dataset package's own writers (`ShardWriter`,
  manifest parts, shard index) from frames of the real talking-face clip: for fast tests that
  need no Ray or Prefect.
* `prepared_sample`: the real output of `portrait prepare --sample --detector dlib`, made once
  per test session (kept under pytest's session folder, so every module that asks reuses it).
* `random_batch`: a training batch of random frames, poses and expressions, for the step tests.
* `add_damage`: a sample whose video is cut short and a shard that is not a tar, both recorded
  as prepared in the manifest, so a reader must skip and count them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dpe.config import ModelConfig
from dpe.landmarks import project_template, split_pose_expression
from pipelines.dataset import manifest
from pipelines.dataset.layout import SHARD_INDEX_PATH, shard_batch
from pipelines.dataset.schema import ClipSample, SampleMeta
from pipelines.dataset.shards import ShardWriter, read_store_samples
from pipelines.errors import BAD_SAMPLE, UNREADABLE_SHARD
from pipelines.media.video import encode_mp4_bytes
from pipelines.storage import OutputStore

CROP = 64


def _row(key: str, identity: str, split: str, shard: str, frames: int) -> manifest.ManifestRow:
    return manifest.ManifestRow(clip_id=key, key=key, video_id=key, url="", identity=identity, split=split,
                                start_s=None, end_s=None, status=manifest.OK, shard=shard, frames=frames,
                                seconds=frames / 25.0)


def _clip(frames: np.ndarray, key: str, identity: str, split: str, keyframe_interval: int | None = None) -> ClipSample:
    """A sample of square face crops (`CROP` px) with template landmarks that move a little."""
    count = len(frames)
    t = np.linspace(0, 1, count)[:, None]
    pose = np.concatenate([0.2 * np.sin(6 * t), 0.1 * np.cos(4 * t), 0.05 * t,
                           np.full((count, 1), CROP / 2), np.full((count, 1), CROP / 2 + 4),
                           np.full((count, 1), CROP / 3)], axis=1)
    landmarks = project_template(pose).astype(np.float32)
    split_pose, expression = split_pose_expression(landmarks)
    boxes = np.tile(np.array([[0, 0, CROP, CROP]], np.float32), (count, 1))
    meta = SampleMeta(clip_id=key, identity=identity, video_id=key, url="", split=split, source="test",
                      requested_span=(None, None), span=(0.0, count / 25.0), fps=25.0, frames=count, crop_size=CROP,
                      source_size=(176, 144), detector="test")
    mp4 = encode_mp4_bytes(frames, fps=25.0, crf=23, preset="ultrafast", keyframe_interval=keyframe_interval)
    return ClipSample(key=key, mp4=mp4, boxes=boxes, landmarks=landmarks, pose=split_pose.astype(np.float32),
                      expression=expression.astype(np.float32), meta=meta)


def write_dataset(folder: Path, carphone_frames: np.ndarray, clips: dict[str, tuple[str, str, int, int]],
                  keyframe_interval: int | None = None) -> Path:
    """Write clips {key: (identity, split, first frame, frame count)} of the real clip as a dataset
    (mp4s with a keyframe every `keyframe_interval` frames; None: x264's default).

    Each split goes into one shard, as `portrait prepare` writes a small batch.
    """
    store = OutputStore(str(folder))
    crops = np.stack([cv2.resize(frame[10:134, 26:150], (CROP, CROP), interpolation=cv2.INTER_AREA)
                      for frame in carphone_frames])
    rows, index = [], {}
    for split in sorted({split for _, split, _, _ in clips.values()}):
        with ShardWriter(store, split, 1 << 30, "testbatch") as writer:
            for key, (identity, clip_split, first, count) in clips.items():
                if clip_split == split:
                    shard = writer.write(_clip(crops[first:first + count], key, identity, split,
                                                         keyframe_interval))
                    rows.append(_row(key, identity, split, shard, count))
        index[split] = [record.path for record in writer.records]
    manifest.write_part(store, "testbatch", rows)
    store.write_bytes_atomic(SHARD_INDEX_PATH, json.dumps(index).encode())
    return folder


def prepare_sample(base: Path) -> Path:
    """The output of `portrait prepare --sample --detector dlib` under `base` (made on the first call)."""
    from flows.cli import main

    output = base / "prepared-sample"
    if not (output / SHARD_INDEX_PATH).exists():
        code = main(["prepare", "--sample", "--output", str(output), "--detector", "dlib",
                     "--workdir", str(base / "prepare-work")])
        assert code == 0, f"portrait prepare --sample exited with {code}"
    return output


@pytest.fixture(scope="session")
def prepared_sample(tmp_path_factory, ray_cluster, prefect_harness) -> Path:
    """The prepared sample dataset: 4 train clips in 1 shard, 1 test clip (real faces, dlib landmarks)."""
    return prepare_sample(tmp_path_factory.getbasetemp())


def add_damage(dataset: Path, split: str = "train") -> dict[str, str]:
    """Damage a dataset whose `split` has one shard, as archives get damaged: that shard is rewritten
    with one more sample whose mp4 is cut to a third, and a second shard of garbage bytes is added.
    Both are recorded as prepared (manifest part, shard index), each with an identity of its own, so
    the split keeps one readable shard. Returns key -> the failure class a reader must record."""
    store = OutputStore(str(dataset))
    index = json.loads(store.read_bytes(SHARD_INDEX_PATH))
    [shard] = index[split]
    samples = list(read_store_samples(store, [shard]))
    damaged = replace(samples[0], key="kdamaged", mp4=samples[0].mp4[: len(samples[0].mp4) // 3],
                      meta=replace(samples[0].meta, clip_id="damaged", identity="id-damaged"))
    with ShardWriter(store, split, 1 << 30, shard_batch(shard)) as writer:
        for sample in [*samples, damaged]:
            assert writer.write(sample) == shard
    broken_shard = f"{split}/broken-0000.tar"
    store.write_bytes_atomic(broken_shard, b"this is not a tar archive\n" * 64)
    manifest.write_part(store, "damaged", [_row("kdamaged", "id-damaged", split, shard, damaged.frames),
                                           _row("kbroken", "id-broken", split, broken_shard, damaged.frames)])
    index[split] = sorted([shard, broken_shard])
    store.write_bytes_atomic(SHARD_INDEX_PATH, json.dumps(index).encode())
    return {"kdamaged": BAD_SAMPLE, "kbroken": UNREADABLE_SHARD}


def copy_dataset(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def random_batch(n: int, seed: int, size: int = ModelConfig.tiny().size) -> dict[str, torch.Tensor]:
    """`n` pairs of random frames in [-1, 1] with random poses and expressions, the same for a seed."""
    g = torch.Generator().manual_seed(seed)
    frames = {f"frame_{side}": torch.rand(n, 3, size, size, generator=g) * 2 - 1 for side in "ab"}
    pose = {f"pose_{side}": torch.randn(n, 6, generator=g) for side in "ab"}
    expression = {f"expression_{side}": torch.randn(n, 68, 2, generator=g) for side in "ab"}
    return {**frames, **pose, **expression}
