"""Does the demo's recipe learn faces? Held-out L1 curves of the old demo recipe against the new one, and faces.

Part 1 (about 9 min on 2 cores): the demo's training (64 px, small model, batch 4, seed 0, no VGG,
reconstruction alone) in one process with one torch thread, on a prepared sample dataset,
evaluated every `--every` steps on the demo's held-out pairs (`l1`: both-transfer against the
driver frame), with dlib's frontal detector on the expression and pose transfers of those pairs
(64 px scaled to 256). Two runs: the old demo recipe (L1 alone) as the baseline, then the demo's
recipe now (the sharpness term, L1 and sharpness weighted to the inner face, to-RGB convs at 10x
the rate, flow heads held for the first third, rates falling to a tenth over the last third,
evaluated on the EMA 0.99 generator); both start from `dpe.layers.ToFlow`'s identity-warp, open-mask flow heads. Prints both curves,
whether the recipe's last evaluation is its lowest (within 0.01) and below 0.2, and the ratio of
the two final errors.

Part 2 (`--demo DIR`, after `portrait demo --output DIR`): dlib's frontal face detector on
every frame of each edited video and of the source (`--frames N`: N frames spread over each),
the share with a face (target: >= 90% in each edited video).

    flock /tmp/portrait-tests.lock python benchmarks/bench_demo_learning.py --data out/demo/dataset
    flock /tmp/portrait-tests.lock python benchmarks/bench_demo_learning.py --demo out/demo --skip-training
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


RECIPES = {
    "L1 alone (the old demo, baseline)": dict(sharpness=0.0),
    "sharpness + face focus 16 + to-RGB 10x + flow warm-up + EMA 0.99 + lr decay (the demo)": dict(
        flow_warmup=None, to_rgb_lr_mul=10.0, ema_decay=0.99, lr_decay=1 / 3, face_focus=16.0),
}
"""TrainSettings options of each run (`flow_warmup=None`: a third of the steps, as the demo)."""


def train_curve(data: str, steps: int, every: int, batch: int, options: dict) -> list[tuple[float, float, float]]:
    """(held-out both-transfer L1, face share of the expression and of the pose transfers) at step 0 and
    every `every` steps of one demo-sized run, reconstruction alone."""
    import torch

    from dpe.train_step import train_step
    from pipelines.train.clips import ClipReader, load_catalogue
    from pipelines.train.evaluation import Evaluator, transfers
    from pipelines.train.loop import step_seed
    from pipelines.train.model import build_state, plan_model
    from pipelines.train.pairs import PairSampler, fixed_pairs
    from pipelines.train.settings import TrainSettings

    if options.get("flow_warmup", 0) is None:
        options = {**options, "flow_warmup": steps // 3}
    settings = TrainSettings(data=data, size=64, batch=batch, perceptual="off", seed=0, gan_start=steps, **options)
    torch.set_num_threads(1)
    torch.manual_seed(settings.seed)
    plan = plan_model(settings)
    state = build_state(plan, "cpu")
    train, held_out = load_catalogue(data, settings.train_split), load_catalogue(data, settings.eval_split)
    sampler = PairSampler(train, ClipReader(data, settings.size), seed=settings.seed, rank=0)
    reader = ClipReader(data, settings.size)
    held_out_pairs = fixed_pairs(held_out, reader, settings.eval_pairs, settings.seed)
    evaluator = Evaluator(held_out_pairs, fixed_pairs(train, reader, 8, settings.seed))
    evaluator._detector_failed = True  # image metrics only: the landmark metrics do not enter this measure

    def measure() -> tuple[float, float, float]:
        generator = state.evaluated_generator()  # the average with --ema-decay, as the demo evaluates and edits
        images = transfers(generator, held_out_pairs)
        return (evaluator.evaluate(generator)["l1"], image_face_share(images["expression"]),
                image_face_share(images["pose"]))

    curve = [measure()]
    for step in range(steps):
        batch_arrays = sampler.batch(step, batch)
        torch.manual_seed(step_seed(settings.seed, 0, step))
        train_step(state, {key: torch.from_numpy(value) for key, value in batch_arrays.items()})
        if (step + 1) % every == 0:
            curve.append(measure())
    return curve


def image_face_share(images: np.ndarray, size: int = 256) -> float:
    """Share of RGB uint8 images (N, S, S, 3) in which dlib's frontal detector finds a face, scaled to `size`."""
    import cv2
    import dlib

    detector = dlib.get_frontal_face_detector()
    scaled = [cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC) for image in images]
    return sum(len(detector(image, 1)) > 0 for image in scaled) / len(scaled)


def face_share(video: Path, frames: int) -> float:
    """Share of `frames` frames spread over `video` (0: every frame) in which dlib's frontal detector finds a face."""
    import av
    import dlib

    detector = dlib.get_frontal_face_detector()
    with av.open(str(video)) as container:
        images = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    picked = images if frames == 0 else [images[i] for i in np.linspace(0, len(images) - 1, frames).round().astype(int)]
    return sum(len(detector(image, 1)) > 0 for image in picked) / len(picked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="out/demo/dataset", help="a prepared sample dataset")
    parser.add_argument("--steps", type=int, default=900, help="the demo's training steps")
    parser.add_argument("--every", type=int, default=150)
    parser.add_argument("--batch", type=int, default=4, help="the demo's batch")
    parser.add_argument("--demo", help="a finished `portrait demo --output` folder: count faces in its edits")
    parser.add_argument("--frames", type=int, default=0, help="frames spread over each video (0: all)")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    if not args.skip_training:
        curves = {}
        for name, options in RECIPES.items():
            began = time.perf_counter()
            curves[name] = curve = train_curve(args.data, args.steps, args.every, args.batch, options)
            print(f"{name} ({time.perf_counter() - began:.0f} s), every {args.every} steps from 0:")
            print(f"  held-out L1:          {' '.join(f'{l1:.3f}' for l1, _, _ in curve)}")
            print(f"  faces in expression:  {' '.join(f'{share:.2f}' for _, share, _ in curve)}")
            print(f"  faces in pose:        {' '.join(f'{share:.2f}' for _, _, share in curve)}")
        baseline, recipe = ([l1 for l1, _, _ in curve] for curve in curves.values())
        print(f"recipe: last evaluation the lowest (within 0.01): {recipe[-1] <= min(recipe[:-1]) + 0.01}; "
              f"below 0.2: {recipe[-1] < 0.2}")
        print(f"final held-out L1, baseline / recipe = {baseline[-1] / recipe[-1]:.2f}x")
    if args.demo:
        root = Path(args.demo)
        for video in [root / "media" / "source.mp4", *sorted((root / "edited").glob("*.mp4"))]:
            share = face_share(video, args.frames)
            target = "" if video.parent == root / "media" else f" (>= 90%: {share >= 0.9})"
            print(f"{video.relative_to(root)}: face in {share:.0%} of {args.frames or 'all'} frames{target}")


if __name__ == "__main__":
    main()
