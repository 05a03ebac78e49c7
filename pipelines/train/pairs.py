"""Training pairs as the official sampler draws them: identity -> clip of it -> two frames of that clip.

Every rank samples from the whole catalogue with its own random stream, so ranks see different
pairs and any number of shards (one shard and sixteen ranks included) serves any number of
workers; every rank runs the same number of steps because an epoch is not a pass over the data
but a fixed number of steps. The stream of step `s` on rank `r` is seeded by (seed, r, s) alone:
the pairs of a step never depend on what came before, so a resumed run draws exactly the pairs an
uninterrupted one would. A clip that turns out unusable is skipped by drawing again from the same
stream; whether a clip is usable is a property of the data, so this too is reproducible.

Frames A and B are drawn with replacement (A = B is possible, as in the official sampler), from
the first `frame_window` frames when the reader has one (the official sampler: 500).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipelines.train.clips import Catalogue, ClipReader, LoadedClip, TrainingDataError

_EVAL_STREAM = 1 << 30
"""Rank number of the random stream that picks the fixed evaluation pairs (never a real rank)."""


@dataclass(frozen=True)
class Pair:
    """Frames A and B of one clip (copies: a pair does not keep its clip in memory), with their arrays.

    Each array has a leading axis of 2: index 0 is frame A, index 1 frame B.
    """

    key: str
    a: int
    b: int
    frames: np.ndarray = field(repr=False)  # (2, S, S, 3) uint8 RGB
    pose: np.ndarray = field(repr=False)  # (2, 6)
    expression: np.ndarray = field(repr=False)  # (2, 68, 2)
    landmarks: np.ndarray = field(repr=False)  # (2, 68, 2) in pixels of the frames

    @classmethod
    def of(cls, clip: LoadedClip, a: int, b: int) -> Pair:
        index = [a, b]
        return cls(clip.key, a, b, clip.frames[index], clip.pose[index], clip.expression[index], clip.landmarks[index])


def pairs_to_batch(pairs: list[Pair]) -> dict[str, np.ndarray]:
    """The `dpe.train_step` batch: frames (B, 3, S, S) float32 in [-1, 1], pose (B, 6), expression (B, 68, 2)."""
    batch: dict[str, np.ndarray] = {}
    for index, side in enumerate("ab"):
        frames = np.stack([pair.frames[index] for pair in pairs])
        batch[f"frame_{side}"] = frames.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
        batch[f"pose_{side}"] = np.stack([pair.pose[index] for pair in pairs]).astype(np.float32)
        batch[f"expression_{side}"] = np.stack([pair.expression[index] for pair in pairs]).astype(np.float32)
    return batch


class PairSampler:
    """Draws the pairs of each step for one rank (see the module docstring)."""

    def __init__(self, catalogue: Catalogue, reader: ClipReader, *, seed: int, rank: int) -> None:
        self.catalogue = catalogue
        self.reader = reader
        self.seed = seed
        self.rank = rank

    def pairs(self, step: int, count: int) -> list[Pair]:
        """The `count` pairs of `step` on this rank."""
        rng = np.random.default_rng([self.seed, self.rank, step])
        return [self._draw(rng) for _ in range(count)]

    def batch(self, step: int, count: int) -> dict[str, np.ndarray]:
        return pairs_to_batch(self.pairs(step, count))

    def _draw(self, rng: np.random.Generator) -> Pair:
        while True:
            clips = self.catalogue.by_identity[self.catalogue.identities[rng.integers(len(self.catalogue.identities))]]
            loaded = self.reader.load(clips[rng.integers(len(clips))])
            if loaded is not None:
                a, b = rng.integers(loaded.length, size=2)
                return Pair.of(loaded, int(a), int(b))
            self._check_some_usable()

    def _check_some_usable(self) -> None:
        if all(clip.key in self.reader.skipped for clip in self.catalogue.clips):
            raise TrainingDataError(f"no usable clip left in {self.catalogue.describe()}: every sample was skipped "
                                    f"({_skip_summary(self.reader.skipped)})")


def fixed_pairs(catalogue: Catalogue, reader: ClipReader, count: int, seed: int) -> list[Pair]:
    """`count` pairs that stay the same for the whole run (grids and evaluation), spread over the clips:
    pair i is from clip i modulo the number of clips, frames drawn from the run's seed."""
    rng = np.random.default_rng([seed, _EVAL_STREAM])
    pairs: list[Pair] = []
    usable = list(catalogue.clips)
    i = 0
    while len(pairs) < count and usable:
        clip = usable[i % len(usable)]
        loaded = reader.load(clip)
        if loaded is None:
            usable.remove(clip)
            continue
        a, b = rng.integers(loaded.length, size=2)
        pairs.append(Pair.of(loaded, int(a), int(b)))
        i += 1
    return pairs


def _skip_summary(skipped: dict[str, tuple[str, str]]) -> str:
    counts: dict[str, int] = {}
    for failure_class, _ in skipped.values():
        counts[failure_class] = counts.get(failure_class, 0) + 1
    return ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
