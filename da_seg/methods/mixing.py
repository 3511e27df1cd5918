"""ClassMix (Olsson et al., WACV 2021) as DACS and DAFormer use it: cut half of the classes out of a
source image and paste them onto a target image.

The mask is built on the device without a host sync: per image, the present classes get random
scores and the ``ceil(n / 2)`` lowest-scored are chosen (uniformly, without replacement, as
``np.random.choice(n, (n + n % 2) // 2, replace=False)`` in DACS).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CHOICES = ("per_image", "per_batch")


def present_classes(labels: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """labels (N, H, W) int64 -> (N, C) bool: which classes occur in each image (ignore excluded)."""
    n = labels.shape[0]
    slots = torch.where((labels >= 0) & (labels < num_classes), labels, num_classes)  # ignore -> slot C
    present = torch.zeros(n, num_classes + 1, dtype=torch.bool, device=labels.device)
    present.scatter_(1, slots.reshape(n, -1), True)
    return present[:, :num_classes]


def choose_half(present: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(N, C) bool present classes -> (N, C) bool: ``ceil(n_i / 2)`` of image i's n_i classes, at random."""
    count = present.sum(1, keepdim=True)                                  # (N, 1)
    wanted = torch.div(count + 1, 2, rounding_mode="floor")               # ceil(n / 2)
    scores = torch.rand(present.shape, device=present.device, generator=generator)
    scores = scores.masked_fill(~present, 2.0)                           # absent classes rank last
    rank = scores.argsort(1).argsort(1)                                   # (N, C) rank of each class
    return present & (rank < wanted)


def class_mix_masks(labels: Tensor, num_classes: int, choice: str = "per_image", ignore_index: int = 255,
                    generator: torch.Generator | None = None) -> Tensor:
    """Source labels (N, H, W) -> paste masks (N, H, W) bool, True where the source pixel is pasted.

    ``per_image`` (DACS): each image's half is drawn from the classes of that image.
    ``per_batch`` (DAFormer [!]): drawn, per image, from the classes present anywhere in the batch,
    so a chosen class may be absent from the image and fewer than half of its classes get pasted.
    Ignore pixels are never pasted (DAFormer can also draw 255 as a "class"; we do not).
    """
    if choice not in CHOICES:
        raise ValueError(f"ClassMix class choice {choice!r}; valid: {', '.join(CHOICES)}")
    present = present_classes(labels, num_classes, ignore_index)
    if choice == "per_batch":
        present = present.any(0, keepdim=True).expand_as(present)
    chosen = choose_half(present, generator)                              # (N, C)
    n = labels.shape[0]
    table = torch.cat([chosen, chosen.new_zeros(n, 1)], 1)                # slot C (ignore) never pasted
    slots = torch.where((labels >= 0) & (labels < num_classes), labels, num_classes)
    return table.gather(1, slots.reshape(n, -1)).view_as(labels)


@dataclass
class MixedBatch:
    """images (N, 3, H, W); labels (N, H, W) int64; weights (N, H, W) float; mask (N, H, W) bool (pasted)."""

    images: Tensor
    labels: Tensor
    weights: Tensor
    mask: Tensor


def class_mix(source_images: Tensor, source_labels: Tensor, target_images: Tensor, pseudo_labels: Tensor,
              pseudo_weights: Tensor, mask: Tensor) -> MixedBatch:
    """Paste source pixels (where ``mask``) onto target images, with their ground truth and weight 1;
    the rest keeps the target's pseudo-labels and their weights (DACS: q, DAFormer: q or 0 at borders)."""
    if source_images.shape != target_images.shape:
        raise ValueError(f"ClassMix needs source and target batches of one shape, got source "
                         f"{tuple(source_images.shape)} and target {tuple(target_images.shape)}; give both "
                         "domains the same data.batch_size and the same augment.<domain>.crop")
    images = torch.where(mask.unsqueeze(1), source_images, target_images)
    labels = torch.where(mask, source_labels, pseudo_labels)
    weights = torch.where(mask, torch.ones_like(pseudo_weights), pseudo_weights)
    return MixedBatch(images, labels, weights, mask)
