"""Chunks travel between the Ray Data stages with their crops as tensor columns, not inside pickles."""

import pickle

import numpy as np

from pipelines.edit.chunks import ChunkWork, JobWork
from pipelines.edit.job_table import EditJob
from pipelines.edit.stage_io import PIXEL_COLUMNS, from_columns, to_columns


def chunks() -> list[ChunkWork]:
    job = EditJob(source="a.mp4", driving="b.png", output="a.mp4", mode="expression", strength=1.0,
                  motion="relative", driving_policy="hold", face="largest")
    work = JobWork(job, "0" * 16, 0, 32)
    rng = np.random.default_rng(3)
    cropped = ChunkWork(work, index=0, total=3, pts=np.arange(5),
                        source_crops=rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8),
                        driving_crops=rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8))
    edited = ChunkWork(work, index=1, total=3, pts=np.arange(2), edited=rng.integers(0, 256, (2, 32, 32, 3),
                                                                                      dtype=np.uint8))
    empty = ChunkWork(work, index=2, total=3, pts=np.arange(0), source_crops=np.zeros((0, 32, 32, 3), np.uint8))
    return [cropped, edited, empty]


def same(a: ChunkWork, b: ChunkWork) -> None:
    assert (a.index, a.total, list(a.pts)) == (b.index, b.total, list(b.pts))
    for name in PIXEL_COLUMNS:
        left, right = getattr(a, name), getattr(b, name)
        assert (left is None) == (right is None), name
        if left is not None:
            np.testing.assert_array_equal(left, right)


def test_crops_leave_the_pickles_and_come_back_intact():
    originals = chunks()
    columns = to_columns(originals)
    assert all(len(blob) < 2000 for blob in columns["payload"])  # the pixels are not in the pickle
    assert sum(len(pickle.dumps(c)) for c in originals) > 15000
    for original, back in zip(originals, from_columns(columns), strict=True):
        same(original, back)
    assert originals[0].source_crops is not None  # the caller's chunks are left as they were


def test_columns_pass_through_ray_data_stages(ray_cluster):
    import ray

    def stage(batch):  # what a stage does: unpack, work, pack
        return to_columns(from_columns(batch))

    originals = chunks()
    made = to_columns(originals)  # captured by value: the workers cannot import this test module
    dataset = ray.data.from_items([{"n": 0}], override_num_blocks=1)
    dataset = dataset.map_batches(lambda _: made, batch_size=1, batch_format="numpy")
    dataset = dataset.map_batches(stage, batch_size=1, batch_format="numpy", zero_copy_batch=True)
    back = [item for batch in dataset.iter_batches(batch_size=1, batch_format="numpy") for item in from_columns(batch)]
    assert len(back) == 3
    for original, returned in zip(originals, sorted(back, key=lambda c: c.index), strict=True):
        same(original, returned)
