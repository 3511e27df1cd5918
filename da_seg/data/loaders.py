"""Infinite, resumable, rank-aware loaders for iteration-based training."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class InfiniteSampler(Sampler[int]):
    """An endless stream of indices: a fresh seeded permutation per epoch, split across ranks.

    ``start`` skips that many of this rank's indices, so a run resumed at iteration ``k`` with
    batch size ``b`` sees exactly the batches it would have seen (``start = k * b``) without
    loading anything it skips.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, start: int = 0):
        if size <= 0:
            raise ValueError("InfiniteSampler needs a non-empty dataset")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size, self.start = rank, world_size, start

    def _epoch(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            order = torch.arange(self.size)
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.size, generator=g)
        # Pad so every rank gets the same count per epoch (as DistributedSampler does).
        per_rank = -(-self.size // self.world_size)
        total = per_rank * self.world_size
        if total > self.size:
            order = torch.cat([order, order[: total - self.size]])
        return order[self.rank: total: self.world_size]

    def __iter__(self) -> Iterator[int]:
        per_rank = -(-self.size // self.world_size)
        epoch, offset = divmod(self.start, per_rank)
        while True:
            for index in self._epoch(epoch)[offset:].tolist():
                yield index
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # DataLoader only uses it for len(); our loaders are endless
        return 2**62


def infinite_loader(dataset: Dataset, batch_size: int, *, seed: int, start_batch: int = 0,
                    num_workers: int = 2, rank: int = 0, world_size: int = 1, pin_memory: bool = False,
                    sampler: Sampler[int] | None = None) -> Iterator[dict]:
    """Yield training batches forever, starting after ``start_batch`` batches (for resume)."""
    if sampler is None:
        sampler = InfiniteSampler(len(dataset), seed, True, rank, world_size, start=start_batch * batch_size)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=pin_memory, drop_last=True, persistent_workers=num_workers > 0,
                        prefetch_factor=4 if num_workers > 0 else None,
                        worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(seed))
    return iter(loader)


def eval_loader(dataset: Dataset, batch_size: int = 1, num_workers: int = 2, rank: int = 0,
                world_size: int = 1) -> DataLoader:
    """Each rank evaluates a disjoint shard (no padding: every image is counted exactly once)."""
    indices = list(range(rank, len(dataset), world_size))
    subset = torch.utils.data.Subset(dataset, indices)
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def _seed_worker(worker_id: int) -> None:
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
