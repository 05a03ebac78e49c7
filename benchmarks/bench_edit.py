"""End-to-end video editing throughput (output frames/s) and time per stage, against the official demo's procedure.

Ours: the `portrait edit` job on the sample talking-face video (stages in-process, `executor='local'`,
so every stage's time is its own): streamed decode, face tracking, official framing, crops, the
model in batches (the source encoded once per frame, each distinct driving frame once, a still
driver once per chunk), paste-back with a soft mask, encode with the source's timing and audio.

Baseline, measured in the same run with the same weights and inputs: what the official demo does.
All frames of both videos are decoded into memory first, one face box (found on the first frame)
crops every frame, then the model runs one frame per forward pass with the source frame and the
driving frame both encoded in every call, and the results are pasted back and encoded.

Cases: a driving video (frame i drives frame i) and a still driving image. The printed ratios are
ours / baseline in output frames per second. `--memory` also runs the job on the sample and on the
sample looped `--loops` times, each in a fresh process with a tiny model, and prints peak resident
memory: it must not grow with the video's length.

`--colour` (on by default; `--colour-only` runs just this) reports the colour error of an unchanged
round trip per colour case (BT.709 HD and BT.601 limited range, BT.709 full range, untagged, 10-bit
BT.2020 PQ): the sample's frames through the segment encoder losslessly, so only conversions count,
(a) passed through as decoded and (b) every pixel pasted back as the RGB decoded from it, against
the baseline of the previous path (RGB through swscale's default rounding both ways), and the path
the issue found (RGB encoded as BT.601 limited whatever the source's matrix and range, then tagged
as the source).

`--per-frame` (on by default; `--per-frame-only` runs just this) reports the CPU milliseconds per
1080p frame of every stage but the model (analysis, crop, paste + encode, each on one core as the Ray
job runs them, and within each its decode, RGB conversion + landmarks, crop, paste and encode, counted
in CPU time), this tree against the code of `--baseline-rev` (before issue 16: whole frames converted
to RGB for crop and paste, x264 `medium`) and of `--previous-rev` (its second round), each in its own
process in the same run, the total without the CPU encoder (what a node encoding with NVENC pays), and
the model stage alone in frames/s at the batch the device gets (`--model-batch 0`).

Weights are random (official 256x256 architecture, or `--size`) unless `--checkpoint` names an official
dpe.pt; the speed does not depend on the values. Where CUDA is present, the script also measures the
model stage alone under bfloat16 (output frames/s per GPU and the share of the GPU's bfloat16 peak at
the measured GFLOP per output frame) and the whole job on Ray Data with the model on the GPU.

    python benchmarks/bench_edit.py                      # 48 frames at 256 px + memory: about 8 min on 2 cores
    python benchmarks/bench_edit.py --frames 24 --no-memory
    python benchmarks/bench_edit.py --size 64 --frames 120
    python benchmarks/bench_edit.py --colour-only          # the colour report alone: seconds
    python benchmarks/bench_edit.py --per-frame-only       # non-model CPU ms per 1080p frame: about 1.5 min
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
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from dpe.checkpoint import load_official_generator, save_checkpoint
from dpe.config import ModelConfig
from dpe.editing import expression_transfer
from dpe.model import DPEGenerator
from pipelines.edit import job, results
from pipelines.edit.model import (CropEditor, ModelWeights, keep_large_blocks_on_heap, load_weights, to_crops,
                                  to_tensor)
from pipelines.edit.settings import EditSettings
from pipelines.edit.stage_io import read_image
from pipelines.storage import OutputStore
from pipelines.media.crop import crop_frame, landmarks_to_crop
from pipelines.media.faces import make_detector
from pipelines.media.framing import framed_boxes
from pipelines.media.paste import face_mask, paste_back
from pipelines.media.video import SegmentWriter, decode, encode_mp4, ffmpeg_exe, probe
from pipelines.sample.media import make_sample_media

STAGES = ("decode_s", "track_s", "crop_s", "model_s", "paste_s", "encode_s")
GPU_BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
                        "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0}
"""Dense bfloat16 tensor-core peaks from the vendors' data sheets (longest matching name wins)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=48, help="frames of the sample to edit (from its start)")
    p.add_argument("--size", type=int, default=256, help="model size (official channel widths); 256 = official")
    p.add_argument("--checkpoint", default=None, help="official dpe.pt to use instead of random weights")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for both runs (CPU)")
    p.add_argument("--batch", type=int, default=8, help="crops per forward pass in our job")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure peak memory at 1x and --loops x the sample's length")
    p.add_argument("--loops", type=int, default=10)
    p.add_argument("--workdir", default=None, help="where the sample and outputs go (default: a temp folder)")
    p.add_argument("--gpu-peak-tflops", type=float, default=None, help="bfloat16 peak of the GPU if not in the table")
    p.add_argument("--gpu-batches", type=int, nargs="+", default=[8, 32, 64], help="model-stage batch sizes on GPU")
    p.add_argument("--gpu-loops", type=int, default=3,
                   help="the Ray Data run edits copies of the sample looped this often")
    p.add_argument("--check-gpu-path-on-cpu", action="store_true",
                   help="run the GPU measurements on the CPU without CUDA (checks the script; figures meaningless)")
    p.add_argument("--colour", action=argparse.BooleanOptionalAction, default=True,
                   help="also report the colour error of an unchanged round trip per colour case")
    p.add_argument("--colour-only", action="store_true", help="run only the colour report")
    p.add_argument("--per-frame", action=argparse.BooleanOptionalAction, default=True,
                   help="also report non-model CPU ms per 1080p frame, before and after, and the model stage's "
                        "frames/s at the device's batch")
    p.add_argument("--per-frame-only", action="store_true", help="run only the per-frame report")
    p.add_argument("--hd-frames", type=int, default=60, help="1080p frames of the per-frame report")
    p.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision whose code is the per-frame baseline")
    p.add_argument("--previous-rev", default=PREVIOUS_REV, help="git revision whose code is the per-frame report's "
                                                                "middle column (the previous round)")
    p.add_argument("--preset", default=None, help="x264 preset of the per-frame report's later two columns "
                                                  "(default: the job's default)")
    p.add_argument("--stage-costs", nargs=5, metavar=("SOURCE", "DRIVING", "WORK", "PRESET", "SIZE"),
                   help=argparse.SUPPRESS)  # one side of the per-frame report, in its own process
    p.add_argument("--model-frames", type=int, default=16, help="crops the model stage alone edits (at least two "
                                                                 "batches)")
    return p.parse_args(argv)


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def make_inputs(work: Path, frames: int) -> dict[str, Path]:
    """The sample's first `frames` frames (with its audio), a driving video from later in it, a still driver."""
    sample = make_sample_media(work / "sample")
    talk = sample["talk.mp4"]
    paths = {"talk": talk, "source": work / "source.mp4", "driving": work / "driving.mp4", "still": work / "still.png"}
    seconds = f"{frames * 1001 / 30000:.4f}"
    ffmpeg("-i", str(talk), "-frames:v", str(frames), "-c:v", "libx264", "-preset", "veryfast", "-crf", "18",
           "-c:a", "copy", "-t", seconds, str(paths["source"]))
    ffmpeg("-ss", "4.5", "-i", str(talk), "-frames:v", str(frames), "-c:v", "libx264", "-preset", "veryfast",
           "-crf", "18", "-an", str(paths["driving"]))
    ffmpeg("-ss", "1", "-i", str(talk), "-frames:v", "1", str(paths["still"]))
    return paths


