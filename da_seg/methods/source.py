"""Supervised cross-entropy on labelled batches: the source-only baseline and the target oracle."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from da_seg.methods.base import Component, StepContext
from da_seg.models.segmenter import SegmenterOutput, upsample_logits


@dataclass(frozen=True)
class CrossEntropyOptions:
    weight: float = 1.0
    aux_weight: float = 0.1       # multi-level DeepLab: 0.1 x CE on the layer3 head (AdaptSegNet)
    label_smoothing: float = 0.0


def segmentation_ce(out: SegmenterOutput, labels: Tensor, options: CrossEntropyOptions,
                    ignore_index: int) -> dict[str, Tensor]:
    """CE of logits upsampled to the label size. labels: (N, H, W) int64 -> {'ce', 'ce_aux'?}."""
    size = labels.shape[-2:]
    terms = {"ce": options.weight * F.cross_entropy(
        upsample_logits(out.logits, size).float(), labels, ignore_index=ignore_index,
        label_smoothing=options.label_smoothing)}
    if out.aux_logits is not None and options.aux_weight > 0:
        terms["ce_aux"] = options.weight * options.aux_weight * F.cross_entropy(
            upsample_logits(out.aux_logits, size).float(), labels, ignore_index=ignore_index,
            label_smoothing=options.label_smoothing)
    return terms


class SourceCE(Component):
    """Cross-entropy on the labelled source batch."""

    name = "source_ce"
    Options = CrossEntropyOptions
    uses_source = True

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        return segmentation_ce(ctx.source_out, ctx.source.labels, self.options, self.setup.ignore_index)


class TargetCE(Component):
    """Cross-entropy on *target* labels: the oracle upper bound. Loads target labels."""

    name = "target_ce"
    Options = CrossEntropyOptions
    uses_target = True
    uses_target_labels = True

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        return segmentation_ce(ctx.target_out, ctx.target.labels, self.options, self.setup.ignore_index)
