"""`portrait prepare` at VoxCeleb2 scale: time to plan, time to the first recorded clip, clips/s and
driver memory, as the metadata grows; and the worker CPU a video that answers 404 costs.

Generated VoxCeleb2-style trees (txt/<identity>/<video>/<utterance>.txt, about 7 utterances per
video as in VoxCeleb2, `--rows` box rows per file) are prepared against a loopback server that
answers 404 for every id except a `--real-fraction` of them, which serve the project's sample
talking-face video. Each size runs in a fresh process (its own local Ray and embedded Prefect
server), for at most `--seconds` after its first recorded clip, then stops the way SIGTERM does
(`runtime.request_stop`): the figures are rates, not totals. `--plan-only` sizes only read the
metadata through the streamed planner (the driver's and its parsing processes' CPU and memory).
`--rerun-state` sizes write a manifest of that many clips (parts of 56 rows, 70% ok) and measure
what a rerun holds to decide what it skips.

Baselines, measured in the same run: a new yt-dlp instance per video for the 404 cost; the smallest
size for the rates: the ratio clips/s(size) / clips/s(smallest)
should stay above 0.8 (clips/s does not fall as the metadata grows), and the time to the first
clip should not grow with it. Run:

    python benchmarks/bench_prepare_scale.py --sizes 2000 100000 --plan-only 1100000 --rerun-state 1100000
        [--real-fraction 0.01]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

UTTERANCES_PER_VIDEO = 7
VIDEOS_PER_IDENTITY = 25


def write_tree(root: Path, utterances: int, rows: int) -> Path:
    """A VoxCeleb2-style metadata tree of `utterances` files (kept between runs under `root`)."""
    tree = root / f"vox2-{utterances}-{rows}"
    if (tree / "done").exists():
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    header = "Identity  : \t{identity}\nReference : \t{video}\nOffset    : \t1\nFV Conf   : \t16.6\t(1)\n" \
             "ASD Conf  : \t4.4\n\nFRAME \tX \tY \tW \tH \n"
    for index in range(utterances):
        video_index, utterance = divmod(index, UTTERANCES_PER_VIDEO)
        identity = f"id{video_index // VIDEOS_PER_IDENTITY:05d}"
        video = f"v{video_index:07d}"
        folder = tree / "txt" / identity / video
        if utterance == 0:
            folder.mkdir(parents=True, exist_ok=True)
        first = 1 + utterance * 40  # utterances of one video follow each other (1.6 s each at 25 fps)
        body = "".join(f"{first + row:05d}\t0.300\t0.200\t0.350\t0.450\n" for row in range(rows))
        (folder / f"{utterance:05d}.txt").write_text(header.format(identity=identity, video=video) + body)
    (tree / "done").write_text("")
    return tree


def video_ids(utterances: int) -> list[str]:
    return [f"v{index:07d}" for index in range(-(-utterances // UTTERANCES_PER_VIDEO))]


def driver_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def children_rss_mb() -> float:
    """The resident memory of this process's children now (the plan's parsing processes)."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if int(fields.get("PPid", "0")) == os.getpid():
            total += int(fields.get("VmRSS", "0 kB").split()[0])
    return total / 1024


def plan_only(tree: Path, work: Path) -> dict:
    from pipelines.prepare import job
    from pipelines.prepare.settings import PrepareSettings, SourceInputs
    from pipelines.prepare.sources.voxceleb import plan_processes

    settings = PrepareSettings(output=str(work / "out"), workdir=str(work / "work"), detector="dlib")
    peak_children, done = [0.0], threading.Event()

    def sample() -> None:  # the children's memory, every half second (their RSS includes shared pages)
        while not done.wait(0.5):
            peak_children[0] = max(peak_children[0], children_rss_mb())

    threading.Thread(target=sample, daemon=True).start()
    started, cpu = time.perf_counter(), time.process_time()
    planner = job.Planner(SourceInputs(vox2_txt=(str(tree),)), settings)
    first = None
    for _ in planner.batches():
        first = first or time.perf_counter() - started
    done.set()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"plan_s": round(time.perf_counter() - started, 2), "plan_cpu_s": round(time.process_time() - cpu, 1),
            "children_cpu_s": round(children.ru_utime + children.ru_stime, 1), "processes": plan_processes(),
            "first_batch_s": round(first or 0, 3), "clips": planner.clips, "batches": planner.batch_count,
            "driver_peak_mb": round(driver_peak_mb()), "children_peak_mb": round(peak_children[0])}


