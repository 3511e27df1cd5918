"""Supervised cross-entropy on labelled batches: the source-only baseline and the target oracle."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from da_seg.methods.base import Component, OptionError, StepContext
from da_seg.methods.common import check_nonnegative, supervised_views
from da_seg.models.segmenter import SegmenterOutput, upsample_logits


@dataclass(frozen=True)
class CrossEntropyOptions:
    weight: float = 1.0
    aux_weight: float = 0.1       # multi-level DeepLab: 0.1 x CE on the layer3 head (AdaptSegNet)
    label_smoothing: float = 0.0
    class_weighted: bool = False  # class weights 1 - batch frequency (SAN-SAW; see batch_class_weights)

    def __post_init__(self):
        check_nonnegative(self, ("weight", "aux_weight", "label_smoothing"))
        if self.label_smoothing >= 1:
            raise OptionError("label_smoothing", f"= {self.label_smoothing!r}; expected a value in [0, 1)")


def batch_class_weights(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """SAN-SAW's CE class weights from the batch itself: w_c = 1 - (pixels of c) / (all pixels).

    labels: (N, H, W) int64 -> (num_classes,) float32, no gradient. As the release, the
    denominator counts every pixel, ignored ones included; F.cross_entropy then takes the
    weighted mean sum_i w_{y_i} l_i / sum_i w_{y_i}, so only the ratios between classes matter:
    frequent classes (road, sky) weigh less than rare ones.
    """
    # Ignored pixels go to an extra bin instead of being dropped: no boolean indexing, no host sync.
    binned = torch.where(labels == ignore_index, torch.full_like(labels, num_classes), labels)
    counts = torch.bincount(binned.flatten(), minlength=num_classes + 1)[:num_classes]
    return 1.0 - counts.float() / labels.numel()


def segmentation_ce(out: SegmenterOutput, labels: Tensor, options: CrossEntropyOptions,
                    ignore_index: int, ctx: StepContext | None = None) -> dict[str, Tensor]:
    """CE of logits upsampled to the label size. labels: (N, H, W) int64 -> {'ce', 'ce_aux'?}.
    With ``ctx`` the upsampled logits are the step's shared ones (``StepContext.upsampled``)."""
    size = labels.shape[-2:]
    upsample = ctx.upsampled if ctx is not None else (lambda x, s, a: upsample_logits(x, s, a).float())
    class_weights = None
    if options.class_weighted:
        class_weights = batch_class_weights(labels, out.logits.shape[1], ignore_index)
    terms = {}
    for suffix, logits, view_labels, _, share in supervised_views(out, labels):  # HRDA: fused + detail crop
        terms[f"ce{suffix}"] = options.weight * share * F.cross_entropy(
            upsample(logits, view_labels.shape[-2:], out.align_corners), view_labels,
            weight=class_weights, ignore_index=ignore_index, label_smoothing=options.label_smoothing)
    if out.aux_logits is not None and options.aux_weight > 0:
        terms["ce_aux"] = options.weight * options.aux_weight * F.cross_entropy(
            upsample(out.aux_logits, size, out.align_corners), labels, weight=class_weights, ignore_index=ignore_index,
            label_smoothing=options.label_smoothing)
    return terms


class SourceCE(Component):
    """Cross-entropy on the labelled source batch."""

    name = "source_ce"
    Options = CrossEntropyOptions
    uses_source = True
    loss_domains = ("source",)

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        return segmentation_ce(ctx.source_out, ctx.source.labels, self.options, self.setup.ignore_index, ctx)


class TargetCE(Component):
    """Cross-entropy on *target* labels: the oracle upper bound. Loads target labels."""

    name = "target_ce"
    Options = CrossEntropyOptions
    uses_target = True
    uses_target_labels = "ground_truth"
    loss_domains = ("target",)

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        return segmentation_ce(ctx.target_out, ctx.target.labels, self.options, self.setup.ignore_index, ctx)


@dataclass(frozen=True)
class TargetBatchNormOptions:
    pass


class TargetBatchNorm(Component):
    """A control, not a method: the target batch goes through the segmenter with no loss.

    Every target-side method (MinEnt, AdvEnt, mean teacher) forwards target batches in training
    mode, so BatchNorm's running statistics drift towards the target whatever the loss does. This
    component does only that, so that ``source_ce + target_bn`` measures how much of a method's
    gain is BatchNorm seeing the target (an online AdaBN) rather than the method's loss.
    No gradient flows from it: it contributes no loss term. List it with ``source_ce`` only (with a
    target method it would add a second target forward and a second statistics update).
    """

    name = "target_bn"
    Options = TargetBatchNormOptions
    uses_target = True
    loss_domains = ()  # its forward has no graph

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        # Not through the ctx.target_out cache: a gradient-free output there would break any
        # target method listed beside it. Training mode, so the running statistics update.
        with torch.no_grad():
            ctx.forward(ctx.target.images)
        return {}
