"""Driver cost of `portrait edit` as the archive grows: the real plan -> run -> finalize path, small vs large.

Four measurements, each in a fresh process (so memory figures are that process's own):

1. Jobs (`--jobs 50,2000`): the Ray Data job with a tiny model (32 px, random weights) on a local Ray
   over N short synthetic jobs (a 4-frame cut of the sample talking-face clip, one output each).
   Per size: driver CPU seconds per job (the driver process's CPU time over plan + run + finalize,
   Ray's driver threads included), driver memory retained per job (resident memory after finalize
   minus before plan, over N) and peak growth, and the time from the start of `run` to the first
   recorded row (and from the start of `plan`); then the same at the margin (large minus small, over the extra jobs), and the driver's
   CPU as a share of one core (Ray Data's executor loop runs in the driver for the whole run) and per
   thread (the executor's, the main thread's, Ray core's), with the executor's scheduling steps (it steps on a
   0.1 s clock, so its cost follows the wall time) and the retained memory by kind (heap, files, shared pages). `--cpus` sets the CPUs the local Ray
   declares (Ray Data reserves each stage's minimum upstream first: the runner's `stage_cpus` keeps
   that from holding the later stages back on small clusters). The retained memory is also given
   after `malloc_trim` (what the C allocator still holds in use); `--tracemalloc` also traces the
   driver's Python allocations and prints what is still held after the run, by place.
2. Rows that fail before media work (`--missing 200,2000`): a job table whose sources do not exist;
   the marginal planning-and-recording time per row between the two sizes (every such row is
   recorded while planning, without passing through a stage).
3. The first result of a large archive (`--archive-rows 1000000`): a job table of that many real jobs,
   the run stopped (as by SIGTERM) once its first row is recorded: the time from the start of `plan`
   to that row, against the small jobs run's (issue 16: the first result does not depend on the
   archive's size, planning included).
4. Planning alone over `--plan-rows` (1,000,000) table rows (no media, no Ray): the driver's CPU per
   row and its peak memory growth, and the bytes per job of the windows of work the Ray Data job
   would read from the object store.

    python benchmarks/bench_edit_scale.py                           # about 6 min on 2 cores
    python benchmarks/bench_edit_scale.py --jobs 20,60 --missing 100,1000 --plan-rows 100000 --archive-rows 100000
    python benchmarks/bench_edit_scale.py --jobs 50,2000 --archive-rows 1000000 --missing '' --plan-rows 0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COMMON = textwrap.dedent("""
    import gc, json, os, sys, time
    def rss_mb():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024
    def rss_kinds_mb():  # resident memory by kind: the heap, mapped files, shared memory (the object store's pages)
        return {l.split(":")[0]: int(l.split()[1]) / 1024 for l in open("/proc/self/status")
                if l.startswith(("RssAnon:", "RssFile:", "RssShmem:"))}
    def peak_mb():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
