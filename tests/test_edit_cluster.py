"""The editing job on a real multi-node Ray cluster whose sources, drivers and output live in object
storage (moto's S3 server): work spreads over two worker nodes that share no disk for scratch, and
one of them is lost mid-run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from edit_fixtures import edit_clips, tiny_checkpoint  # noqa: F401  (session fixtures)

from pipelines.storage import OutputStore

REPO = Path(__file__).resolve().parents[1]

DRIVER = """
import json, os, sys, time
import ray
from pipelines.edit import job, runner
from pipelines.edit.crops import crop_chunk
from pipelines.edit.settings import EditInputs, EditSettings
from pipelines.runtime import ensure_ray

address, sources, driving, checkpoint, output, workdir, log = sys.argv[1:]


def crop_and_log(chunk, settings):
    \"\"\"The crop stage, logging each attempt with its node; on the node marked doomed, a crop after the first
    one it finished hangs (the node is held busy until the test removes it).\"\"\"
    node = ray.get_runtime_context().get_node_id()
    doomed = os.environ.get("PORTRAIT_TEST_NODE") == "doomed"
    def note(event):
        with open(log, "a") as handle:
            handle.write(json.dumps([event, chunk.job.job_id, chunk.index, node, doomed]) + "\\n")
    note("begin")
    if doomed and any(json.loads(line)[0] == "end" and json.loads(line)[4] for line in open(log)):
        time.sleep(600)
    result = crop_chunk(chunk, settings)
    note("end")
    return result


# blocks packed as for a long queue: two jobs per analysis task, chunks in bundles of two (a lost node
# loses a whole bundle, one of its chunks finished)
runner.block_sizes = lambda todo, cpus, chunk_frames: (2, 2 * chunk_frames)
ensure_ray(address)
settings = EditSettings(output=output, checkpoint=checkpoint, detector="dlib", preset="ultrafast", chunk_frames=16,
                        model_cpus=0.5, workdir=workdir)
edit_plan, weights = job.plan(EditInputs(sources=sources, driving=driving), settings)
rows = []
def record(row):
    rows.append(row)
    edit_plan.table.record(row)
runner.run_ray(edit_plan.windows, edit_plan.pending.todo, weights, settings, edit_plan.model, record,
               crop=crop_and_log)
edit_plan.table.flush()
job.finalize(edit_plan, edit_plan.table.tally, settings)
print(json.dumps([dict(job_id=r.job_id, status=r.status, message=r.message, output=r.output, frames=r.frames)
                  for r in rows]))
"""

VIDEOS = 4


def _upload(s3_server, bucket: str, edit_clips) -> None:
    for number in range(VIDEOS):
        s3_server.client.upload_file(str(edit_clips["short.mp4"]), bucket, f"archive/v{number}.mp4")
    s3_server.client.upload_file(str(edit_clips["driving.mp4"]), bucket, "drivers/driving.mp4")


def _objects(s3_server, bucket: str, prefix: str) -> list[str]:
    listed = s3_server.client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for item in listed.get("Contents", []))


def _add_worker_node(two_node_cluster, monkeypatch, marker: str):
    """One more worker node (2 CPUs), started as the cluster's own nodes were: without the user's AWS_*
    settings, which reach its tasks only through the job's runtime environment."""
    with monkeypatch.context() as patched:
        for name in [name for name in list(os.environ) if name.startswith("AWS_")]:
            patched.delenv(name)
        patched.setenv("PORTRAIT_TEST_NODE", marker)
        return two_node_cluster.add_node(2)


def _log(path: Path) -> list[list]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _attempts(events: list[list]) -> dict[tuple[str, int], list[list]]:
    """Crop attempts per chunk, in the order they began."""
    attempts: dict[tuple[str, int], list[list]] = {}
    for event in events:
        if event[0] == "begin":
            attempts.setdefault((event[1], event[2]), []).append(event)
    return attempts


