"""Domain generalization: RobustNet's instance selective whitening (ISW) loss.

The IN blocks are part of the segmenter (``model.options.dg_norm``, ``da_seg/models/norm.py``).

ISW (RobustNet, Choi et al., CVPR 2021), per ISW stage: the covariance of the instance-normalized
features, |.| summed over the "style-sensitive" entries only, divided by their number, averaged
over stages, weight 0.6. Which entries are sensitive is learned once: for ``stat_iters`` steps
before ``mask_iter``, each source batch and a photometrically jittered copy (RobustNet's
ColorJitter(0.8, 0.8, 0.8, 0.3) + Gaussian blur) go through the model in eval mode, and the
variance of every covariance entry between the two views is averaged; a 1-D k-means (k = 3)
splits the strict upper triangle of that variance matrix and every entry outside the
lowest-variance cluster is sensitive. Before ``mask_iter`` the loss is 0, as RobustNet trains its
first epochs with IN but without the loss. Differences from RobustNet (read from its released
code): statistics come from the (augmented) training batches of a window of steps instead of a
separate pass over 10 x 500 un-augmented images with the masks of the 10 passes intersected; the
k-means runs on the strict upper triangle only (RobustNet clusters the whole C x C matrix, zeros
of the lower triangle included) with Lloyd iterations from quantiles instead of the exact 1-D
solver; the IN sits on the stage output (see ``models/norm.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from da_seg.config import AugmentConfig
from da_seg.data.augment import PhotometricAugment
from da_seg.methods.base import Component, ComponentSetup, OptionError, StepContext
from da_seg.methods.common import check_nonnegative, instance_covariance, require_dg_norm
from da_seg.models.norm import feature_key, kmeans_1d
from da_seg.utils.distributed import all_reduce_sum


def isw_loss(features: Tensor, mask: Tensor) -> Tensor:
    """RobustNet's instance selective whitening loss of one stage; a scalar.

    features: (N, C, h, w) instance-normalized; mask: (C, C) {0, 1}, the sensitive entries of
    the strict upper triangle. mean_i sum |cov_i * mask| / sum(mask) (margin 0, as its ISW runs).
    """
    cov = instance_covariance(features)
    return ((cov * mask).abs().sum((1, 2)) / mask.sum().clamp_min(1)).mean()


def sensitive_mask(variance: Tensor, clusters: int) -> Tensor:
    """(C, C) variance of each covariance entry -> (C, C) {0, 1}: upper-triangle entries outside
    the lowest-variance k-means cluster (the style-sensitive covariances)."""
    c = variance.shape[0]
    rows, cols = torch.triu_indices(c, c, offset=1, device=variance.device)
    values = variance[rows, cols].float().unsqueeze(0)                              # (1, C(C-1)/2)
    assign, _ = kmeans_1d(values, clusters, iters=50)
    sensitive = (assign[0] > 0).float()                                              # cluster 0 is the lowest
    mask = torch.zeros(c, c, device=variance.device)
    mask[rows, cols] = sensitive
    return mask


@dataclass(frozen=True)
class ISWOptions:
    weight: float = 0.6            # wt_reg_weight (RobustNet scripts)
    mask_iter: int = 1000          # the mask is fixed and the loss starts here (RobustNet: after 5 epochs)
    stat_iters: int = 100          # steps before mask_iter whose batches feed the variance statistics
    clusters: int = 3              # k of the 1-D k-means on the variances (RobustNet: 3)
    brightness: float = 0.8        # the jittered view: RobustNet's ColorJitter(0.8, 0.8, 0.8, 0.3) ...
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.3
    blur_p: float = 1.0            # ... and Gaussian blur on every image

    def __post_init__(self):
        check_nonnegative(self, ("weight", "mask_iter", "stat_iters"))
        if not 1 <= self.stat_iters <= self.mask_iter:
            raise OptionError("stat_iters", f"= {self.stat_iters} must be in 1..mask_iter ({self.mask_iter}): "
                              "the statistics are gathered just before mask_iter")
        if self.clusters < 2:
            raise OptionError("clusters", f"= {self.clusters}; expected >= 2")


class InstanceSelectiveWhitening(Component):
    """RobustNet's ISW loss on the IN blocks of ``model.options.dg_norm`` (kind "isw").

    List it with ``source_ce``. Loss ``isw`` (0 before ``mask_iter``); logs ``sensitive_fraction``
    once the mask is set. The mask and the running statistics are saved in checkpoints.
    """

    name = "isw"
    Options = ISWOptions
    uses_source = True
    loss_domains = ("source",)

    def __init__(self, options: ISWOptions, setup: ComponentSetup):
        super().__init__(options, setup)
        self.dg_norm = require_dg_norm(setup, "isw", self.name)
        self.jitter = PhotometricAugment(AugmentConfig(
            flip=False, brightness=options.brightness, contrast=options.contrast, saturation=options.saturation,
            hue=options.hue, color_p=1.0, blur_p=options.blur_p)).to(setup.device)
        self.masks: dict[str, Tensor] = {}
        self.variance_sums: dict[str, Tensor] = {}
        self.pairs = 0
        self.sensitive_fraction = 0.0

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        features = ctx.source_out.features
        if not self.masks:
            return {"isw": ctx.source_out.logits.new_zeros((), dtype=torch.float32)}
        per_stage = [isw_loss(features[feature_key(stage, "normalized")], self.masks[stage])
                     for stage in self.dg_norm.stage_names]
        return {"isw": self.options.weight * torch.stack(per_stage).mean()}

    def after_step(self, ctx: StepContext) -> dict[str, Tensor | float]:
        first = self.options.mask_iter - self.options.stat_iters
        if not self.masks and first <= ctx.iteration < self.options.mask_iter:
            self._gather_statistics(ctx)
            if ctx.iteration == self.options.mask_iter - 1:
                self._set_masks()
        return {"sensitive_fraction": self.sensitive_fraction}

    def _count_sensitive(self) -> None:
        """Share of the upper-triangle covariance entries that are whitened (0 before the mask);
        counted once, when the masks change, so that logging it costs no host sync per step."""
        chosen = sum(float(m.sum()) for m in self.masks.values())
        total = sum(m.shape[0] * (m.shape[0] - 1) / 2 for m in self.masks.values())
        self.sensitive_fraction = chosen / total if total else 0.0

    def _gather_statistics(self, ctx: StepContext) -> None:
        """Variance of each covariance entry between a source batch and its jittered copy."""
        model = self.setup.model
        was_training = model.training
        model.eval()  # as RobustNet's statistics pass; also keeps BN running statistics untouched
        try:
            images = ctx.source.images
            with torch.no_grad(), ctx.autocast():
                out = model(torch.cat([images, self.jitter(images)]))
        finally:
            model.train(was_training)
        n = images.shape[0]
        for stage in self.dg_norm.stage_names:
            cov = instance_covariance(out.features[feature_key(stage, "normalized")])   # (2N, C, C)
            variance = (cov[:n] - cov[n:]).pow(2) / 2          # unbiased variance of two samples
            total = variance.sum(0)
            self.variance_sums[stage] = self.variance_sums[stage] + total if stage in self.variance_sums else total
        self.pairs += n

    def _set_masks(self) -> None:
        pairs = all_reduce_sum(torch.tensor(float(self.pairs), device=self.setup.device))
        for stage in self.dg_norm.stage_names:
            variance = all_reduce_sum(self.variance_sums[stage].clone()) / pairs
            self.masks[stage] = sensitive_mask(variance, self.options.clusters)
        self.variance_sums = {}
        self._count_sensitive()

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks, "variance_sums": self.variance_sums, "pairs": self.pairs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.setup.device
        self.masks = {k: v.to(device) for k, v in state["masks"].items()}
        self.variance_sums = {k: v.to(device) for k, v in state["variance_sums"].items()}
        self.pairs = state["pairs"]
        self._count_sensitive()