def model_and_checkpoint(args: argparse.Namespace, work: Path) -> tuple[DPEGenerator, Path]:
    """One set of weights for both runs: the model object for the baseline, a checkpoint file for the job."""
    config = ModelConfig() if args.checkpoint else ModelConfig(size=args.size)
    torch.manual_seed(0)
    model = DPEGenerator(config)
    if args.checkpoint:
        load_official_generator(args.checkpoint, model)
    path = save_checkpoint(work / "model.pt", models={"generator": model}, config=config)
    return model.eval(), path


def official_procedure(model: DPEGenerator, source: Path, driving: Path, still: bool, output: Path,
                       device: torch.device) -> dict[str, float]:
    """The official demo's way: preload everything, one box, one frame per call, both frames encoded each call."""
    timings = {name: 0.0 for name in STAGES}
    size = model.cfg.size
    cpu = cpu_seconds()
    started = time.perf_counter()
    info = probe(source)
    frames = [f.image for f in decode(info)]
    drivers = [read_image(driving)] if still else [f.image for f in decode(probe(driving))]
    timings["decode_s"] = time.perf_counter() - started
    mark = time.perf_counter()
    detector = make_detector("dlib")
    face = max(detector.detect(frames[0]), key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
    points = detector.landmarks(frames[0], face.box)
    box = framed_boxes(points[None])[0]
    driver_face = max(detector.detect(drivers[0]), key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
    driver_box = framed_boxes(detector.landmarks(drivers[0], driver_face.box)[None])[0]
    timings["track_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    sources = [crop_frame(frame, box, size) for frame in frames]
    targets = [crop_frame(frame, driver_box, size) for frame in drivers]
    timings["crop_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    edited = []
    for index, crop in enumerate(sources):
        target = targets[0 if still else min(index, len(targets) - 1)]
        out = expression_transfer(model, to_tensor(crop[None], device), to_tensor(target[None], device))
        edited.append(to_crops(out)[0])
    _sync(device)
    timings["model_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    mask = face_mask([landmarks_to_crop(points, box, size)], size)
    pasted = [paste_back(frame, crop, mask, box) for frame, crop in zip(frames, edited, strict=True)]
    timings["paste_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    encode_mp4(pasted, output, fps=25.0)
    timings["encode_s"] = time.perf_counter() - mark
    timings["wall_s"] = time.perf_counter() - started
    timings["cpu_s"] = cpu_seconds() - cpu
    timings["frames"] = len(pasted)
    return timings


def our_job(checkpoint: Path, source: Path, driving: Path, output: Path, args: argparse.Namespace,
            executor: str = "local", **options) -> dict[str, float]:
    settings = EditSettings(output=str(output), checkpoint=str(checkpoint), detector="dlib",
                            executor=executor, model_batch=args.batch, model_cpus=args.threads,
                            workdir=str(output / "work"), **options)
    edit_plan, weights = job.plan(job.EditInputs(source=str(source), driving=str(driving)), settings)
    cpu = cpu_seconds()
    started = time.perf_counter()  # the checkpoint is loaded (the baseline's model is built before timing too)
    job.run(edit_plan, weights, settings)
    wall = time.perf_counter() - started
    cpu = cpu_seconds() - cpu
    rows = list(results.read_results(OutputStore(settings.output)).values())
    if not rows or any(row.status != "ok" for row in rows):
        raise RuntimeError(f"the job failed: {[(r.job_id, r.failure_class, r.message) for r in rows]}")
    timings = {name: sum(getattr(r, name) or 0.0 for r in rows) for name in STAGES}
    timings.update(wall_s=wall, cpu_s=cpu, frames=sum(r.frames for r in rows))
    return timings


def cpu_seconds() -> float:
    """CPU time used so far by this process (all threads) and its finished child processes (ffmpeg)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def print_case(name: str, ours: dict[str, float], base: dict[str, float]) -> float:
    ours_fps, base_fps = ours["frames"] / ours["wall_s"], base["frames"] / base["wall_s"]
    print(f"\n{name}: {int(ours['frames'])} frames")
    print(f"  {'':10s} {'ours':>10s} {'official':>10s}   (seconds per stage)")
    for stage in STAGES:
        print(f"  {stage[:-2]:10s} {ours[stage]:10.2f} {base[stage]:10.2f}")
    print(f"  {'total':10s} {ours['wall_s']:10.2f} {base['wall_s']:10.2f}")
    print(f"  model stage alone: ours {ours['frames'] / ours['model_s']:.3f} frames/s, "
          f"official loop {base['frames'] / base['model_s']:.3f} frames/s "
          f"({base['model_s'] / ours['model_s']:.2f}x)")
    print(f"  end to end: ours {ours_fps:.3f} frames/s, official procedure {base_fps:.3f} frames/s "
          f"-> {ours_fps / base_fps:.2f}x")
    ours_cpu, base_cpu = ours["cpu_s"] / ours["frames"], base["cpu_s"] / base["frames"]
    print(f"  CPU seconds per output frame (robust to other load on the machine): ours {ours_cpu:.2f}, "
          f"official procedure {base_cpu:.2f} -> {base_cpu / ours_cpu:.2f}x")
    return ours_fps / base_fps, base_cpu / ours_cpu


MEMORY_RUN = textwrap.dedent("""
    import json, sys
    from pipelines.edit import job, results
    from pipelines.edit.settings import EditSettings
    source, output, checkpoint = sys.argv[1:4]
    settings = EditSettings(output=output, checkpoint=checkpoint, detector="dlib", preset="veryfast",
                            executor="local")
    edit_plan, weights = job.plan(job.EditInputs(source=source, driving=source), settings)
    job.run(edit_plan, weights, settings)
    row, = results.read_results(OutputStore(output)).values()
    assert row.status == "ok", row.message
    # VmHWM: this process's own peak (ru_maxrss would also count the parent's pages seen at fork time)
    peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"frames": row.frames, "peak_mb": peak_kb / 1024}))
""")


def memory(work: Path, talk: Path, loops: int) -> None:
    """Peak resident memory of the whole job (tiny model, every stage in one process) at 1x and `loops` x length."""
    config = ModelConfig.tiny()
    checkpoint = save_checkpoint(work / "tiny.pt", models={"generator": DPEGenerator(config)}, config=config)
    looped = work / f"talk_x{loops}.mp4"
    ffmpeg("-stream_loop", str(loops - 1), "-i", str(talk), "-c", "copy", str(looped))
    script = work / "memory_run.py"
    script.write_text(MEMORY_RUN)
    print(f"\npeak resident memory of the job (tiny model, stages in one process, chunks of "
          f"{EditSettings().chunk_frames} frames):")
    for name, clip in (("1x", talk), (f"{loops}x", looped)):
        done = subprocess.run([sys.executable, str(script), str(clip), str(work / f"memory-{name}"), str(checkpoint)],
                              capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {name:>4s}: {result['frames']:6d} frames  peak {result['peak_mb']:7.1f} MB")


def gpu(args: argparse.Namespace, model: DPEGenerator, checkpoint: Path, inputs: dict[str, Path], work: Path,
        device: torch.device) -> None:
    """Model stage alone (bf16) and the Ray Data job end to end with the model on the GPU."""
    from torch.utils.flop_counter import FlopCounterMode

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (script check only)"
    peak = args.gpu_peak_tflops or next((tflops for key, tflops in sorted(GPU_BF16_PEAK_TFLOPS.items(),
                                                                          key=lambda item: -len(item[0]))
                                         if key in name), None)
    size = model.cfg.size
    crops = np.random.default_rng(0).integers(0, 256, (4 * max(args.gpu_batches), size, size, 3), dtype=np.uint8)
    model = model.to(device).requires_grad_(False)  # inference only (the counter's module hooks expect no grads)
    with FlopCounterMode(display=False) as counter:
        expression_transfer(model, to_tensor(crops[:1], device), to_tensor(crops[1:2], device))
    gflop = counter.get_total_flops() / 1e9
    print(f"\nGPU {name}: {gflop:.1f} GFLOP per output frame (video-to-video expression transfer, measured)")
    weights = load_weights(str(checkpoint))
    precision = "bfloat16" if device.type == "cuda" else "float32"
    for batch in args.gpu_batches:
        editor = CropEditor(weights, precision=precision, batch=batch, device=device)
        index = np.arange(len(crops))
        editor.edit(crops[:batch], crops[:batch], index[:batch], "expression", 1.0, "absolute")  # warm up
        _sync(device)
        started = time.perf_counter()
        editor.edit(crops, crops, index, "expression", 1.0, "absolute")
        _sync(device)
        fps = len(crops) / (time.perf_counter() - started)
        share = f", {fps * gflop / 1e3 / peak:.1%} of the {peak:.0f} TFLOP/s bf16 peak" if peak else ""
        print(f"  model stage alone, {precision}, batch {batch:3d}: {fps:8.1f} output frames/s{share}")
    looped = work / f"talk_x{args.gpu_loops}.mp4"
    ffmpeg("-stream_loop", str(args.gpu_loops - 1), "-i", str(inputs["talk"]), "-c", "copy", str(looped))
    table = work / "gpu_jobs.csv"
    copies = max(2, (os.cpu_count() or 2) // 2)
    table.write_text("source,driving,output\n" + "".join(f"{looped},{inputs['driving']},copy{n}.mp4\n"
                                                         for n in range(copies)))
    settings = EditSettings(output=str(work / "gpu-out"), checkpoint=str(checkpoint), detector="dlib",
                            executor="ray", model_batch=max(args.gpu_batches),
                            model_gpus=1 if device.type == "cuda" else 0, workdir=str(work / "gpu-work"))
    started = time.perf_counter()
    edit_plan, loaded = job.plan(job.EditInputs(jobs=str(table)), settings)
    job.run(edit_plan, loaded, settings)
    wall = time.perf_counter() - started
    rows = list(results.read_results(OutputStore(settings.output)).values())
    frames = sum(r.frames or 0 for r in rows)
    busy = {stage: sum(getattr(r, stage) or 0.0 for r in rows) for stage in STAGES}
    cpus = os.cpu_count() or 1
    cpu_limit = frames / (sum(v for k, v in busy.items() if k != "model_s") / max(1, cpus - 1))
    model_limit = frames / busy["model_s"]
    bound = "model (GPU)" if model_limit < cpu_limit else f"CPU stages ({cpus - 1} cores)"
    print(f"  end to end on Ray Data, {copies} videos of {frames // copies} frames: "
          f"{frames / wall:.1f} output frames/s")
    print("  busy seconds per 1000 frames: " + ", ".join(f"{k[:-2]} {1000 * v / frames:.1f}" for k, v in busy.items()))
    print(f"  limits: model stage {model_limit:.1f} frames/s, CPU stages {cpu_limit:.1f} frames/s -> bound by {bound}; "
          f"end to end reaches {frames / wall / min(model_limit, cpu_limit):.0%} of that bound")


PER_FRAME_STAGES = ("analysis", "crop", "paste + encode")

PER_FRAME_PARTS = (("analysis", "decode_s", "decode"), ("analysis", "track_s", "track (landmarks + detection)"),
                   ("crop", "decode_s", "decode"), ("crop", "crop_s", "crop (resample + RGB)"),
                   ("paste + encode", "decode_s", "decode"),
                   ("paste + encode", "paste_s", "mask + paste (incl. RGB -> YUV)"),
                   ("paste + encode", "encode_s", "encode"))
"""(stage, timing key, what it holds) of the per-stage breakdown: the stages' own timings, counted in CPU time.
Before this work the blend into the frame's planes (RGB -> YUV of the face) was counted under encode."""

BASELINE_REV = "80d1b30"
"""The commit before the per-frame work (issue 16): crop and paste converted whole frames to RGB, x264 ran
at `medium` by default."""

PREVIOUS_REV = "d47f1d6"
"""The commit before the third round (issue 16, point 2): the tracker's landmarks on the RGB of the face's
surroundings, the detector's frame converted to RGB whole, the crop's box converted to RGB and then resampled."""


def stage_costs_in(code: Path | None, source: Path, driving: Path, work: Path, preset: str, size: int) -> dict:
    """`non_model_costs` in a fresh process running the `pipelines` package found in `code` (None: this tree)."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code)
    done = subprocess.run([sys.executable, __file__, "--stage-costs", str(source), str(driving), str(work), preset,
                           str(size)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"stage costs failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def non_model_costs(source: Path, driving: Path, work: Path, preset: str, size: int) -> dict[str, float]:
    """CPU milliseconds per frame of every stage but the model, on one core (the stages run as the Ray job
    runs them, one per core; the model stage is left out: the edited crops are the source crops), with
    each stage's own timings (decode, track, crop, paste, encode) counted in CPU time too."""
    import types

    from pipelines.edit import analyse
    from pipelines.edit import chunks as chunk_module
    from pipelines.edit.chunks import JobWork
    from pipelines.edit.compose import cached_detector, compose_chunk
    from pipelines.edit.crops import crop_chunk
    from pipelines.edit.job_table import EditJob

    cv2.setNumThreads(1)
    chunk_module.time = types.SimpleNamespace(perf_counter=time.process_time, time=time.time)  # CPU, not wall
    shutil.rmtree(work, ignore_errors=True)  # segments of an earlier run would be reused, not made
    settings = EditSettings(output=str(work), checkpoint="unused", detector="dlib", preset=preset,
                            executor="local", workdir=str(work / "scratch"))
    edit = EditJob(source=str(source), driving=str(driving), output="out.mp4", mode="expression", strength=1.0,
                   motion="relative", driving_policy="hold", face="largest")
    store = OutputStore(str(work))
    detector = cached_detector("dlib")
    analyse._DRIVERS.clear()  # each path analyses its driver itself
    costs, parts = {}, {}

    def stage(name: str, run, chunks: list) -> list:
        before = [dict(chunk.timings) for chunk in chunks]
        started = time.process_time()
        done = run(chunks)
        costs[name] = time.process_time() - started
        for index, chunk in enumerate(done):
            earlier = before[index] if index < len(before) else {}
            for key, seconds in chunk.timings.items():
                parts[f"{name}/{key}"] = parts.get(f"{name}/{key}", 0.0) + seconds - earlier.get(key, 0.0)
        return done

    chunks = stage("analysis", lambda _: analyse.analyse_job(JobWork(edit, f"{preset:0<16}", 0, size), settings,
                                                               detector, store), [])
    chunks = stage("crop", lambda items: [crop_chunk(chunk, settings) for chunk in items], chunks)
    for chunk in chunks:
        chunk.edited = chunk.source_crops
    chunks = stage("paste + encode", lambda items: [compose_chunk(chunk, settings, store) for chunk in items], chunks)
    failed = [chunk.message for chunk in chunks if not chunk.ok]
    if failed:
        raise RuntimeError(f"the job failed: {failed}")
    frames = sum(chunk.frames for chunk in chunks)
    return ({stage_name: 1000 * seconds / frames for stage_name, seconds in costs.items()}
            | {key: 1000 * seconds / frames for key, seconds in parts.items()} | {"frames": frames})


def per_frame_report(args: argparse.Namespace, work: Path) -> None:
    """Non-model CPU ms per 1080p frame, stage by stage, of the code of `--baseline-rev`, of `--previous-rev` and
    of this tree in this run, and the model stage's frames/s at the batch the device gets."""
    sample = make_sample_media(work / "sample")
    source, driving = work / "hd_source.mp4", work / "hd_driver.png"
    frames = args.hd_frames
    ffmpeg("-i", str(sample["talk.mp4"]), "-frames:v", str(frames), "-vf",
           "scale=1320:1080:flags=lanczos,pad=1920:1080:300:0,setsar=1", "-c:v", "libx264", "-preset", "veryfast",
           "-crf", "18", "-c:a", "copy", "-t", f"{frames * 1001 / 30000:.4f}", str(source))
    ffmpeg("-ss", "1", "-i", str(sample["talk.mp4"]), "-frames:v", "1", "-vf", "scale=1320:1080:flags=lanczos",
           str(driving))
    preset = args.preset or EditSettings().preset
    print(f"\nnon-model CPU ms per 1080p frame (one core per stage; {frames} frames of the sample scaled into "
          "1920x1080, a driving image, expression edit, edited crops = source crops); the code of "
          f"{args.baseline_rev} with its default preset (medium), of {args.previous_rev} and of this tree with "
          f"preset {preset}:")
    runs = {}
    for name, rev, run_preset in (("baseline", args.baseline_rev, "medium"), ("previous", args.previous_rev, preset),
                                  ("this tree", None, preset)):
        code = None
        if rev is not None:
            code = work / f"baseline-{rev}"
            if not code.exists():
                archive = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "archive", rev,
                                          "pipelines", "dpe"], capture_output=True, check=True).stdout
                unpacked = Path(tempfile.mkdtemp(dir=work))
                subprocess.run(["tar", "-x", "-C", str(unpacked)], input=archive, check=True)
                unpacked.rename(code)
        runs[name] = stage_costs_in(code, source, driving, work / f"per-frame-{name.replace(' ', '-')}", run_preset,
                                    args.size)
    names = list(runs)
    print(f"  {'stage':46s} " + " ".join(f"{name:>10s}" for name in names))
    for stage in PER_FRAME_STAGES:
        print(f"  {stage:46s} " + " ".join(f"{runs[name][stage]:10.1f}" for name in names))
        for part_stage, key, label in PER_FRAME_PARTS:
            if part_stage == stage:
                print(f"    {label:44s} " + " ".join(f"{runs[name].get(f'{stage}/{key}', 0.0):10.1f}" for name in names))
    totals = {name: sum(runs[name][stage] for stage in PER_FRAME_STAGES) for name in names}
    print(f"  {'total':46s} " + " ".join(f"{totals[name]:10.1f}" for name in names))
    after = totals["this tree"]
    print(f"  -> this tree uses {totals['baseline'] / after:.2f}x less CPU per frame than {args.baseline_rev}, "
          f"{totals['previous'] / after:.2f}x less than {args.previous_rev} ({1000 / after:.1f} frames/s per core)")
    encode = runs["this tree"].get("paste + encode/encode_s", 0.0)
    print(f"  this tree without the CPU encoder (a node that encodes with NVENC): {after - encode:.1f} ms per frame")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = ModelConfig() if args.size == 256 else ModelConfig(size=args.size)
    weights = ModelWeights(config=config, state=DPEGenerator(config).state_dict(), kind="random", source="bench")
    editor = CropEditor(weights, device=device)
    count = max(2 * editor.batch, args.model_frames)
    crops = np.random.default_rng(0).integers(0, 256, (count, args.size, args.size, 3), dtype=np.uint8)
    index = np.arange(count)
    editor.edit(crops[:editor.batch], crops[:editor.batch], index[:editor.batch], "expression", 1.0, "absolute")
    _sync(device)
    started = time.perf_counter()
    editor.edit(crops, crops, index, "expression", 1.0, "absolute")
    _sync(device)
    print(f"  model stage alone on {device.type} at its batch ({editor.batch}, {args.size} px, every driving frame "
          f"distinct): {count / (time.perf_counter() - started):.1f} frames/s")


COLOUR_CASES = {  # name: (size, ffmpeg scale matrix, setparams tags, pixel format, full range)
    "BT.709 HD, limited": ("1280:720", "bt709", "colorspace=bt709:range=tv:color_primaries=bt709:color_trc=bt709",
                           "yuv420p", False),
    "BT.601 SD, limited": ("640:480", "smpte170m", "colorspace=smpte170m:range=tv", "yuv420p", False),
    "BT.709, full range (phone)": ("640:360", "bt709", "colorspace=bt709:range=pc", "yuv420p", True),
    "untagged (FFmpeg's guess)": ("640:360", "bt601", "colorspace=unknown:range=unknown", "yuv420p", False),
    "BT.2020 PQ 10-bit": ("640:360", "bt2020",
                          "colorspace=bt2020nc:range=tv:color_primaries=bt2020:color_trc=smpte2084", "yuv420p10le",
                          False),
}


def colour_errors(info, work: Path, name: str) -> dict[str, tuple[float, float, float]]:
    """Per path: (mean |YUV error| in 8-bit levels, mean |RGB error|, mean RGB bias) of an unchanged,
    losslessly encoded round trip of every frame of `info`."""
    from dataclasses import replace

    import av
    from av.video.reformatter import Interpolation

    from pipelines.media.formats import choose_output
    from pipelines.media.paste import Overlay
    from pipelines.media.pictures import plane_arrays, sws_matrix

    output = choose_output(info, "mp4", preset="ultrafast")
    output = replace(output, options={**{k: v for k, v in output.options.items() if k != "crf"}, "qp": "0"})
    scale = 2 ** (max(c.bits for c in av.VideoFormat(info.pix_fmt).components) - 8)

    def planes(path: Path) -> list[np.ndarray]:
        with av.open(str(path)) as container:
            return [np.concatenate([p.astype(np.int64).ravel() for p in plane_arrays(f)])
                    for f in container.decode(video=0)]

    def through(path: Path, write) -> tuple[float, float, float]:
        with SegmentWriter(path, info, output) as writer:
            for frame in decode(info):
                write(writer, frame)
        yuv = float(np.mean([np.abs(a - b).mean() for a, b in zip(planes(path), planes(Path(info.path)))])) / scale
        rgb = [b.image.astype(np.float64) - a.image for a, b in zip(decode(info), decode(probe(path)))]
        return yuv, float(np.mean([np.abs(d).mean() for d in rgb])), float(np.mean([d.mean() for d in rgb]))

    def previous_path(writer, frame, tagged: bool = True) -> None:  # RGB both ways, swscale's default rounding
        rgb = frame.frame.to_ndarray(format="rgb24")
        back = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
            format=output.pix_fmt, dst_colorspace=sws_matrix(info.colour.get("colorspace", 2)) if tagged else None,
            dst_color_range=(info.colour.get("color_range") or None) if tagged else None,
            interpolation=Interpolation.BILINEAR)
        for name in ("colorspace", "color_range"):  # tagged as the source whatever it was converted with
            setattr(back, name, info.colour.get(name, 0))
        writer.write_picture(back, frame.pts, frame.duration)

    return {
        "ours, passed through": through(work / f"{name}-through.mp4", lambda w, f: w.write_frame(f)),
        "ours, all pasted back": through(work / f"{name}-pasted.mp4", lambda w, f: w.write_frame(
            f, Overlay(0, 0, f.image, np.ones(f.image.shape[:2], np.float32)))),
        "previous path (baseline)": through(work / f"{name}-previous.mp4", previous_path),
        "issue's path: RGB as BT.601": through(work / f"{name}-untagged.mp4",
                                              lambda w, f: previous_path(w, f, tagged=False)),
    }


