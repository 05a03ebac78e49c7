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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=("tiny", "full"), default=["tiny", "full"])
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
                state.train_config.bf16 = True
                bf16 = samples_per_second(train_step, state, batch, warmup, steps)
                print(f"{name:>4} {cfg.size}px batch {batch_size}: bf16 autocast {bf16:.3f} samples/s, "
                      f"ratio bf16/fp32 {bf16 / full:.3f}")


if __name__ == "__main__":
    main()
