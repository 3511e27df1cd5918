"""Segmentation metrics from one confusion matrix accumulated over a whole evaluation set.

Rows are ground truth, columns predictions. Pixels whose label is outside ``[0, num_classes)``
(the ignore index 255 included) never enter the matrix, so a prediction is only ever scored
where a class is annotated. IoU and mIoU are in percent, as everywhere in da_seg.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class SegMetrics:
    """Scores of one evaluation, all in percent.

    iou:            per-class IoU, NaN for a class absent from both ground truth and prediction.
    miou:           mean of the non-NaN ``iou`` entries (NaN when every class is absent).
    pixel_accuracy: correctly labelled pixels / annotated pixels.
    subsets:        {subset name: mIoU over those train ids}, e.g. the SYNTHIA 16- and 13-class sets.
    """

    iou: tuple[float, ...]
    miou: float
    pixel_accuracy: float
    subsets: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        """The per-domain entry of metrics.json; NaN becomes null (JSON has no NaN)."""
        return {
            "miou": _json_float(self.miou),
            "iou": [_json_float(v) for v in self.iou],
            "subsets": {name: _json_float(v) for name, v in self.subsets.items()},
            "pixel_accuracy": _json_float(self.pixel_accuracy),
        }


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _nanmean(values: Sequence[float]) -> float:
    present = [v for v in values if not math.isnan(v)]
    return sum(present) / len(present) if present else math.nan


class ConfusionMatrix:
    """Accumulates a (C, C) int64 confusion matrix on ``device``; ``matrix[gt, pred]`` counts pixels."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred, target: (N, H, W) integer train ids; target pixels outside [0, C) are skipped."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(target.shape)}")
        n = self.num_classes
        pred = pred.to(self.matrix.device, torch.int64).flatten()
        target = target.to(self.matrix.device, torch.int64).flatten()
        valid = (target >= 0) & (target < n)
        pred, target = pred[valid], target[valid]
        if pred.numel():
            # A prediction outside [0, C) would alias into another cell instead of failing.
            low, high = (int(v) for v in torch.aminmax(pred))
            if low < 0 or high >= n:
                raise ValueError(f"predictions must be in [0, {n}), got range [{low}, {high}]")
        self.matrix += torch.bincount(n * target + pred, minlength=n * n).view(n, n)

    def all_reduce_(self) -> "ConfusionMatrix":
        """Sums the matrix over torch.distributed ranks (a no-op when not initialized)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)
        return self

    def compute(self, class_subsets: Mapping[str, Sequence[int]] | None = None) -> SegMetrics:
        """IoU = diag / (row + col - diag) per class; mIoU and subset mIoUs are NaN-means."""
        mat = self.matrix.double().cpu()
        diag = mat.diag()
        union = mat.sum(1) + mat.sum(0) - diag
        iou = torch.where(union > 0, 100.0 * diag / union.clamp_min(1), torch.tensor(math.nan))
        iou_list = tuple(float(v) for v in iou)
        total = float(mat.sum())
        pixel_accuracy = 100.0 * float(diag.sum()) / total if total > 0 else math.nan
        subsets = {}
        for name, ids in (class_subsets or {}).items():
            bad = [i for i in ids if not 0 <= int(i) < self.num_classes]
            if bad:
                raise ValueError(f"class subset {name!r} has train ids {bad} outside "
                                 f"[0, {self.num_classes})")
            subsets[name] = _nanmean([iou_list[int(i)] for i in ids])
        return SegMetrics(iou=iou_list, miou=_nanmean(iou_list),
                          pixel_accuracy=pixel_accuracy, subsets=subsets)
