"""Domain generalization: SAN-SAW's losses, on blocks the segmenter carries.

Both train on the labelled source only (no target batch); the normalization blocks themselves
are part of the segmenter (``model.options.dg_norm``, ``da_seg/models/norm.py``), so that they
exist before the optimizer is built and are saved and evaluated with it. These components read
what the blocks left in ``ctx.source_out.features`` and turn it into named losses.

SAN-SAW (Peng et al., CVPR 2022; REFERENCE.md "SAN-SAW"), per SAN stage s (layer1, layer2):
    ce_<s>  = 0.1 * CE(aux classifier of s, labels)            (class-weighted: 1 - batch frequency)
    san_<s> = 0.1 * SmoothL1(SAN(x), ReLU(sum_c norm_c(x * onehot_c)))   (ground-truth regions)
    saw_<s> = 0.1 * SAW(SAN(x))
SAW: for each selected class, rank the channels by |W_aux[c]|; group g takes the g-th ranked
channel of every class, scaled by sigmoid(|W|); per group the K x K covariance
XX^T / (HW - 1) + 1e-5 I, loss = clamp((sum |strict upper triangle| - margin) / (K(K-1)/2), 0),
summed over groups, averaged over images. [!] The release never switches SAW on: ``saw_weight = 0``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from da_seg.methods.base import Component, ComponentSetup, StepContext
from da_seg.methods.common import check_nonnegative, instance_covariance, require_dg_norm, strict_upper
from da_seg.methods.source import batch_class_weights
from da_seg.models.norm import feature_key
from da_seg.models.segmenter import upsample_logits


def saw_loss(x: Tensor, classifier_weight: Tensor, classes: tuple[int, ...], relax_denom: float = 2.0) -> Tensor:
    """Semantic-aware whitening of one SAN output; a scalar.

    x: (N, C, h, w); classifier_weight: (num_classes, C[, 1, 1]) of the stage's aux classifier,
    detached (it only decides which channels to compare, as the release reads it from the state
    dict); classes: the K selected class ids. Groups: C // K, the g-th holding the g-th most
    important channel of each class; margin = floor(K(K-1)/2 / relax_denom), 0 when relax_denom = 0.
    A channel ranked g-th for two classes sits twice in group g, and its variance then counts as
    a covariance: the release groups channels the same way.
    """
    k = len(classes)
    n, c, h, w = x.shape
    groups = c // k
    if k < 2 or groups == 0:
        return x.new_zeros(())
    importance = classifier_weight.detach().reshape(classifier_weight.shape[0], -1)[list(classes)].abs().float()
    ranked = importance.argsort(dim=1, descending=True)[:, :groups]                 # (K, G) channel ids
    scale = torch.sigmoid(importance.gather(1, ranked))                             # (K, G)
    grouped = x.float()[:, ranked.flatten()].reshape(n, k, groups, h, w)            # (N, K, G, h, w)
    grouped = grouped * scale.view(1, k, groups, 1, 1)
    grouped = grouped.transpose(1, 2).reshape(n * groups, k, h, w)                  # one "image" per group
    cov = instance_covariance(grouped).view(n, groups, k, k)
    off_diagonal = k * (k - 1) // 2
    margin = off_diagonal // relax_denom if relax_denom > 0 else 0.0
    total = (cov.abs() * strict_upper(k, x.device)).sum((2, 3))                      # (N, G)
    per_group = torch.clamp((total - margin) / off_diagonal, min=0)
    return per_group.sum(1).mean()


@dataclass(frozen=True)
class SanSawOptions:
    aux_weight: float = 0.1        # CE of each SAN stage's aux 1x1 classifier (release: 0.1)
    san_weight: float = 0.1        # SmoothL1 between SAN(x) and its ground-truth-region target
    saw_weight: float = 0.1        # SAW; 0 reproduces the release, which never computes it
    saw_relax_denom: float = 2.0   # SAW margin = floor(K(K-1)/2 / relax_denom) (release: 2 -> 5 for K = 5)
    class_weighted: bool = True    # aux CE weights 1 - batch frequency (release: weight_loss = True)

    def __post_init__(self):
        check_nonnegative(self, ("aux_weight", "san_weight", "saw_weight", "saw_relax_denom"))


class SanSaw(Component):
    """SAN-SAW's losses on the SAN blocks of ``model.options.dg_norm`` (kind "san_saw").

    List it with ``source_ce`` (the main CE; ``class_weighted = true`` there too for the
    release's weighting). Losses per SAN stage s: ``ce_<s>``, ``san_<s>``, ``saw_<s>``.
    """

    name = "san_saw"
    Options = SanSawOptions
    uses_source = True
    loss_domains = ("source",)

    def __init__(self, options: SanSawOptions, setup: ComponentSetup):
        super().__init__(options, setup)
        self.dg_norm = require_dg_norm(setup, "san_saw", self.name)

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        features, labels = ctx.source_out.features, ctx.source.labels
        ignore = self.setup.ignore_index
        class_weights = None
        if self.options.class_weighted:
            class_weights = batch_class_weights(labels, self.setup.num_classes, ignore)
        terms = {}
        for stage in self.dg_norm.stage_names:
            block = self.dg_norm.blocks[stage]
            output = features[feature_key(stage, "output")]                      # (N, C, h, w)
            if self.options.aux_weight > 0:
                aux = upsample_logits(features[feature_key(stage, "aux_logits")], labels.shape[-2:],
                                      ctx.source_out.align_corners)
                terms[f"ce_{stage}"] = self.options.aux_weight * F.cross_entropy(
                    aux.float(), labels, weight=class_weights, ignore_index=ignore)
            if self.options.san_weight > 0:
                # Nearest, so that a label stays a label; ignored pixels match no class.
                small = F.interpolate(labels.unsqueeze(1).float(), size=output.shape[-2:], mode="nearest")
                target = block.normalized_target(features[feature_key(stage, "input")], small.squeeze(1).long())
                terms[f"san_{stage}"] = self.options.san_weight * F.smooth_l1_loss(output.float(), target.float())
            if self.options.saw_weight > 0:
                terms[f"saw_{stage}"] = self.options.saw_weight * saw_loss(
                    output, block.aux_classifier.weight, self.dg_norm.classes, self.options.saw_relax_denom)
        return terms
