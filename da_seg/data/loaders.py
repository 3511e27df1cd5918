"""Infinite, resumable, rank-aware loaders for iteration-based training.

Every loader made here reports a data error (a DomainError: truncated image, label of the wrong
size, unknown label value) with da_seg's own one-line message, whatever ``num_workers`` is; see
:class:`OwnErrors`.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from da_seg.data.domains import DomainError


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
    return _OwnErrorsIterator(iter(loader))


def eval_loader(dataset: Dataset, batch_size: int = 1, num_workers: int = 2, rank: int = 0,
                world_size: int = 1) -> OwnErrors:
    """Each rank evaluates a disjoint shard (no padding: every image is counted exactly once)."""
    indices = list(range(rank, len(dataset), world_size))
    subset = torch.utils.data.Subset(dataset, indices)
    return OwnErrors(DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers))


class OwnErrors:
    """A DataLoader whose data errors reach the caller as the dataset raised them.

    With ``num_workers > 0`` torch re-raises a worker's exception in the main process as
    ``type(e)("Caught DomainError in DataLoader worker process 0.\\nOriginal Traceback ...")``:
    the same class, but with the worker's whole traceback as its message, which buries the one
    line that names the bad file. Iterating this wrapper gives the DomainError back its own
    message. ``len`` and every other attribute are the loader's.
    """

    def __init__(self, loader: Iterable):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        return _OwnErrorsIterator(iter(self.loader))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class _OwnErrorsIterator:
    """A DataLoader iterator (see :class:`OwnErrors`); other attributes, such as the trainer's
    ``_shutdown_workers``, are the wrapped iterator's."""

    def __init__(self, iterator: Iterator):
        self._iterator = iterator

    def __iter__(self) -> _OwnErrorsIterator:
        return self

    def __next__(self):
        try:
            return next(self._iterator)
        except DomainError as error:
            original = worker_error_message(error)
            if original is None:
                raise
            raise type(error)(original) from None  # from None: the worker's traceback is the noise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._iterator, name)


def worker_error_message(error: BaseException) -> str | None:
    """The message a DataLoader worker's exception was raised with, or None if ``error`` is not
    torch's re-raised copy of one.

    The copy's message is ``Caught <Type> in DataLoader worker process <i>.\\nOriginal `` plus
    ``traceback.format_exception`` of the original, whose last entry is the line(s)
    ``<module>.<Type>: <message>``; the original message is what follows the last such prefix.
    """
    text = str(error)
    kind = type(error)
    if not text.startswith(f"Caught {kind.__name__} in DataLoader worker process"):
        return None
    prefix = f"\n{kind.__module__}.{kind.__qualname__}: "
    at = text.rfind(prefix)
    if at < 0:
        return None
    return text[at + len(prefix):].rstrip("\n")


def _seed_worker(worker_id: int) -> None:
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
