"""Target importance sampling (SAC, Araslanov & Roth 2021; official ``DataTarget.init_sampling``).

A baseline model's predictions on the target train set give each image's pixel count of every
class, n_ic. For a class c the images are drawn with
    w_c(i) = prior / N + (1 - prior) * n_ic / sum_j n_jc
(``SAMPLE_UNIFORM_PRIOR`` = prior = 0.25; a class no image predicts falls back to uniform).
Each draw first takes a class uniformly (the official loader uses ``index % num_classes`` of a
shuffled index), then an image from that class's distribution, so images holding rare classes
come up more often. The counts live in a JSON file (``data.target_sample_weights``), in the
target split's sample order with the file names, written by the ``warm_start`` stage.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from da_seg.data.domains import DomainError
from da_seg.utils.files import write_json_atomic


def importance_distributions(counts: np.ndarray, prior: float) -> np.ndarray:
    """(N images, C classes) pixel counts -> (C, N): each class's sampling distribution over images."""
    counts = np.asarray(counts, np.float64)
    n = counts.shape[0]
    totals = counts.sum(axis=0)                                         # (C,)
    share = np.where(totals > 0, counts / np.maximum(totals, 1.0), 1.0 / n)  # (N, C)
    return (prior / n + (1.0 - prior) * share).T


def write_counts(path: Path, names: Sequence[str], counts: np.ndarray, checkpoint: str) -> None:
    write_json_atomic({"names": list(names), "pixel_counts": np.asarray(counts, np.int64).tolist(),
                       "checkpoint": checkpoint}, Path(path))


def read_counts(path: str | Path, names: Sequence[str]) -> np.ndarray:
    """The (N, C) counts of ``path`` for the samples ``names`` (the dataset's order)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise DomainError(f"data.target_sample_weights = {str(path)!r}: cannot read it ({err})") from None
    if list(data.get("names", ())) != list(names):
        raise DomainError(f"data.target_sample_weights = {str(path)!r} lists other images than the target split "
                          f"({len(data.get('names', ()))} vs {len(names)}); write it again from this split")
    return np.asarray(data["pixel_counts"], np.int64)


class ImportanceSampler(Sampler[int]):
    """Infinite stream of dataset indices, a pure function of ``seed`` and the position (as
    :class:`~da_seg.data.rare_class.RareClassSampler`): position g of the global stream is drawn
    from a generator seeded by (seed, g // block); rank r of ``world_size`` takes g = r, r + world_size, ...
    ``state``: the indices this rank has yielded (iterations x per-rank batch on resume)."""

    block = 4096

    def __init__(self, counts: np.ndarray, *, prior: float = 0.25, seed: int = 0, rank: int = 0,
                 world_size: int = 1, state: int = 0):
        super().__init__()
        self.cumulative = np.cumsum(importance_distributions(counts, prior), axis=1)  # (C, N)
        self.cumulative[:, -1] = 1.0
        self.seed, self.rank, self.world_size, self.state = seed, rank, world_size, state
        self._cached: tuple[int, np.ndarray] | None = None

    @classmethod
    def for_dataset(cls, dataset, weights: str, *, start: int = 0, **options) -> "ImportanceSampler":
        return cls(read_counts(weights, [s.name for s in dataset.samples]), state=start, **options)

    def _block(self, block: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != block:
            rng = np.random.default_rng([self.seed, block])
            classes = rng.integers(0, self.cumulative.shape[0], size=self.block)
            uniform = rng.random(self.block)
            indices = np.array([np.searchsorted(self.cumulative[c], u, side="right") for c, u in zip(classes, uniform)])
            self._cached = (block, np.minimum(indices, self.cumulative.shape[1] - 1))
        return self._cached[1]

    def __iter__(self) -> Iterator[int]:
        while True:
            position = self.rank + self.state * self.world_size
            self.state += 1
            yield int(self._block(position // self.block)[position % self.block])
