"""Entropy of the target predictions: ADVENT's MinEnt, and the maps AdvEnt's discriminator reads.

MinEnt (Vu et al., ADVENT, CVPR 2019) makes the segmenter confident on target pixels by
minimizing the normalized Shannon entropy of its softmax, upsampled to the image size:

    ent = -sum_c p_c log2(p_c + 1e-30) / (N H W log2 C)

It reads the cached ``ctx.target_out``, so with AdvEnt (or any other component) the target
batch still goes through the segmenter once. Known failure mode: the confident classes win, and
small classes (poles, people) are absorbed by their large neighbours; ``class_balance`` is a
simple counter-measure to study it.

The entropy maps here are shared with ``adversarial.py`` (AdvEnt's discriminator input).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from da_seg.methods.base import Component, StepContext
from da_seg.methods.common import check_nonnegative, level_suffix, output_levels, softmax_at, warmup_ramp
from da_seg.utils.visualize import colormap, to_uint8

EPS = 1e-30  # inside the log, as ADVENT: p log p -> 0 for p = 0 without NaN gradients


def weighted_self_information(prob: Tensor) -> Tensor:
    """ADVENT's per-channel map -p log2(p + 1e-30) / log2(C).

    prob: (N, C, H, W) softmax -> (N, C, H, W) >= 0; summed over C it is the pixel's entropy
    normalized to [0, 1] (0 for a one-hot pixel, 1 for a uniform one).
    """
    num_classes = prob.shape[1]
    return -prob * torch.log2(prob + EPS) / math.log2(num_classes)


def pixel_entropy(prob: Tensor) -> Tensor:
    """(N, C, H, W) softmax -> (N, H, W) normalized entropy in [0, 1]."""
    return weighted_self_information(prob).sum(dim=1)


def entropy_loss(prob: Tensor, *, robust_eta: float = 0.0, class_balance: bool = False) -> Tensor:
    """Mean normalized entropy of a softmax map: a scalar.

    prob: (N, C, H, W). With the defaults this is ADVENT's ``entropy_loss``
    (-sum p log2 p / (N H W log2 C)).
    robust_eta > 0: FDA's Charbonnier-style penalty mean((ent^2 + 1e-8)^eta) of the per-pixel
        entropy, which flattens the gradient on already-confident pixels (eta = 2 in FDA).
    class_balance: average the per-pixel terms within each *predicted* class (argmax), then
        over the classes predicted in the batch, so that each predicted class weighs the same
        whatever its pixel count: equivalent to weighting pixels by the inverse frequency of
        their predicted class. The weights carry no gradient.
    """
    ent = pixel_entropy(prob)                                          # (N, H, W)
    if robust_eta > 0:
        ent = (ent.pow(2) + 1e-8).pow(robust_eta)
    if not class_balance:
        return ent.mean()
    num_classes = prob.shape[1]
    predicted = prob.detach().argmax(dim=1).flatten()                  # (N*H*W,)
    sums = torch.zeros(num_classes, device=ent.device, dtype=ent.dtype).index_add(0, predicted, ent.flatten())
    counts = torch.bincount(predicted, minlength=num_classes).to(ent.dtype)
    present = (counts > 0).to(ent.dtype)
    # Masked mean over the predicted classes, written without boolean indexing (no host sync).
    return (sums / counts.clamp_min(1)).sum() / present.sum()


def entropy_visual(ctx: StepContext) -> dict[str, Tensor]:
    """The first target image of the last step and its entropy map, side by side: uint8 (3, H, 2W).

    Called with the context of a finished step, whose target forward is cached (the component
    that asks read it in ``losses``), so this costs no segmenter pass.
    """
    if ctx.target is None:
        return {}
    with torch.no_grad():
        image = ctx.target.images[0].detach().float().cpu()
        prob = softmax_at(ctx.target_out.logits[:1].detach(), image.shape[-2:], ctx.target_out.align_corners)
        ent = pixel_entropy(prob)[0].cpu()
    return {"target_entropy": torch.cat([to_uint8(image), colormap(ent)], dim=2)}


@dataclass(frozen=True)
class MinEntOptions:
    weight: float = 1e-3           # lambda_ent on the main output (ADVENT)
    aux_weight: float = 2e-4       # lambda_ent on the aux output, with multi_level (ADVENT)
    multi_level: bool = False      # also minimize the entropy of aux_logits (DeepLabV2 layer3 head)
    robust_eta: float = 0.0        # > 0: FDA's robust entropy (ent^2 + 1e-8)^eta (FDA: 2, weight 0.005)
    class_balance: bool = False    # each predicted class weighs the same (see entropy_loss)
    warmup_iters: int = 0          # linear ramp of the weights from 0 over this many iterations

    def __post_init__(self):
        check_nonnegative(self, ("weight", "aux_weight", "robust_eta", "warmup_iters"))


class MinEnt(Component):
    """Entropy minimization on the target softmax (ADVENT's MinEnt); composes with any method.

    Losses: ``ent`` (main) and ``ent_aux`` (multi_level), already weighted.
    """

    name = "minent"
    Options = MinEntOptions
    uses_target = True
    loss_domains = ("target",)

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        size = ctx.target.images.shape[-2:]
        ramp = warmup_ramp(ctx.iteration, self.options.warmup_iters)
        weights = {"main": self.options.weight, "aux": self.options.aux_weight}
        terms = {}
        for level, logits in output_levels(ctx.target_out, self.options.multi_level, f"components.{self.name}"):
            prob = softmax_at(logits, size, ctx.target_out.align_corners, ctx)  # (N, C, H, W)
            terms["ent" + level_suffix(level)] = ramp * weights[level] * entropy_loss(
                prob, robust_eta=self.options.robust_eta, class_balance=self.options.class_balance)
        return terms

    def visuals(self, ctx: StepContext) -> dict[str, Tensor]:
        return entropy_visual(ctx)