def colour_report(work: Path, talk: Path, frames: int = 10) -> None:
    """Print the colour error of an unchanged round trip per colour case, against the previous path."""
    print(f"\ncolour error of an unchanged round trip ({frames} frames of the sample per case, lossless H.264, "
          "so only the conversions count; levels of 8 bits)")
    print(f"  {'case':28s} {'path':26s} {'|YUV err|':>10s} {'|RGB err|':>10s} {'RGB bias':>9s}")
    folder = work / "colour"
    folder.mkdir(parents=True, exist_ok=True)
    for index, (case, (size, matrix, tags, pix_fmt, full)) in enumerate(COLOUR_CASES.items()):
        path = folder / f"case{index}.mp4"
        ffmpeg("-i", str(talk), "-frames:v", str(frames), "-vf",
               f"scale={size}:out_color_matrix={matrix}:out_range={'full' if full else 'limited'},setsar=1,"
               f"format={pix_fmt},setparams={tags}", "-c:v", "libx264", "-qp", "0", "-preset", "ultrafast", "-an",
               str(path))
        errors = colour_errors(probe(path), folder, f"case{index}")
        for route, (yuv, rgb, bias) in errors.items():
            print(f"  {case:28s} {route:26s} {yuv:10.3f} {rgb:10.3f} {bias:+9.3f}")
        base, ours = errors["previous path (baseline)"][1], errors["ours, all pasted back"][1]
        print(f"  {'':28s} -> previous / ours (all pasted back, |RGB err|) = {base / max(ours, 1e-3):.1f}x")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_large_blocks_on_heap()  # both runs in this process get the same allocator
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-edit-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.colour_only:
        colour_report(work, make_sample_media(work / "sample")["talk.mp4"])
        return 0
    if args.stage_costs:
        source, driving, folder, preset, size = args.stage_costs
        print(json.dumps(non_model_costs(Path(source), Path(driving), Path(folder), preset, int(size))))
        return 0
    if args.per_frame_only:
        per_frame_report(args, work)
        return 0
    inputs = make_inputs(work, args.frames)
    model, checkpoint = model_and_checkpoint(args, work)
    device = torch.device("cpu")
    print(f"CPU: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"model {model.cfg.size} px ({sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{'dpe.pt' if args.checkpoint else 'random weights'}), float32, our batch {args.batch}; "
          f"source: the sample's first {args.frames} frames (352x288, 30000/1001 fps, with audio)")
    ratios = {}
    for case, driving, still in (("driving video", inputs["driving"], False), ("still image", inputs["still"], True)):
        with torch.inference_mode():
            base = official_procedure(model, inputs["source"], driving, still, work / f"official-{still}.mp4", device)
        ours = our_job(checkpoint, inputs["source"], driving, work / f"ours-{still}", args)
        ratios[case] = print_case(case, ours, base)
    print("\nsummary (ours / official procedure): " + ", ".join(
        f"{case} {wall:.2f}x output frames/s, {cpu:.2f}x per CPU second" for case, (wall, cpu) in ratios.items()))
    if args.memory:
        memory(work, inputs["talk"], args.loops)
    if args.colour:
        colour_report(work, inputs["talk"])
    if args.per_frame:
        per_frame_report(args, work)
    if torch.cuda.is_available() or args.check_gpu_path_on_cpu:
        gpu(args, model, checkpoint, inputs, work, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    else:
        print("\nno CUDA device: the GPU measurements (model stage bf16, Ray Data end to end) were skipped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