def full_run(tree: Path, utterances: int, work: Path, real_fraction: float, seconds: float) -> dict:
    from flows.prepare_flow import prepare_dataset
    from flows.services import job_services
    from pipelines.dataset import manifest
    from pipelines.dataset.layout import PARTS_PREFIX
    from pipelines.runtime import request_stop
    from pipelines.sample.media import make_sample_media
    from pipelines.sample.server import serve_directory
    from pipelines.storage import OutputStore

    served = work / "served"
    served.mkdir(parents=True)
    talk = make_sample_media(work / "media")["talk.mp4"]
    ids = video_ids(utterances)
    for video in ids[::max(1, round(1 / real_fraction))] if real_fraction > 0 else []:
        os.link(talk, served / f"{video}.mp4")
    output = work / "out"
    marks: dict[str, float] = {}

    def watch() -> None:  # the first batch part (not the planner's own parts) is the first recorded clip
        store = OutputStore(str(output))
        while "end" not in marks:
            if output.exists() and any(p.rsplit("/", 1)[-1][:-8].rsplit("-", 1)[-1].isdigit()
                                       for p in store.list(PARTS_PREFIX)):
                marks.setdefault("first", time.perf_counter())
                if time.perf_counter() - marks["first"] > seconds:
                    request_stop()
                    return
            time.sleep(0.2)

    with serve_directory(served) as server, job_services(None):
        watcher = threading.Thread(target=watch, daemon=True)
        started = time.perf_counter()
        watcher.start()
        summary = prepare_dataset(vox2_txt=[str(tree)], output=str(output), workdir=str(work / "work"),
                                  detector="dlib", retries=0, url_template=server.url("{id}.mp4"))
        marks["end"] = time.perf_counter()
    rows = manifest.read_parts(OutputStore(str(output)))
    recorded = sum(1 for row in rows if row.failure_class != "shard_lost")
    first = marks.get("first", marks["end"])
    return {"first_clip_s": round(first - started, 1), "recorded": recorded, "ok": summary.get("ok", 0),
            "clips_per_s": round(recorded / max(marks["end"] - started - (first - started), 1e-6), 1),
            "stopped": bool(summary.get("stopped")), "driver_peak_mb": round(driver_peak_mb())}


