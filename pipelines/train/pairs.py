"""Training pairs as the official sampler draws them: identity -> clip of it -> two frames of that clip.

Every rank samples from the whole catalogue with its own random stream, so ranks see different
pairs and any number of shards (one shard and sixteen ranks included) serves any number of
workers; every rank runs the same number of steps because an epoch is not a pass over the data
but a fixed number of steps. The stream of step `s` on rank `r` is seeded by (seed, r, s) alone:
the pairs of a step never depend on what came before, so a resumed run draws exactly the pairs an
uninterrupted one would, and so does a run whose steps are prepared by any number of loader
processes (`PairLoader`). Each draw takes the same numbers from the stream (identity, clip, two
positions in [0, 1)) whether or not the clip turns out usable; an unusable clip is skipped by
drawing again, and usability is a property of the data, so this too is reproducible.

Frames A and B are drawn with replacement (A = B is possible, as in the official sampler), from
the first `frame_window` frames when the reader has one (the official sampler: 500).

`PairLoader` prepares the steps of one rank ahead of the training step in a pool of loader
processes (a torch `DataLoader` over steps: each process has its own `ClipReader`), hands frames
over as uint8 (4x fewer bytes than float32) in pinned memory when CUDA is used, and copies them to
the device without blocking; the conversion to float in [-1, 1] happens there.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from pipelines.train.clips import Catalogue, ClipReader, Pair, TrainingDataError

__all__ = ["Pair", "PairLoader", "PairSampler", "batch_to_device", "fixed_pairs", "pairs_to_batch", "stack_pairs"]

_EVAL_STREAM = 1 << 30
"""Rank number of the random stream that picks the fixed evaluation pairs (never a real rank)."""


def stack_pairs(pairs: list[Pair]) -> dict[str, np.ndarray]:
    """The batch as loaders hand it over: frames (B, 3, S, S) uint8, pose (B, 6), expression (B, 68, 2) float32."""
    batch: dict[str, np.ndarray] = {}
    for index, side in enumerate("ab"):
        batch[f"frame_{side}"] = np.ascontiguousarray(np.stack([pair.frames[index] for pair in pairs]).transpose(0, 3, 1, 2))
        batch[f"pose_{side}"] = np.stack([pair.pose[index] for pair in pairs]).astype(np.float32)
        batch[f"expression_{side}"] = np.stack([pair.expression[index] for pair in pairs]).astype(np.float32)
    return batch


def pairs_to_batch(pairs: list[Pair]) -> dict[str, np.ndarray]:
    """The `dpe.train_step` batch: frames (B, 3, S, S) float32 in [-1, 1], pose (B, 6), expression (B, 68, 2)."""
    batch = stack_pairs(pairs)
    for side in "ab":
        batch[f"frame_{side}"] = batch[f"frame_{side}"].astype(np.float32) / 127.5 - 1.0
    return batch


def batch_to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """A handed-over batch (tensors; frames uint8) on `device` as `dpe.train_step` takes it: the copies
    do not block (from pinned memory they overlap the step), frames become float32 in [-1, 1] there,
    the same values `pairs_to_batch` gives."""
    moved = {name: value.to(device, non_blocking=True) for name, value in batch.items()}
    for side in "ab":
        moved[f"frame_{side}"] = moved[f"frame_{side}"].float() / 127.5 - 1.0
    return moved


def decoded_window_bytes(catalogue: Catalogue, reader: ClipReader) -> int:
    """Bytes of every clip's frame window decoded at the reader's size."""
    return sum(reader.length(clip.frames) for clip in catalogue.clips) * reader.size * reader.size * 3


class PairSampler:
    """Draws the pairs of each step for one rank (see the module docstring).

    `whole` decodes whole clip windows and keeps them (worth it only when they all fit the reader's
    cache, the default choice); otherwise each pair decodes its two frames alone. Same pairs either way.
    """

    def __init__(self, catalogue: Catalogue, reader: ClipReader, *, seed: int, rank: int,
                 whole: bool | None = None) -> None:
        self.catalogue = catalogue
        self.reader = reader
        self.seed = seed
        self.rank = rank
        self.whole = decoded_window_bytes(catalogue, reader) <= reader.cache_bytes if whole is None else whole

    def pairs(self, step: int, count: int) -> list[Pair]:
        """The `count` pairs of `step` on this rank."""
        rng = np.random.default_rng([self.seed, self.rank, step])
        return [self._draw(rng) for _ in range(count)]

    def batch(self, step: int, count: int) -> dict[str, np.ndarray]:
        return pairs_to_batch(self.pairs(step, count))

    def _draw(self, rng: np.random.Generator) -> Pair:
        while True:
            clips = self.catalogue.by_identity[self.catalogue.identities[rng.integers(len(self.catalogue.identities))]]
            clip = clips[rng.integers(len(clips))]
            pair = self.reader.pair(clip, rng.random(2), whole=self.whole)
            if pair is not None:
                return pair
            self._check_some_usable()

    def _check_some_usable(self) -> None:
        if all(clip.key in self.reader.skipped for clip in self.catalogue.clips):
            raise TrainingDataError(f"no usable clip left in {self.catalogue.describe()}: every sample was skipped "
                                    f"({_skip_summary(self.reader.skipped)})")


class _StepPairs:
    """A map-style dataset whose item `step` is (this rank's uint8 batch of that step, samples this
    process found unusable while drawing it). The sampler is built on first use, in the process that
    draws (each loader process its own reader and cache)."""

    def __init__(self, catalogue: Catalogue, reader_options: dict[str, Any], seed: int, rank: int, count: int) -> None:
        self.catalogue = catalogue
        self.reader_options = reader_options
        self.seed, self.rank, self.count = seed, rank, count
        self._sampler: PairSampler | None = None

    def __getitem__(self, step: int) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, str]]]:
        if self._sampler is None:
            self._sampler = PairSampler(self.catalogue, ClipReader(**self.reader_options), seed=self.seed,
                                        rank=self.rank)
        known = set(self._sampler.reader.skipped)
        batch = stack_pairs(self._sampler.pairs(step, self.count))
        batch["step"] = np.array(step, np.int64)
        return batch, {key: value for key, value in self._sampler.reader.skipped.items() if key not in known}


class PairLoader:
    """The batches of steps `start`..`end`-1 of one rank, in order, prepared ahead by `workers` loader
    processes (0: drawn in this process when asked), each `prefetch` steps ahead; `skipped` collects
    what every process found unusable."""

    def __init__(self, catalogue: Catalogue, reader_options: dict[str, Any], *, seed: int, rank: int, count: int,
                 start: int, end: int, workers: int, device: Any, prefetch: int = 2) -> None:
        import torch.utils.data

        self.device = device
        self.skipped: dict[str, tuple[str, str]] = {}
        self._loader = torch.utils.data.DataLoader(
            _StepPairs(catalogue, reader_options, seed, rank, count), batch_size=None, sampler=range(start, end),
            num_workers=workers, prefetch_factor=prefetch if workers else None,
            pin_memory=getattr(device, "type", str(device)) == "cuda")

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(step, batch on the device) for each step."""
        for batch, skipped in self._loader:
            self.skipped.update({key: tuple(value) for key, value in skipped.items()})
            step = int(batch.pop("step"))
            yield step, batch_to_device(batch, self.device)


def fixed_pairs(catalogue: Catalogue, reader: ClipReader, count: int, seed: int) -> list[Pair]:
    """`count` pairs that stay the same for the whole run (grids and evaluation), spread over the clips:
    pair i is from clip i modulo the number of clips, frames drawn from the run's seed."""
    rng = np.random.default_rng([seed, _EVAL_STREAM])
    pairs: list[Pair] = []
    usable = list(catalogue.clips)
    i = 0
    while len(pairs) < count and usable:
        clip = usable[i % len(usable)]
        pair = reader.pair(clip, rng.random(2), whole=False)
        if pair is None:
            usable.remove(clip)
            continue
        pairs.append(pair)
        i += 1
    return pairs


def _skip_summary(skipped: dict[str, tuple[str, str]]) -> str:
    counts: dict[str, int] = {}
    for failure_class, _ in skipped.values():
        counts[failure_class] = counts.get(failure_class, 0) + 1
    return ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
