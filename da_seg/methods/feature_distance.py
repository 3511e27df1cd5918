"""DAFormer's ImageNet feature distance (Hoyer et al., CVPR 2022), used by ``mean_teacher``.

On the *source* batch: the L2 distance between the student's ``features["backbone"]`` and those of
a frozen ImageNet-initialised copy of the segmenter, averaged over feature cells whose downscaled
source label is one of the "thing" classes (a cell's label: its majority class if it covers
>= 0.75 of the cell), so that the adapted encoder keeps ImageNet's notion of objects.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def downscale_labels(labels: Tensor, size: tuple[int, int], num_classes: int, min_ratio: float,
                     ignore_index: int = 255) -> Tensor:
    """(N, H, W) -> (N, h, w): each cell's majority class if it covers >= ``min_ratio`` of the cell
    (ignore pixels counted as a class of their own), else ``ignore_index`` (DAFormer)."""
    slots = torch.where((labels >= 0) & (labels < num_classes), labels, num_classes)
    onehot = F.one_hot(slots, num_classes + 1).permute(0, 3, 1, 2).float()  # (N, C + 1, H, W)
    share, cls = F.adaptive_avg_pool2d(onehot, size).max(1)                 # (N, h, w)
    return torch.where((share >= min_ratio) & (cls < num_classes), cls, torch.full_like(cls, ignore_index))


def feature_distance(student_features: Tensor, reference_features: Tensor, labels: Tensor | None,
                     classes: tuple[int, ...], num_classes: int, min_ratio: float) -> Tensor:
    """Mean L2 distance (over channels) between two (N, D, h, w) feature maps, over the cells whose
    downscaled label is in ``classes`` (all cells when ``classes`` is empty); 0 if there are none."""
    distance = torch.linalg.vector_norm(student_features.float() - reference_features.float(), dim=1)  # (N, h, w)
    if not classes or labels is None:
        return distance.mean()
    cells = downscale_labels(labels, tuple(distance.shape[-2:]), num_classes, min_ratio)
    wanted = torch.tensor(classes, device=cells.device)
    mask = (cells.unsqueeze(-1) == wanted).any(-1).float()
    return (distance * mask).sum() / mask.sum().clamp_min(1.0)