def write_manifest(root: Path, clips: int, per_part: int = 56) -> Path:
    """A dataset folder whose manifest parts record `clips` clips (a batch of 8 videos of 7 clips per
    part; 70% ok in 20-clip shards, the rest failed as VoxCeleb's missing videos do), kept under `root`."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.dataset import manifest
    from pipelines.dataset.layout import part_path

    folder = root / f"manifest-{clips}"
    if (folder / "done").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    for first in range(0, clips, per_part):
        index = np.arange(first, min(clips, first + per_part))
        videos = index // UTTERANCES_PER_VIDEO
        ids = [f"id{v // VIDEOS_PER_IDENTITY:05d}/v{v:07d}/{i % UTTERANCES_PER_VIDEO:05d}" for v, i in zip(videos, index)]
        ok = rng.random(len(index)) < 0.7
        batch = f"r-{first // per_part:06d}"
        columns = {
            "clip_id": ids, "key": [f"k{i.replace('/', '_2f_')}" for i in ids],
            "video_id": [f"v{v:07d}" for v in videos], "url": [f"https://www.youtube.com/watch?v=v{v:07d}" for v in videos],
            "identity": [f"id{v // VIDEOS_PER_IDENTITY:05d}" for v in videos], "split": ["train"] * len(ids),
            "start_s": index % 7 * 1.6, "end_s": index % 7 * 1.6 + 1.6,
            "status": np.where(ok, "ok", "failed").tolist(),
            "failure_class": [None if o else "not_found" for o in ok],
            "message": ["" if o else f"clip {i}: HTTP Error 404: Not Found" for o, i in zip(ok, ids)],
            "shard": [f"train/{batch}-{k // 20:04d}.tar" if o else None for k, o in enumerate(ok)],
            "frames": np.where(ok, 40, 0), "seconds": np.where(ok, 1.6, 0.0),
            "timings_json": ["{}"] * len(ids), "attempt": np.ones(len(ids), np.int32),
            "source": ["voxceleb2"] * len(ids), "origin": [f"/data/vox2/txt/{i}.txt" for i in ids],
            "updated_at": [time.time_ns() // 1000] * len(ids),
        }
        table = pa.table({name: columns.get(name, [None] * len(ids)) for name in manifest.SCHEMA.names},
                         schema=manifest.SCHEMA)
        path = folder / "out" / part_path(batch)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    (folder / "done").write_text("")
    return folder


def rerun_state(folder: Path, as_rows: bool) -> dict:
    """Driver memory and time to learn what a rerun skips: the planner's column-wise read
    (`manifest.read_states`) or, as the baseline, every part as `ManifestRow` objects."""
    from pipelines.dataset import manifest
    from pipelines.storage import OutputStore

    store = OutputStore(str(folder / "out"))
    before, started = driver_peak_mb(), time.perf_counter()
    if as_rows:
        state = manifest.load_state(store)
        todo = sum(row.status == manifest.FAILED for row in state.values())
    else:
        attempts, again = manifest.read_states(store).attempts(retry_all=True)
        todo = len(again)
        state = attempts
    return {"clips": len(state), "to_redo": todo, "seconds": round(time.perf_counter() - started, 1),
            "driver_peak_mb": round(driver_peak_mb()), "added_mb": round(driver_peak_mb() - before)}


def worker_cpu_per_404(videos: int = 20, fresh_downloader: bool = False) -> float:
    """Worker CPU of one 404 video on a warm worker (median, ms): thread CPU time around
    `prepare_video`. `fresh_downloader` builds a new yt-dlp instance per video (the baseline)."""
    import threading as threads

    from pipelines.prepare import download
    from pipelines.prepare.requests import ClipRequest
    from pipelines.prepare.settings import DownloadOptions
    from pipelines.prepare.worker import WorkerSettings, prepare_video
    from pipelines.sample.server import serve_directory

    costs = []
    with tempfile.TemporaryDirectory() as folder, serve_directory(folder) as server:
        settings = WorkerSettings(download_dir=f"{folder}/dl", detector="dlib", download=DownloadOptions(retries=0))
        for index in range(videos + 1):
            requests = [ClipRequest(clip_id=f"v{index}/{k}", video_id=f"v{index}", url=server.url(f"v{index}.mp4"),
                                    identity="i", start_s=1.0 + 2 * k, end_s=2.5 + 2 * k)
                        for k in range(UTTERANCES_PER_VIDEO)]
            if fresh_downloader:
                download._DOWNLOADERS = threads.local()
            before = time.thread_time()
            prepare_video(requests, settings)
            if index:  # the first call imports and warms up: once per worker process
                costs.append(time.thread_time() - before)
    return round(sorted(costs)[len(costs) // 2] * 1000, 1)


def one(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bps", dir="/tmp"))
    try:
        tree = None if args.state else write_tree(Path(args.trees), args.one, args.rows)
        if args.state:
            result = rerun_state(write_manifest(Path(args.trees), args.one), as_rows=args.state == "rows")
        else:
            result = plan_only(tree, work) if args.plan else full_run(tree, args.one, work, args.real_fraction,
                                                                       args.seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[2000, 100000])
    parser.add_argument("--plan-only", type=int, nargs="*", default=[1100000])
    parser.add_argument("--real-fraction", type=float, default=0.0, help="ids that serve a real clip (0.01: 1%%)")
    parser.add_argument("--seconds", type=float, default=60.0, help="run time measured after the first clip")
    parser.add_argument("--rerun-state", type=int, nargs="*", default=[1100000],
                        help="manifest sizes (clips) at which to measure a rerun's state, against reading rows")
    parser.add_argument("--rows", type=int, default=40, help="box rows per utterance file")
    parser.add_argument("--trees", default="/tmp/bench-prepare-scale", help="where generated trees are kept")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--plan", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--state", choices=("columns", "rows"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args)
    kept, fresh = worker_cpu_per_404(), worker_cpu_per_404(fresh_downloader=True)
    print(f"worker CPU of a 404 video (warm worker, {UTTERANCES_PER_VIDEO} clips): {kept} ms with the worker's "
          f"yt-dlp kept; {fresh} ms with a new yt-dlp per video (baseline): {fresh / kept:.1f}x (target < 50 ms)")
    results = {}
    for size, plan in [(size, False) for size in args.sizes] + [(size, True) for size in args.plan_only]:
        command = [sys.executable, __file__, "--one", str(size), "--rows", str(args.rows), "--trees", args.trees,
                   "--real-fraction", str(args.real_fraction), "--seconds", str(args.seconds)]
        done = subprocess.run(command + (["--plan"] if plan else []), capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            print(f"{size}: failed\n{done.stderr[-3000:]}")
            continue
        results[(size, plan)] = result = json.loads(lines[-1][7:])
        print(f"{size:>9} utterances {'plan only' if plan else 'run':>9}: {json.dumps(result)}", flush=True)
    for size in args.rerun_state:
        found = {}
        for how in ("rows", "columns"):
            command = [sys.executable, __file__, "--one", str(size), "--state", how, "--trees", args.trees]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            found[how] = json.loads(lines[-1][7:]) if lines else None
            print(f"{size:>9} clips rerun state as {how:>7}: {found[how] or done.stderr[-3000:]}", flush=True)
        if all(found.values()):
            print(f"rerun state memory, rows / columns: {found['rows']['added_mb'] / max(found['columns']['added_mb'], 1):.1f}x")
    runs = [(size, r) for (size, plan), r in results.items() if not plan]
    if len(runs) >= 2:
        (small, base), *rest = sorted(runs)
        for size, result in rest:
            print(f"clips/s at {size} / at {small}: {result['clips_per_s'] / max(base['clips_per_s'], 1e-9):.2f} "
                  f"(target >= 0.8); first clip {result['first_clip_s']} s vs {base['first_clip_s']} s")


if __name__ == "__main__":
    main()