""")

THREADS = textwrap.dedent("""
    import threading
    thread_cpu = {}
    def sample_threads():
        # CPU seconds per driver thread, by name; sampled every second so that threads which end before
        # the run does (Ray Data's executor) are still counted
        names = {t.native_id: t.name.split("-")[0] for t in threading.enumerate()}
        for tid in os.listdir("/proc/self/task"):
            try:
                stat = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
                name = names.get(int(tid)) or open(f"/proc/self/task/{tid}/comm").read().strip()
            except OSError:
                continue
            thread_cpu[tid] = (name, (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"))
    def sampler(stop):
        while not stop.wait(1.0):
            sample_threads()
    def cpu_by_thread(since):
        # CPU seconds per thread name spent after `since` (an earlier copy of thread_cpu)
        sample_threads()
        total = {}
        for tid, (name, seconds) in thread_cpu.items():
            total[name] = total.get(name, 0.0) + seconds - since.get(tid, (name, 0.0))[1]
        return dict(sorted(((n, round(s, 2)) for n, s in total.items() if s >= 0.05), key=lambda kv: -kv[1]))
""")

RUN = COMMON + THREADS + textwrap.dedent("""
    import ray
    from pipelines.edit import job, results
    from pipelines.edit.settings import EditSettings
    table, output, checkpoint, workdir, executor, cpus, trace, stop_at_first, chunk_frames = sys.argv[1:10]
    import tracemalloc
    from ray.data._internal.execution.streaming_executor import StreamingExecutor
    steps = []  # the Ray Data executor's scheduling steps (its driver-side cost is per step)
    scheduling_step = StreamingExecutor._scheduling_loop_step
    def counted_step(self, topology):
        steps.append(1)
        return scheduling_step(self, topology)
    StreamingExecutor._scheduling_loop_step = counted_step
    if executor == "ray":
        ray.init(num_cpus=int(cpus), include_dashboard=False, log_to_driver=False)
    settings = EditSettings(output=output, checkpoint=checkpoint, detector="dlib", preset="ultrafast",
                            chunk_frames=int(chunk_frames), model_cpus=0.5, executor=executor, workdir=workdir)
    from pipelines.edit.model import load_weights
    weights = load_weights(checkpoint)
    gc.collect()
    if trace == "1":  # Python allocations still held after the run, by the line that made them
        tracemalloc.start(8)
        traced_before = tracemalloc.take_snapshot()
    stop_sampling = threading.Event()
    threading.Thread(target=sampler, args=(stop_sampling,), daemon=True).start()
    sample_threads()
    at_start = dict(thread_cpu)
    before, kinds_before, cpu0, wall0 = rss_mb(), rss_kinds_mb(), time.process_time(), time.monotonic()
    edit_plan, weights = job.plan(job.EditInputs(jobs=table), settings, weights=weights)
    planned = time.monotonic()
    first = []
    record = edit_plan.table.record
    def timed_record(row):
        if not first:
            first.append(time.monotonic())
            if stop_at_first == "1":  # as a SIGTERM would: the rest of the archive is left for a rerun
                from pipelines.runtime import request_stop
                request_stop()
        record(row)
    edit_plan.table.record = timed_record
    tally = job.run(edit_plan, weights, settings)
    summary, _ = job.finalize(edit_plan, tally, settings)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    stop_sampling.set()
    by_thread = cpu_by_thread(at_start)
    del edit_plan, tally
    gc.collect()
    retained_mb = rss_mb() - before
    retained_by_kind_mb = {kind: mb - kinds_before[kind] for kind, mb in rss_kinds_mb().items()}
    import ctypes  # what is left once the C allocator returns its free pages: memory still in use
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    traced = {"retained_after_trim_mb": rss_mb() - before}
    if trace == "1":
        growth = tracemalloc.take_snapshot().compare_to(traced_before, "traceback")
        traced |= {"traced_retained_kb": sum(g.size_diff for g in growth) / 1024,
                  "traced_top": [(f"{g.size_diff / 1024:.1f} KB in {g.count_diff} blocks",
                                  [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in g.traceback][-4:])
                                 for g in sorted(growth, key=lambda g: -g.size_diff)[:8]]}
        tracemalloc.stop()
    print(json.dumps({**traced, "jobs": summary["jobs"], "ok": summary["ok"], "failed": summary["failed"],
                      "by_failure_class": summary["by_failure_class"], "driver_cpu_s": cpu, "wall_s": wall,
                      "plan_s": planned - wall0, "first_row_s": (first[0] - planned) if first else None,
                      "first_row_from_start_s": (first[0] - wall0) if first else None,
                      "retained_mb": retained_mb, "retained_by_kind_mb": retained_by_kind_mb, "peak_growth_mb": peak_mb() - before,
                      "scheduling_steps": len(steps), "driver_cpu_s_by_thread": by_thread}))
""")

PLAN = COMMON + textwrap.dedent("""
    import pickle
    from pipelines.edit import job, results
    from pipelines.edit.settings import EditSettings
    from pipelines.storage import OutputStore
    table, output, source = sys.argv[1:4]
    settings = EditSettings(output=output, executor="local")
    gc.collect()
    before, cpu0 = rss_mb(), time.process_time()
    store = OutputStore(output)
    ledger = results.ResultsTable(store, "plan")
    planner = job.Planner(settings, "tiny 32px", 32, ledger.record, filter_outputs=False, state={}, listing=set())
    works = bytes_per_job = 0
    for window in job.job_windows(job.EditInputs(jobs=table), settings):
        planned = planner.window(window)
        if planned and not bytes_per_job:
            bytes_per_job = sum(len(pickle.dumps(w, protocol=5)) for w in planned) / len(planned)
        works += len(planned)
    cpu = time.process_time() - cpu0
    print(json.dumps({"rows": works, "driver_cpu_s": cpu, "peak_growth_mb": peak_mb() - before,
                      "retained_mb": rss_mb() - before, "bytes_per_job_in_object_store": bytes_per_job}))
""")


DRIVER_ENV: dict[str, str] = {}
"""Extra environment of the measured processes (`--driver-env`: e.g. Ray core settings, RAY_<name>)."""


def _python(script: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0", **DRIVER_ENV}
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(done.stderr[-4000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(path: Path, rows: list[tuple[str, str, str]]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source, driving, output = zip(*rows) if rows else ((), (), ())
    pq.write_table(pa.table({"source": list(source), "driving": list(driving), "output": list(output)}), path)
    return str(path)


def _archive_table(path: Path, rows: int, clip: Path) -> Path:
    """A job table of `rows` real jobs (the clip, each to its own output), written 100,000 rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetWriter(path, pa.schema([("source", pa.string()), ("driving", pa.string()),
                                           ("output", pa.string())])) as writer:
        for first in range(0, rows, 100_000):
            count = min(100_000, rows - first)
            writer.write_table(pa.table({"source": [str(clip)] * count, "driving": [str(clip)] * count,
                                         "output": [f"archive/{i:08d}.mp4" for i in range(first, first + count)]}))
    return path


def _clip_and_checkpoint(folder: Path) -> tuple[Path, Path]:
    import torch

    from dpe.checkpoint import save_checkpoint
    from dpe.config import ModelConfig
    from dpe.model import DPEGenerator
    from pipelines.media.video import ffmpeg_exe
    from pipelines.sample.media import source_clip_path

    clip = folder / "clip.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-i", str(source_clip_path()), "-frames:v", "4", "-c:v",
                    "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-an", str(clip)], check=True)
    torch.manual_seed(0)
    config = ModelConfig.tiny()
    save_checkpoint(folder / "model.pt", models={"generator": DPEGenerator(config)}, config=config, step=1)
    return clip, folder / "model.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", default="50,2000", help="small,large numbers of real jobs")
    parser.add_argument("--missing", default="200,2000",
                        help="small,large numbers of rows with missing sources ('': none)")
    parser.add_argument("--plan-rows", type=int, default=1_000_000, help="0: no planning-only run")
    parser.add_argument("--archive-rows", type=int, default=1_000_000,
                        help="a job table of this many real jobs, the run stopped (as by SIGTERM) once its first row "
                             "is recorded: the time from the start to that row against the small jobs run (0: none)")
    parser.add_argument("--cpus", type=int, default=2,
                        help="CPUs the local Ray declares (more than the machine has shows how Ray Data schedules "
                             "the stages on a larger cluster; the work then shares the real cores)")
    parser.add_argument("--chunk-frames", type=int, default=16,
                        help="the edit's --chunk-frames (16: four 4-frame jobs to a bundle; the command's default, "
                             "`portrait edit --help`, packs a whole analysis task's jobs into one)")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="also trace the driver's Python allocations in each jobs run and print what is still "
                             "held after it, by place (slows the driver: its CPU figures are then not comparable)")
    parser.add_argument("--driver-env", action="append", default=[], metavar="NAME=VALUE",
                        help="set in the measured processes (and the local Ray each starts), e.g. "
                             "RAY_task_events_report_interval_ms=0; repeatable")
    args = parser.parse_args()
    DRIVER_ENV.update(setting.split("=", 1) for setting in args.driver_env)
    folder = Path(tempfile.mkdtemp(prefix="bench-edit-scale-"))
    clip, checkpoint = _clip_and_checkpoint(folder)
    report: dict = {}

    sizes = [int(n) for n in args.jobs.split(",")]
    for n in sizes:
        table = _table(folder / f"jobs{n}.parquet", [(str(clip), str(clip), f"v{i:07d}.mp4") for i in range(n)])
        report[f"jobs_{n}"] = figures = _python(RUN, table, str(folder / f"out{n}"), str(checkpoint),
                                                str(folder / "work"), "ray", str(args.cpus),
                                                "1" if args.tracemalloc else "0", "0", str(args.chunk_frames))
        figures["cpu_ms_per_job"] = 1000 * figures["driver_cpu_s"] / n
        figures["retained_kb_per_job"] = 1024 * figures["retained_mb"] / n
        print(f"{n:>7} jobs: {figures['ok']} ok, driver CPU {figures['cpu_ms_per_job']:.2f} ms/job, retained "
              f"{figures['retained_kb_per_job']:.2f} KB/job (peak +{figures['peak_growth_mb']:.0f} MB), first row "
              f"{figures['first_row_s']:.1f} s after the run started ({figures['first_row_from_start_s']:.1f} s after the "
              f"start), wall {figures['wall_s']:.0f} s, {figures['scheduling_steps']} Ray Data scheduling steps; driver CPU s by "
              f"thread {figures['driver_cpu_s_by_thread']}", flush=True)
        if args.tracemalloc:
            print(f"{'':>13}Python allocations still held after the run: {figures['traced_retained_kb'] / n:.2f} "
                  f"KB/job; largest: {json.dumps(figures['traced_top'], indent=1)}", flush=True)
    small, large = (report[f"jobs_{n}"] for n in sizes)
    extra = sizes[1] - sizes[0]
    marginal_cpu_ms = 1000 * (large["driver_cpu_s"] - small["driver_cpu_s"]) / extra
    marginal_kb = 1024 * (large["retained_mb"] - small["retained_mb"]) / extra
    marginal_trimmed_kb = 1024 * (large["retained_after_trim_mb"] - small["retained_after_trim_mb"]) / extra
    by_kind_kb = {kind: round(1024 * (large["retained_by_kind_mb"][kind] - small["retained_by_kind_mb"][kind]) / extra, 2)
                  for kind in large["retained_by_kind_mb"]}
    report["marginal"] = {"cpu_ms_per_job": marginal_cpu_ms, "retained_kb_per_job": marginal_kb,
                          "retained_after_trim_kb_per_job": marginal_trimmed_kb, "retained_kb_per_job_by_kind": by_kind_kb}
    if args.tracemalloc:
        report["marginal"]["traced_kb_per_job"] = (large["traced_retained_kb"] - small["traced_retained_kb"]) / extra
    print(f"at the margin ({sizes[0]} -> {sizes[1]} jobs): driver CPU {marginal_cpu_ms:.2f} ms/job, retained "
          f"{marginal_kb:.2f} KB/job ({marginal_trimmed_kb:.2f} KB/job after malloc_trim; by kind {by_kind_kb}"
          + (f", Python allocations {report['marginal']['traced_kb_per_job']:.3f} KB/job" if args.tracemalloc else "")
          + f"); driver CPU as a share of one core: {small['driver_cpu_s'] / small['wall_s']:.0%}"
          f" / {large['driver_cpu_s'] / large['wall_s']:.0%}; time to first row {sizes[1]} / {sizes[0]} jobs: "
          f"{large['first_row_s'] / small['first_row_s']:.2f}x")

    if args.archive_rows:
        table = _archive_table(folder / "archive.parquet", args.archive_rows, clip)
        report["archive"] = big = _python(RUN, str(table), str(folder / "archive-out"), str(checkpoint),
                                          str(folder / "work"), "ray", str(args.cpus), "0", "1", str(args.chunk_frames))
        print(f"an archive of {args.archive_rows:,} jobs (stopped after its first row): first row "
              f"{big['first_row_from_start_s']:.1f} s after the start (planning returned after {big['plan_s']:.1f} s), "
              f"{sizes[0]} jobs: {small['first_row_from_start_s']:.1f} s: "
              f"{big['first_row_from_start_s'] / small['first_row_from_start_s']:.2f}x; driver peak "
              f"+{big['peak_growth_mb']:.0f} MB, wall {big['wall_s']:.0f} s", flush=True)

    if not args.missing:
        print(json.dumps(report, indent=1, default=str))
        return
    counts = [int(n) for n in args.missing.split(",")]
    for n in counts:
        table = _table(folder / f"missing{n}.parquet",
                       [(str(folder / f"gone{i}.mp4"), str(clip), f"m{i:07d}.mp4") for i in range(n)])
        report[f"missing_{n}"] = _python(RUN, table, str(folder / f"missing-out{n}"), str(checkpoint),
                                         str(folder / "work"), "ray", str(args.cpus), "0", "0", str(args.chunk_frames))
    a, b = (report[f"missing_{n}"] for n in counts)
    marginal_ms = 1000 * (b["wall_s"] - a["wall_s"]) / (counts[1] - counts[0])
    print(f"rows with a missing source: {counts[0]} in {a['wall_s']:.2f} s, {counts[1]} in {b['wall_s']:.2f} s: "
          f"{marginal_ms:.3f} ms per row at the margin ({b['by_failure_class']})")
    report["missing_marginal_ms"] = marginal_ms

    if not args.plan_rows:
        print(json.dumps(report, indent=1, default=str))
        return
    table = _archive_table(folder / "plan.parquet", args.plan_rows, clip)
    report["plan"] = planned = _python(PLAN, str(table), str(folder / "plan-out"), str(clip))
    print(f"planning {planned['rows']:,} rows on the driver: {1e6 * planned['driver_cpu_s'] / planned['rows']:.1f} "
          f"us CPU per row ({planned['driver_cpu_s']:.0f} s), peak +{planned['peak_growth_mb']:.0f} MB "
          f"({1024 * 1024 * planned['peak_growth_mb'] / planned['rows']:.0f} B per row); "
          f"{planned['bytes_per_job_in_object_store']:.0f} B per job of work in the object store")
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
