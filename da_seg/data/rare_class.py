"""Rare-class sampling (DAFormer, Hoyer et al. 2022, Sec. 3.3) for a source domain.

Class pixel counts per image are computed once per domain split and cached as JSON. A class c is
drawn with P(c) = softmax((1 - f_c) / T) over the classes' pixel frequencies f_c, then an image
holding at least ``min_pixels`` pixels of c is drawn uniformly. Counts are taken at the labels'
native resolution, as in DAFormer (whose min_pixels = 3000 refers to full-size GTA5 labels).
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

from da_seg.data.domains import Domain, DomainError

CACHE_VERSION = 1


@dataclass(frozen=True)
class ClassStats:
    """Per-image class pixel counts of one labelled split, in ``domain.samples(split, True)`` order."""

    domain: str
    split: str
    names: tuple[str, ...]
    pixel_counts: np.ndarray  # (N images, C classes) int64; ignore pixels are not counted

    @property
    def num_classes(self) -> int:
        return self.pixel_counts.shape[1]

    @property
    def frequencies(self) -> np.ndarray:
        """(C,) share of each class among all labelled pixels."""
        total = self.pixel_counts.sum(axis=0).astype(np.float64)
        return total / max(total.sum(), 1.0)

    def images_with_class(self, class_id: int, min_pixels: int) -> np.ndarray:
        """Indices of the images holding at least ``min_pixels`` pixels of ``class_id``."""
        return np.flatnonzero(self.pixel_counts[:, class_id] >= min_pixels)


def _label_fingerprint(domain: Domain) -> str:
    spec = domain.label_spec
    text = repr((spec.encoding, spec.channel, spec.id_map, spec.rgb_map, spec.ignore_values, spec.unknown))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _count_one(args: tuple[Domain, Path, int]) -> np.ndarray:
    domain, label_path, num_classes = args
    label = domain.read_label(label_path)
    return np.bincount(label.ravel(), minlength=256)[:num_classes]


def compute_class_stats(domain: Domain, split: str, workers: int = 0) -> ClassStats:
    """Read every label of the split once (``workers`` > 0: in that many processes)."""
    samples = domain.samples(split, with_labels=True)
    jobs = [(domain, s.label, domain.num_classes) for s in samples]
    if workers > 0:
        with ProcessPoolExecutor(workers) as pool:
            counts = list(pool.map(_count_one, jobs, chunksize=16))
    else:
        counts = [_count_one(job) for job in jobs]
    return ClassStats(domain.name, split, tuple(s.name for s in samples), np.stack(counts).astype(np.int64))


def cache_paths(domain: Domain, split: str) -> list[Path]:
    """Where the stats of a split are cached: beside the data, else under $DA_SEG_CACHE."""
    file = f"class_stats_{split}.json"
    fallback = Path(os.environ.get("DA_SEG_CACHE", Path.home() / ".cache" / "da_seg")).expanduser()
    return [domain.root / ".da_seg" / file, fallback / domain.name / file]


def class_stats(domain: Domain, split: str, refresh: bool = False, workers: int = 0) -> ClassStats:
    """Cached :func:`compute_class_stats`; a cache whose file list or label mapping no longer
    matches the split is recomputed."""
    names = tuple(s.name for s in domain.samples(split, with_labels=True))
    fingerprint = _label_fingerprint(domain)
    if not refresh:
        for path in cache_paths(domain, split):
            stats = _load_cache(path, domain, split, names, fingerprint)
            if stats is not None:
                return stats
    stats = compute_class_stats(domain, split, workers)
    payload = {
        "version": CACHE_VERSION,
        "domain": domain.name,
        "split": split,
        "label_fingerprint": fingerprint,
        "class_names": list(domain.class_names),
        "names": list(stats.names),
        "pixel_counts": stats.pixel_counts.tolist(),
    }
    for path in cache_paths(domain, split):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(payload, separators=(",", ":")))
            tmp.replace(path)
            break
        except OSError:
            continue  # read-only dataset root: fall back to $DA_SEG_CACHE
    return stats


def _load_cache(path: Path, domain: Domain, split: str, names, fingerprint: str) -> ClassStats | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (
        data.get("version") != CACHE_VERSION
        or data.get("label_fingerprint") != fingerprint
        or tuple(data.get("names", ())) != names
        or len(data.get("class_names", ())) != domain.num_classes
    ):
        return None
    counts = np.asarray(data["pixel_counts"], np.int64).reshape(len(names), domain.num_classes)
    return ClassStats(domain.name, split, names, counts)


def rare_class_probabilities(frequencies: np.ndarray, temperature: float = 0.01) -> np.ndarray:
    """P(c) = softmax((1 - f_c) / T): the rarer the class, the likelier it is drawn."""
    logits = (1.0 - np.asarray(frequencies, np.float64)) / temperature
    logits -= logits.max()
    weights = np.exp(logits)
    return weights / weights.sum()


class RareClassSampler(Sampler[int]):
    """Infinite stream of dataset indices drawn by rare-class sampling.

    The stream is a pure function of ``seed``: global position g is drawn from a generator seeded
    by (seed, g // block), so any position is reached without replaying the ones before it. Rank r
    of ``world_size`` takes positions r, r + world_size, ...; together the ranks consume the same
    global stream whatever the number of processes.

    ``state`` counts the indices this rank has yielded. A DataLoader prefetches, so on resume set
    ``state`` (or pass it) from the number of samples the training loop actually consumed,
    i.e. iterations x per-rank batch size, not from the sampler of the interrupted run.
    """

    block = 4096

    def __init__(
        self,
        stats: ClassStats,
        *,
        temperature: float = 0.01,
        min_pixels: int = 3000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        state: int = 0,
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.seed, self.rank, self.world_size, self.state = seed, rank, world_size, state
        self.candidates = [stats.images_with_class(c, min_pixels) for c in range(stats.num_classes)]
        eligible = np.array([len(c) > 0 for c in self.candidates])
        if not eligible.any():
            raise DomainError(
                f"rare-class sampling on {stats.domain}/{stats.split}: no image holds {min_pixels} pixels "
                "of any class; lower min_pixels"
            )
        probs = rare_class_probabilities(stats.frequencies[eligible], temperature)
        self.class_probabilities = np.zeros(stats.num_classes)
        self.class_probabilities[eligible] = probs  # classes no image has enough of are never drawn
        self._classes = np.flatnonzero(eligible)
        self._cached_block: tuple[int, np.ndarray, np.ndarray] | None = None  # block, indices, classes

    @classmethod
    def for_dataset(cls, dataset, *, start: int = 0, workers: int = 0, **options) -> "RareClassSampler":
        """Sampler over a labelled :class:`~da_seg.data.datasets.SegmentationDataset`, with the
        class statistics of its domain split (computed once, then cached). ``start`` = ``state``."""
        if not dataset.with_labels:
            raise DomainError(
                f"rare-class sampling needs labels: {dataset.domain.name}/{dataset.split} was opened without"
            )
        stats = class_stats(dataset.domain, dataset.split, workers=workers)
        if stats.names != tuple(s.name for s in dataset.samples):
            raise DomainError(
                f"class statistics of {dataset.domain.name}/{dataset.split} do not follow the dataset's "
                "sample order; rebuild them with class_stats(..., refresh=True)"
            )
        return cls(stats, state=start, **options)

    def _block_indices(self, block: int) -> np.ndarray:
        if self._cached_block is None or self._cached_block[0] != block:
            rng = np.random.default_rng([self.seed, block])
            classes = rng.choice(self._classes, size=self.block, p=self.class_probabilities[self._classes])
            uniform = rng.random(self.block)
            indices = np.empty(self.block, np.int64)
            for c in np.unique(classes):
                pick = classes == c
                pool = self.candidates[c]
                indices[pick] = pool[(uniform[pick] * len(pool)).astype(np.int64)]
            self._cached_block = (block, indices, classes)
        return self._cached_block[1]

    def index_at(self, position: int) -> int:
        """The dataset index at global stream ``position``."""
        return int(self._block_indices(position // self.block)[position % self.block])

    def class_at(self, position: int) -> int:
        """The class drawn for global stream ``position`` (its image holds >= min_pixels of it)."""
        self._block_indices(position // self.block)
        return int(self._cached_block[2][position % self.block])

    def position_of(self, consumed: int) -> int:
        """The global stream position of this rank's ``consumed``-th sample (``state`` counting)."""
        return self.rank + self.world_size * consumed

    def __iter__(self) -> Iterator[int]:
        while True:
            position = self.position_of(self.state)
            index = self.index_at(position)
            self.state += 1
            yield index

    def state_dict(self) -> dict:
        return {"state": self.state, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.state = int(state["state"])
        self.seed = int(state.get("seed", self.seed))
        self._cached_block = None
