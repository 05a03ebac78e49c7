"""Inference throughput of DPE expression transfer (frames/s), precomputed source vs re-encoding.

The bulk-editing job edits many driving frames against one source still. The precomputed path
encodes the source once (``encode_source``) and per batch only encodes the driving frames and
runs the generator. The baseline, measured in the same run with the same weights and inputs,
re-encodes the source for every frame (what the official demo does). The printed ratio is
``precomputed fps / baseline fps``.

On CPU the script also repeats the measurement with glibc malloc serving large blocks from the
heap (see ``pipelines.edit.model.keep_large_blocks_on_heap``): with default settings every large activation is a
fresh mmap whose pages the kernel must fault in and zero, which costs more than the
convolutions once a batch holds a few frames.

Weights are random (official 256x256 architecture) unless ``--checkpoint`` names an official
``dpe.pt``: the speed does not depend on the values. On CPU the model runs in float32; on CUDA
(when available) in float32 and under bf16 autocast.

    python benchmarks/bench_inference.py                 # batch 1 and 16, about 1.5 min on 2 cores
    python benchmarks/bench_inference.py --batch-sizes 1 --iters 5
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch

from dpe.checkpoint import load_official_generator
from dpe.config import ModelConfig
from dpe.editing import encode_source, expression_transfer
from dpe.model import DPEGenerator
from pipelines.edit.model import keep_large_blocks_on_heap


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="driving frames per call")
    p.add_argument("--iters", type=int, default=None,
                   help="timed calls per batch size and path (default: 2 for batch <= 4, else 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls at batch 1 before timing")
    p.add_argument("--device", default="auto", help="'cpu', 'cuda' or 'auto' (cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--tiny", action="store_true", help="use ModelConfig.tiny() (smoke test of the script)")
    p.add_argument("--checkpoint", default=None, help="official dpe.pt to load (optional)")
    p.add_argument("--malloc", choices=["default", "heap", "both"], default="both",
                   help="CPU only: glibc malloc as configured ('default'), serving large blocks from the heap "
                        "instead of fresh mmaps ('heap', like MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1G), "
                        "or one after the other ('both')")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, iters: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cfg = ModelConfig.tiny() if args.tiny else ModelConfig()
    torch.manual_seed(0)
    model = DPEGenerator(cfg)
    if args.checkpoint:
        load_official_generator(args.checkpoint, model)
    model = model.to(device).eval()

    gen = torch.Generator().manual_seed(1)
    source = (torch.rand(1, 3, cfg.size, cfg.size, generator=gen) * 2 - 1).to(device)
    driving_all = (torch.rand(max(args.batch_sizes), 3, cfg.size, cfg.size, generator=gen) * 2 - 1).to(device)

    runs = []  # (label, amp dtype, switch malloc to heap before the run)
    if device.type == "cuda":
        runs = [("float32", None, False), ("bf16-autocast", torch.bfloat16, False)]
    else:
        if args.malloc in ("default", "both"):
            runs.append(("float32", None, False))
        if args.malloc in ("heap", "both"):
            runs.append(("float32/heap", None, True))

    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else os.cpu_count()} "
          f"{'' if device.type == 'cuda' else 'cpus, '}{torch.get_num_threads()} threads) torch={torch.__version__} "
          f"size={cfg.size} params={sum(p.numel() for p in model.parameters()):,}")
    print(f"{'run':14s} {'batch':>5s} {'precomputed fps':>16s} {'re-encode fps':>14s} {'ratio':>6s}")
    for name, amp, heap in runs:
        if heap and not keep_large_blocks_on_heap():
            print(f"{name}: skipped (mallopt not available)")
            continue
        amp_ctx = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
        with torch.inference_mode(), amp_ctx():
            cache = encode_source(model, source)
            for _ in range(args.warmup):
                expression_transfer(model, cache, driving_all[:1])
                expression_transfer(model, source, driving_all[:1])
            for batch in args.batch_sizes:
                iters = args.iters or (2 if batch <= 4 else 1)
                driving = driving_all[:batch]
                repeated = source.expand(batch, -1, -1, -1)
                t_cached = _time(lambda: expression_transfer(model, cache, driving), iters, device)
                # baseline: the source is encoded again for every frame
                t_naive = _time(lambda: expression_transfer(model, repeated, driving), iters, device)
                fps_c, fps_n = batch / t_cached, batch / t_naive
                print(f"{name:14s} {batch:5d} {fps_c:16.2f} {fps_n:14.2f} {fps_c / fps_n:6.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
