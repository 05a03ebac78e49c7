"""Training-step throughput (samples/s) of the tiny and the full 256 px DPE model.

For each configuration it times the full objective of ``dpe.train_step.train_step``
(both cycles, middle consistency, both self-reconstructions, GAN, probes, then the
discriminator update) and, as the baseline measured in the same run, a plain
reconstruction-only step (encode, both branches reconstruct the input, L1 + perceptual,
one Adam step). It prints samples/s for both and their ratio. On CUDA it also times the
full objective under bfloat16 autocast and prints its speed-up over float32.

The perceptual loss needs VGG19 weights: without ``--vgg-weights`` (and no file in the
torch hub cache) random weights are written to a temporary file and loaded through the
same code path; throughput does not depend on the weight values.

    python benchmarks/bench_train_step.py               # tiny and full, about 2 min on 2 CPU cores
    python benchmarks/bench_train_step.py --steps-full 3   # steadier full figures, longer
    python benchmarks/bench_train_step.py --configs tiny
    python benchmarks/bench_train_step.py --configs --workers 2   # gradient all-reduce only

``--workers N`` (N >= 2) also runs the tiny objective on N gloo processes on this machine and
compares the step time with the gradient all-reduce overlapped with backward
(``dpe.distributed.GradientReducer``, bucketed) against the same buckets sent after backward
(the baseline, as the step did before); and the cost of ``--ema-decay``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dpe.config import ModelConfig
from dpe.losses import l1_distance
from dpe.train_step import TrainConfig, TrainState, make_train_state, train_step
from dpe.vgg import VGG19Features, default_vgg19_weights_path


def synthetic_batch(cfg: ModelConfig, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(2, batch, 3, cfg.size, cfg.size, generator=g) * 2 - 1
    return {
        "frame_a": frames[0].to(device),
        "frame_b": frames[1].to(device),
        "pose_a": torch.randn(batch, 6, generator=g).to(device),
        "pose_b": torch.randn(batch, 6, generator=g).to(device),
        "expression_a": (0.05 * torch.randn(batch, 68, 2, generator=g)).to(device),
        "expression_b": (0.05 * torch.randn(batch, 68, 2, generator=g)).to(device),
    }


def reconstruction_step(state: TrainState, batch: dict[str, torch.Tensor]) -> None:
    """Baseline: both branches reconstruct A from its own motion; no cycles, GAN, probes or D."""
    G, frame = state.generator, batch["frame_a"]
    state.g_optimizer.zero_grad(set_to_none=True)
    code = G.encode(frame)
    outputs = torch.cat([G.reconstruct_pose(code), G.reconstruct_expression(code)])
    targets = torch.cat([frame, frame])
    loss = l1_distance(outputs, targets).mean()
    if state.perceptual is not None:
        loss = loss + state.perceptual(outputs, targets).mean()
    loss.backward()
    state.g_optimizer.step()


def samples_per_second(step, state: TrainState, batch: dict[str, torch.Tensor], warmup: int, steps: int) -> float:
    """Batch size over the median step time (robust to bursts of load on a shared machine)."""
    device = batch["frame_a"].device
    for _ in range(warmup):
        step(state, batch)
    durations = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(state, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        durations.append(time.perf_counter() - start)
    return len(batch["frame_a"]) / statistics.median(durations)


def _rank(rank: int, world: int, init: str, steps: int, batch_size: int, results) -> None:
    import contextlib

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    cfg = ModelConfig.tiny()
    batch = synthetic_batch(cfg, batch_size, torch.device("cpu"))
    timings = {}
    for mode in ("after backward", "overlapped", "overlapped + EMA"):
        torch.manual_seed(0)
        train = TrainConfig(perceptual=False, ema_decay=0.999 if "EMA" in mode else None)
        state = make_train_state(cfg, train, bucket_mb=1)
        if mode == "after backward":  # the hooks never fire: every bucket is sent by finish()
            for reducer in (state.g_reducer, state.d_reducer):
                reducer.armed = lambda last=True: contextlib.nullcontext()
        train_step(state, batch)
        durations = []
        for _ in range(steps):
            dist.barrier()
            start = time.perf_counter()
            train_step(state, batch)
            durations.append(time.perf_counter() - start)
        timings[mode] = statistics.median(durations)
    if rank == 0:
        results.update(timings)
    dist.destroy_process_group()


def reducer_comparison(world: int, steps: int, batch_size: int) -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(world, str(Path(tmp) / "init"), steps, batch_size, results), nprocs=world)
        timings = dict(results)
    base = timings["after backward"]
    for mode, seconds in timings.items():
        print(f"tiny 32px, {world} gloo workers x batch {batch_size}: all-reduce {mode}: {seconds * 1000:.1f} ms/step,"
              f" ratio baseline/this {base / seconds:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="*", choices=("tiny", "full"), default=["tiny", "full"])
    parser.add_argument("--workers", type=int, default=1, help=">= 2: also compare the gradient all-reduce modes")
    parser.add_argument("--batch-tiny", type=int, default=4)
    parser.add_argument("--batch-full", type=int, default=1)
    parser.add_argument("--steps-tiny", type=int, default=10, help="timed steps (after warm-up)")
    parser.add_argument("--steps-full", type=int, default=1, help="timed steps (after warm-up)")
    parser.add_argument("--warmup-tiny", type=int, default=2, help="untimed steps first")
    parser.add_argument("--warmup-full", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vgg-weights", help="VGG19 weights file (default: hub cache, else random)")
    parser.add_argument("--no-perceptual", action="store_true", help="leave the VGG term out")
    args = parser.parse_args()

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        vgg_weights = args.vgg_weights
        if vgg_weights is None and not default_vgg19_weights_path().is_file():
            vgg_weights = str(Path(tmp) / "random_vgg19.pth")
            torch.save(VGG19Features().state_dict(), vgg_weights)
            print("VGG19: random weights (no weights file found; speed is the same)")
        print(f"device={device} threads={torch.get_num_threads()} perceptual={not args.no_perceptual}")

        for name in args.configs:
            cfg = ModelConfig.tiny() if name == "tiny" else ModelConfig()
            batch_size = args.batch_tiny if name == "tiny" else args.batch_full
            steps = args.steps_tiny if name == "tiny" else args.steps_full
            warmup = args.warmup_tiny if name == "tiny" else args.warmup_full
            batch = synthetic_batch(cfg, batch_size, device)
            train = TrainConfig(perceptual=not args.no_perceptual, vgg_weights=vgg_weights)

            torch.manual_seed(0)
            state = make_train_state(cfg, train, device)
            baseline = samples_per_second(reconstruction_step, state, batch, warmup, steps)
            full = samples_per_second(train_step, state, batch, warmup, steps)
            print(
                f"{name:>4} {cfg.size}px batch {batch_size}: full objective {full:.3f} samples/s, "
                f"reconstruction-only {baseline:.3f} samples/s, ratio full/baseline {full / baseline:.3f}"
            )
            if device.type == "cuda":
                state.amp_dtype = torch.bfloat16
                bf16 = samples_per_second(train_step, state, batch, warmup, steps)
                print(f"{name:>4} {cfg.size}px batch {batch_size}: bf16 autocast {bf16:.3f} samples/s, "
                      f"ratio bf16/fp32 {bf16 / full:.3f}")
    if args.workers >= 2:
        reducer_comparison(args.workers, args.steps_tiny, args.batch_tiny)


if __name__ == "__main__":
    main()
