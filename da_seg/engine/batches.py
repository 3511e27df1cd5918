"""The first step of every training step: a domain's next batch, decoded, moved and augmented."""
from __future__ import annotations

import functools
from typing import Callable

import torch

from da_seg.data.augment import BatchAugment
from da_seg.data.datasets import SegmentationDataset
from da_seg.data.domains import Domain
from da_seg.data.importance import ImportanceSampler
from da_seg.data.loaders import infinite_loader
from da_seg.data.rare_class import RareClassSampler
from da_seg.methods.base import DomainBatch


class AugmentedStream:
    """An endless, resumable stream of one domain's augmented batches on the device.

    The loader (and its worker processes) starts on the first ``next()``, at batch ``start``:
    a resumed run sees the same batches as an uninterrupted one. ``sampler``: a factory
    ``dataset -> sampler`` (rare class sampling), else a seeded permutation stream.
    ``min_class_pixels`` > 0 (with a sampler that has ``class_at``): a sample's crop is redrawn,
    up to 9 times, until it holds more than that many pixels of the class it was drawn for.
    ``margins`` (top, bottom, left, right) != 0: each batch carries ``valid``, False in those
    borders of the loaded image, cropped and flipped with it.
    """

    def __init__(self, domain: Domain, split: str, *, with_labels: bool, size, batch_size: int, seed: int,
                 num_workers: int, augment: BatchAugment, device: torch.device, start: int = 0, rank: int = 0,
                 world_size: int = 1, channels_last: bool = False, sampler: Callable | None = None,
                 min_class_pixels: float = 0.0, margins: tuple[int, int, int, int] = (0, 0, 0, 0)):
        self.domain, self.split, self.with_labels, self.size = domain, split, with_labels, size
        self.batch_size, self.seed, self.num_workers, self.start = batch_size, seed, num_workers, start
        self.augment, self.device, self.channels_last = augment, device, channels_last
        self.rank, self.world_size, self.sampler = rank, world_size, sampler
        self.min_class_pixels, self.margins = min_class_pixels, tuple(margins)
        self._iterator = None
        self._sampler = None
        self._consumed = start * batch_size   # samples of this rank taken so far (sampler state)

    def _open(self):
        dataset = SegmentationDataset(self.domain, self.split, with_labels=self.with_labels, size=self.size)
        sampler = self._sampler = self.sampler(dataset) if self.sampler is not None else None
        return infinite_loader(dataset, self.batch_size, seed=self.seed, start_batch=self.start,
                               num_workers=self.num_workers, rank=self.rank, world_size=self.world_size,
                               pin_memory=self.device.type == "cuda", sampler=sampler)

    def next(self) -> DomainBatch:
        """images (N, 3, H, W) float in [0, 1] after augmentation; labels (N, H, W) int64 or None."""
        if self._iterator is None:
            self._iterator = self._open()
        raw = next(self._iterator)
        raw_images = raw["image"].to(self.device, non_blocking=True)
        raw_labels = raw["label"].to(self.device, non_blocking=True) if self.with_labels else None
        valid = None
        if any(self.margins):
            valid = _inside_margins(raw_images.shape, self.margins, self.device)
            images, labels, valid = self.augment(raw_images, raw_labels, valid)
        else:
            images, labels = self.augment(raw_images, raw_labels)
        if self.min_class_pixels > 0 and labels is not None and hasattr(self._sampler, "class_at"):
            images, labels = self._recrop_rare(raw_images, raw_labels, images, labels)
        self._consumed += len(raw_images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return DomainBatch(images, labels, raw["index"], valid)

    def _recrop_rare(self, raw_images, raw_labels, images, labels):
        """DAFormer's ``get_rare_class_sample``: crop again (up to 9 more times) each sample whose
        crop holds no more than ``min_class_pixels`` pixels of the class it was sampled for."""
        first = self._consumed
        classes = torch.tensor([self._sampler.class_at(self._sampler.position_of(first + j))
                                for j in range(len(raw_images))], device=labels.device)
        for _ in range(9):
            short = ((labels == classes.view(-1, 1, 1)).sum((1, 2)) <= self.min_class_pixels).nonzero().flatten()
            if len(short) == 0:
                break
            again_images, again_labels = self.augment(raw_images[short], raw_labels[short])
            images, labels = images.clone(), labels.clone()
            images[short], labels[short] = again_images, again_labels
        return images, labels

    def close(self) -> None:
        """Stop the loader's worker processes. Persistent workers otherwise outlive the run: a
        sweep, which trains many runs in one process, would keep every run's workers."""
        shutdown = getattr(self._iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._iterator = None


def _inside_margins(shape, margins: tuple[int, int, int, int], device) -> torch.Tensor:
    """(N, 3, H, W) -> (N, H, W) bool, False within ``margins`` = (top, bottom, left, right) pixels."""
    n, _, height, width = shape
    top, bottom, left, right = margins
    valid = torch.zeros(n, height, width, dtype=torch.bool, device=device)
    valid[:, top:height - bottom, left:width - right] = True
    return valid


def training_streams(trainer) -> tuple[AugmentedStream | None, AugmentedStream | None]:
    """A ``Trainer``'s source and target streams (None for a domain no component uses), starting
    at its iteration, with the seeds, samplers and augmentations its recipe names."""
    recipe, data, dist = trainer.recipe, trainer.recipe.data, trainer.dist
    common = dict(batch_size=data.batch_size, num_workers=data.num_workers, device=trainer.device,
                  start=trainer.iteration, rank=dist.rank, world_size=dist.world_size,
                  channels_last=recipe.model.channels_last)
    source = target = None
    if trainer.uses_source:
        sampler = None
        if data.sampler == "rare_class":  # DAFormer's rare class sampling of the source
            sampler = functools.partial(RareClassSampler.for_dataset, temperature=data.rare_class_temperature,
                                        min_pixels=data.rare_class_min_pixels, seed=recipe.train.seed,
                                        rank=dist.rank, world_size=dist.world_size,
                                        start=trainer.iteration * data.batch_size)
        source = AugmentedStream(trainer.source_domain, data.source_split, with_labels=True, size=data.source_size,
                                 seed=recipe.train.seed * 7919, augment=trainer.source_augment, sampler=sampler,
                                 min_class_pixels=data.rare_class_min_pixels * data.rare_class_min_crop_ratio,
                                 **common)
    if trainer.uses_target:
        sampler = None
        if data.target_sample_weights:  # SAC's importance sampling of the target
            sampler = functools.partial(ImportanceSampler.for_dataset, weights=data.target_sample_weights,
                                        prior=0.25 if data.target_uniform_prior is None else data.target_uniform_prior,
                                        seed=recipe.train.seed + 1, rank=dist.rank, world_size=dist.world_size,
                                        start=trainer.iteration * data.batch_size)
        target = AugmentedStream(trainer.target_domain, data.target_split, with_labels=trainer.target_labels,
                                 size=data.target_size, seed=recipe.train.seed * 7919 + 1,
                                 augment=trainer.target_augment, sampler=sampler,
                                 margins=data.target_pseudo_margins, **common)
    return source, target
