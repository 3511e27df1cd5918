"""Domain generalization losses: SAN-SAW and ISW, on blocks the segmenter carries.

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
import torch.nn.functional as F
from torch import Tensor

from da_seg.config import AugmentConfig, ConfigError
from da_seg.data.augment import PhotometricAugment
from da_seg.engine.distributed import all_reduce_sum
from da_seg.methods.base import Component, ComponentSetup, StepContext
from da_seg.methods.entropy import check_nonnegative
from da_seg.methods.source import batch_class_weights
from da_seg.models.norm import DGNorm, feature_key, kmeans_1d
from da_seg.models.segmenter import upsample_logits

COV_EPS = 1e-5  # added to the covariance diagonal (RobustNet / SAN-SAW)


def instance_covariance(x: Tensor) -> Tensor:
    """(N, C, h, w) -> (N, C, C) float32: XX^T / (hw - 1) + 1e-5 I, per image, not centred.

    Not centred on purpose: both releases apply it to instance-normalized (zero-mean) maps,
    where it is the covariance; on SAN's ReLU output it also penalizes co-activation.
    """
    n, c, h, w = x.shape
    flat = x.float().reshape(n, c, h * w)
    eye = torch.eye(c, device=x.device, dtype=flat.dtype)
    return flat @ flat.transpose(1, 2) / max(h * w - 1, 1) + COV_EPS * eye


def strict_upper(c: int, device=None) -> Tensor:
    """(C, C) float mask of the entries above the diagonal."""
    return torch.ones(c, c, device=device).triu(diagonal=1)


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


def require_dg_norm(setup: ComponentSetup, kind: str, component: str) -> DGNorm:
    """The segmenter's DG blocks of ``kind``, or a ConfigError that says which recipe key to set."""
    dg_norm = getattr(setup.model, "dg_norm", None)
    if dg_norm is None or dg_norm.kind != kind:
        found = "no dg_norm blocks" if dg_norm is None else f"dg_norm.kind = {dg_norm.kind!r}"
        raise ConfigError(
            f"recipe {setup.recipe.name!r}: components.{component} needs the model's {kind} blocks; set "
            f"model.options.dg_norm = {{ kind = \"{kind}\", stages = [...] }} (deeplab_small, deeplabv2_*, "
            f"deeplabv3plus_*); model {setup.recipe.model.name!r} has {found}")
    return dg_norm


# ---------------------------------------------------------------------------------------------
# SAN-SAW
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SanSawOptions:
    aux_weight: float = 0.1        # CE of each SAN stage's aux 1x1 classifier (release: 0.1)
    san_weight: float = 0.1        # SmoothL1 between SAN(x) and its ground-truth-region target
    saw_weight: float = 0.1        # SAW; 0 reproduces the release, which never computes it
    saw_relax_denom: float = 2.0   # SAW margin = floor(K(K-1)/2 / relax_denom) (release: 2 -> 5 for K = 5)
    class_weighted: bool = True    # aux CE weights 1 - batch frequency (release: weight_loss = True)


class SanSaw(Component):
    """SAN-SAW's losses on the SAN blocks of ``model.options.dg_norm`` (kind "san_saw").

    List it with ``source_ce`` (the main CE; ``class_weighted = true`` there too for the
    release's weighting). Losses per SAN stage s: ``ce_<s>``, ``san_<s>``, ``saw_<s>``.
    """

    name = "san_saw"
    Options = SanSawOptions
    uses_source = True

    def __init__(self, options: SanSawOptions, setup: ComponentSetup):
        super().__init__(options, setup)
        where = f"recipe {setup.recipe.name!r}: components.{self.name}"
        check_nonnegative(options, ("aux_weight", "san_weight", "saw_weight", "saw_relax_denom"), where)
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
                aux = upsample_logits(features[feature_key(stage, "aux_logits")], labels.shape[-2:])
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


# ---------------------------------------------------------------------------------------------
# ISW
# ---------------------------------------------------------------------------------------------

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


class InstanceSelectiveWhitening(Component):
    """RobustNet's ISW loss on the IN blocks of ``model.options.dg_norm`` (kind "isw").

    List it with ``source_ce``. Loss ``isw`` (0 before ``mask_iter``); logs ``sensitive_fraction``
    once the mask is set. The mask and the running statistics are saved in checkpoints.
    """

    name = "isw"
    Options = ISWOptions
    uses_source = True

    def __init__(self, options: ISWOptions, setup: ComponentSetup):
        super().__init__(options, setup)
        where = f"recipe {setup.recipe.name!r}: components.{self.name}"
        check_nonnegative(options, ("weight", "mask_iter", "stat_iters"), where)
        if not 1 <= options.stat_iters <= options.mask_iter:
            raise ConfigError(f"{where}: stat_iters = {options.stat_iters} must be in 1..mask_iter "
                              f"({options.mask_iter}): the statistics are gathered just before mask_iter")
        if options.clusters < 2:
            raise ConfigError(f"{where}.clusters = {options.clusters}; expected >= 2")
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