@pytest.mark.slow
def test_edit_on_object_storage_spreads_over_nodes_and_survives_losing_one(two_node_cluster, s3_server, edit_clips,
                                                                          tiny_checkpoint, tmp_path, monkeypatch):
    """Sources, driver and output in S3, blocks packed; a second worker node joins, finishes a chunk, and is lost
    (raylet and workers killed at once) while it holds another; the run ends with every video ok, once, in the
    store."""
    bucket = "edit-cluster"
    s3_server.bucket(bucket)
    _upload(s3_server, bucket, edit_clips)
    log = tmp_path / "crops.jsonl"
    added = _add_worker_node(two_node_cluster, monkeypatch, "doomed")
    try:
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER, two_node_cluster.address, f"s3://{bucket}/archive/*.mp4",
             f"s3://{bucket}/drivers/driving.mp4", str(tiny_checkpoint), f"s3://{bucket}/edited",
             str(two_node_cluster.private / "work"), str(log)],
            cwd=REPO, env={**two_node_cluster.env(), "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        while True:  # until the added node holds a chunk (its crop hangs) after finishing one
            events = _log(log)
            doomed = [e for e in events if e[4]]
            if 1 <= sum(e[0] == "end" for e in doomed) < sum(e[0] == "begin" for e in doomed):
                break
            if driver.poll() is not None:
                pytest.fail(f"the run ended before the added node took a second chunk ({[e[:3] for e in doomed]}): "
                            f"{driver.communicate()[0][-2000:]}")
            assert time.monotonic() < deadline, "no chunk reached the added node"
            time.sleep(0.2)
        two_node_cluster.remove_node(added)
        added = None
        out, err = driver.communicate(timeout=240)
    finally:
        if added is not None:
            two_node_cluster.remove_node(added)
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, err[-4000:]
    # Ray's log monitor may print workers' lines to the driver's stdout after the results line
    rows = json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("[{")))
    assert sorted(row["job_id"] for row in rows) == [f"v{n}.mp4" for n in range(VIDEOS)], "one row per video"
    assert all(row["status"] == "ok" and row["frames"] == 45 for row in rows), [row["message"] for row in rows]
    assert _objects(s3_server, bucket, "edited/v") == [f"edited/v{n}.mp4" for n in range(VIDEOS)]
    assert _objects(s3_server, bucket, "edited/.segments/") in ([], ["edited/.segments/"]), \
        "segments are removed once joined, and no empty folder marker is left per job"
    stored = pq.read_table(f"{bucket}/edited/results.parquet", filesystem=OutputStore(f"s3://{bucket}").filesystem)
    assert sorted(stored.column("job_id").to_pylist()) == [f"v{n}.mp4" for n in range(VIDEOS)]

    events = _log(log)
    attempts = _attempts(events)
    assert len(attempts) == 3 * VIDEOS, "every chunk was cropped"
    began_on_lost = {chunk for chunk, tries in attempts.items() if tries[0][4]}
    finished_on_lost = {(e[1], e[2]) for e in events if e[0] == "end" and e[4]}
    held = began_on_lost - finished_on_lost
    # its crop tasks each take a bundle of two chunks: one or two of them can be held when it is lost
    assert held and finished_on_lost, "the added node finished a chunk, then held one when it was lost"
    for chunk, tries in attempts.items():
        if chunk in held:  # redone once, on the node that is left
            assert len(tries) == 2 and not tries[1][4], tries
        elif chunk in began_on_lost:  # finished there; redone once elsewhere only if its output was lost with the node
            assert len(tries) <= 2 and not any(t[4] for t in tries[1:]), tries
        else:  # cropped on the node that is left: redone at most once, when the model actor that held its
            # edited crops ran on the lost node (Ray Data frees a consumed block, so the lost output is rebuilt
            # from the crop up), never twice
            assert len(tries) <= 2 and not any(t[4] for t in tries), tries
