"""Ray's own driver cost per block and per task, without the project's stages: the floor under `bench_edit_scale.py`.

Two measurements on a local Ray (`--cpus`, default 2), each size in a fresh process, driver CPU (process time,
Ray's threads included) and resident memory after the run minus before it, small vs large, per extra item:

1. Ray Data: a source of N one-row blocks through `--stages` no-op `map_batches` stages (batch size 1, a share
   of a CPU each, as the edit runner's stages ask for on 2 CPUs), the rows taken on the driver with
   `iter_batches`, as the runner does. Also the driver's CPU per thread and the executor's scheduling steps.
2. Ray core: N tasks of a no-op function submitted from the driver, at most `--in-flight` at a time, each
   result taken with `ray.get` (the finishing tasks' pattern).

    python benchmarks/bench_ray_floor.py                       # N = 500 and 4000, about 3 min on 2 cores
    python benchmarks/bench_ray_floor.py --sizes 200,1000 --stages 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from bench_edit_scale import THREADS  # the driver's CPU per thread, sampled as the edit benchmark does

REPO = Path(__file__).resolve().parents[1]

MEASURE = THREADS + textwrap.dedent("""
    import gc, json, os, sys, threading, time
    import ray
    kind, n, cpus, stages, in_flight = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    def rss_mb():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    def noop(batch):
        return batch
    @ray.remote(num_cpus=0.5)
    def task(i):
        return i
    ray.get([task.remote(i) for i in range(4)])  # workers started before the measurement
    steps = []
    if kind == "data":
        from ray.data._internal.execution.streaming_executor import StreamingExecutor
        step = StreamingExecutor._scheduling_loop_step
        def counted(self, topology):
            steps.append(1)
            return step(self, topology)
        StreamingExecutor._scheduling_loop_step = counted
        from ray.data import Datasource, ReadTask
        from ray.data.block import BlockMetadata
        import pyarrow as pa
        def read():
            for i in range(n):
                yield pa.table({"i": [i]})
        class Source(Datasource):
            def estimate_inmemory_data_size(self):
                return None
            def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
                return [ReadTask(read, BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None))]
    gc.collect()
    sample_threads()
    threads0, before, cpu0, wall0 = dict(thread_cpu), rss_mb(), time.process_time(), time.monotonic()
    if kind == "data":
        dataset = ray.data.read_datasource(Source(), num_cpus=0)
        dataset.context.target_max_block_size = 1
        for stage in range(stages):
            dataset = dataset.map_batches(noop, batch_size=1, batch_format="numpy", zero_copy_batch=True,
                                          num_cpus=round(0.5 - 0.01 * stage, 2))
        rows = sum(len(b["i"]) for b in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1))
    else:
        pending, rows = [], 0
        for i in range(n):
            pending.append(task.remote(i))
            if len(pending) >= in_flight:
                ready, pending = ray.wait(pending, num_returns=1)
                rows += len(ray.get(ready))
        rows += len(ray.get(pending))
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    threads = cpu_by_thread(threads0)
    gc.collect()
    print(json.dumps({"rows": rows, "cpu_s": cpu, "wall_s": wall, "retained_mb": rss_mb() - before,
                      "steps": len(steps), "threads": threads}))
""")


def _measure(kind: str, n: int, cpus: int, stages: int, in_flight: int, env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, kind, str(n), str(cpus), str(stages), str(in_flight)],
                          env={**os.environ, "PYTHONPATH": str(REPO), **env}, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(done.stderr[-4000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="500,4000", help="small,large numbers of blocks / tasks")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs the local Ray declares")
    parser.add_argument("--stages", type=int, default=4, help="no-op stages after the read (the edit runner has 4)")
    parser.add_argument("--in-flight", type=int, default=2, help="Ray core tasks in flight at most")
    parser.add_argument("--kinds", default="data,core", help="which measurements: data, core or both")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="set in the measured processes (and the local Ray each starts); repeatable")
    args = parser.parse_args()
    env = dict(setting.split("=", 1) for setting in args.env)
    small, large = (int(n) for n in args.sizes.split(","))
    for kind in args.kinds.split(","):
        a, b = (_measure(kind, n, args.cpus, args.stages, args.in_flight, env) for n in (small, large))
        what = f"blocks through {args.stages} stages" if kind == "data" else "tasks"
        for n, figures in ((small, a), (large, b)):
            print(f"{kind}: {n} {what}: driver CPU {figures['cpu_s']:.2f} s ({1000 * figures['cpu_s'] / n:.2f} ms each), "
                  f"wall {figures['wall_s']:.1f} s (CPU {figures['cpu_s'] / figures['wall_s']:.0%} of one core), "
                  f"retained {1024 * figures['retained_mb'] / n:.2f} KB each"
                  + (f", {figures['steps']} scheduling steps" if kind == "data" else "")
                  + f"; by thread {figures['threads']}", flush=True)
        extra = large - small
        print(f"{kind}: at the margin ({small} -> {large}): driver CPU {1000 * (b['cpu_s'] - a['cpu_s']) / extra:.2f} ms, "
              f"retained {1024 * (b['retained_mb'] - a['retained_mb']) / extra:.2f} KB per extra "
              f"{'block' if kind == 'data' else 'task'}"
              + (f"; {1000 * (b['cpu_s'] - a['cpu_s']) / max(1, b['steps'] - a['steps']):.2f} ms per extra scheduling step"
                 if kind == "data" else ""), flush=True)


if __name__ == "__main__":
    main()
