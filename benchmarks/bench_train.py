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
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a prepared dataset (default: prepare the bundled sample)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4, help="pairs per worker per step")
    parser.add_argument("--steps", type=int, default=25, help="measured steps per configuration (plus 5 of warm-up)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak (dense bf16) for the MFU")
    args = parser.parse_args()

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
