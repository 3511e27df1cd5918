"""Adversarial alignment of the segmenter's output space: AdaptSegNet and AdvEnt.

AdaptSegNet (Tsai et al., CVPR 2018) trains a fully-convolutional discriminator to tell source
from target softmax maps and the segmenter to fool it on target images; AdvEnt (Vu et al.,
ADVENT, CVPR 2019) does the same on the weighted self-information map -p log2 p / log2 C,
i.e. it aligns the *entropy* of the predictions. Both, per output level (main, and aux with
``multi_level``):

    generator term  (``losses``, trains the segmenter):
        weight * L(D(x_target), SOURCE_LABEL)            D's parameters frozen
    discriminator   (``side_losses``, trains D after the segmenter step):
        (L(D(x_source.detach()), SOURCE_LABEL) + L(D(x_target.detach()), TARGET_LABEL)) / 2

with x = softmax (or its self-information) of the logits upsampled to the input size, and
L = BCE on logits (``loss = "bce"``) or the least-squares GAN loss (``loss = "lsgan"``, MSE on
the raw scores). Source label 0, target label 1, as the official codes.

The discriminators, their Adam optimizers and poly schedules live in ``self.networks`` /
``self.optimizers`` / ``self.schedulers``, so the trainer moves, DDP-wraps, checkpoints and
resumes them. Both terms read the cached ``ctx.source_out`` / ``ctx.target_out``: any number of
output-space components costs one segmenter forward per domain.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from da_seg.methods.base import Component, ComponentSetup, StepContext
from da_seg.methods.common import (bare, check_choice, check_nonnegative, check_pair, check_positive_int, frozen,
                                   level_suffix, output_levels, poly_schedule, softmax_at, warmup_ramp)
from da_seg.methods.entropy import entropy_visual, weighted_self_information
from da_seg.models.discriminator import FCDiscriminator

SOURCE_LABEL = 0.0
TARGET_LABEL = 1.0
ADVERSARIAL_LOSSES = ("bce", "lsgan")


def adversarial_loss(scores: Tensor, label: float, kind: str) -> Tensor:
    """Discriminator scores (N, 1, h, w), raw logits, against a constant domain label.

    ``bce``: binary cross-entropy with logits; ``lsgan``: mean squared error of the raw scores
    (AdaptSegNet's LS-GAN option).
    """
    scores = scores.float()
    target = torch.full_like(scores, label)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(scores, target)
    if kind == "lsgan":
        return F.mse_loss(scores, target)
    raise ValueError(f"adversarial loss {kind!r}; valid: {ADVERSARIAL_LOSSES}")








@dataclass(frozen=True)
class AdversarialOptions:
    weight: float = 1e-3             # lambda_adv on the main output (AdaptSegNet, ADVENT); LS-GAN: 0.01
    aux_weight: float = 2e-4         # lambda_adv on the aux output, with multi_level (AdaptSegNet, ADVENT)
    multi_level: bool = False        # a second discriminator on aux_logits (DeepLabV2 layer3 head)
    loss: str = "bce"                # "bce" | "lsgan"
    ndf: int = 64                    # discriminator width: ndf, 2ndf, 4ndf, 8ndf channels
    d_lr: float = 1e-4               # discriminator Adam, poly-decayed like the segmenter
    d_betas: tuple[float, float] = (0.9, 0.99)
    warmup_iters: int = 0            # linear ramp of the adversarial weights from 0 (D trains throughout)

    def __post_init__(self):
        check_nonnegative(self, ("weight", "aux_weight", "d_lr", "warmup_iters"))
        check_choice(self, "loss", ADVERSARIAL_LOSSES)
        check_positive_int(self, ("ndf",))
        check_pair(self, "d_betas", "[beta1, beta2]")


class OutputSpaceAdversarial(Component):
    """Shared mechanics; subclasses choose what the discriminator sees (``discriminator_input``)."""

    Options = AdversarialOptions
    uses_source = True
    uses_target = True
    loss_domains = ("target",)  # the source outputs are read detached, in side_losses

    def __init__(self, options: AdversarialOptions, setup: ComponentSetup):
        super().__init__(options, setup)
        self.where = f"components.{self.name}"
        lr_factor = poly_schedule(setup.decay_iters, setup.poly_power)
        self.levels = ["main", "aux"] if options.multi_level else ["main"]
        self.weights = {"main": options.weight, "aux": options.aux_weight}
        for level in self.levels:
            key = self.key(level)
            discriminator = FCDiscriminator(setup.num_classes, options.ndf).to(setup.device)
            optimizer = torch.optim.Adam(discriminator.parameters(), lr=options.d_lr, betas=options.d_betas)
            self.networks[key] = discriminator
            self.optimizers[key] = optimizer
            self.schedulers[key] = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        self._stats: dict[str, Tensor] = {}

    @staticmethod
    def key(level: str) -> str:
        return f"discriminator_{level}"

    def discriminator_input(self, prob: Tensor) -> Tensor:
        """(N, C, H, W) softmax -> (N, C, H, W) map the discriminator classifies."""
        raise NotImplementedError

    def _inputs(self, ctx: StepContext, out, size) -> dict[str, Tensor]:
        return {level: self.discriminator_input(softmax_at(logits, size, out.align_corners, ctx))
                for level, logits in output_levels(out, self.options.multi_level, self.where)}

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        ramp = warmup_ramp(ctx.iteration, self.options.warmup_iters)
        terms = {}
        for level, x_target in self._inputs(ctx, ctx.target_out, ctx.target.images.shape[-2:]).items():
            # The bare module: this pass must not enter DDP's gradient bookkeeping for D, whose
            # parameters receive no gradient here (frozen); only the segmenter does, through x.
            with frozen(bare(self.networks[self.key(level)])) as discriminator:
                scores = discriminator(x_target)                          # (N, 1, H/32, W/32)
            terms["adv" + level_suffix(level)] = ramp * self.weights[level] * adversarial_loss(
                scores, SOURCE_LABEL, self.options.loss)
        return terms

    def side_losses(self, ctx: StepContext) -> dict[str, Tensor]:
        # Detached (and computed without a graph): the discriminator update must not reach the
        # segmenter. Both outputs are cached from before the segmenter step, as in the official codes.
        with torch.no_grad():
            x_source = self._inputs(ctx, ctx.source_out, ctx.source.images.shape[-2:])
            x_target = self._inputs(ctx, ctx.target_out, ctx.target.images.shape[-2:])
        terms, stats = {}, {}
        for level in self.levels:
            discriminator = self.networks[self.key(level)]
            scores_source = discriminator(x_source[level])
            scores_target = discriminator(x_target[level])
            terms["d" + level_suffix(level)] = 0.5 * (
                adversarial_loss(scores_source, SOURCE_LABEL, self.options.loss)
                + adversarial_loss(scores_target, TARGET_LABEL, self.options.loss))
            stats["d_accuracy" + level_suffix(level)] = self._accuracy(scores_source.detach(), scores_target.detach())
        self._stats = stats
        return terms

    def _accuracy(self, scores_source: Tensor, scores_target: Tensor) -> Tensor:
        """Fraction of discriminator patches on the right side of the decision threshold (0 for
        logits, 0.5 for LS-GAN scores): 0.5 = chance, near 1 = D wins and the generator term saturates."""
        threshold = 0.0 if self.options.loss == "bce" else 0.5
        right = torch.cat([(scores_source.float() < threshold).flatten(),
                           (scores_target.float() >= threshold).flatten()])
        return right.float().mean()

    def after_step(self, ctx: StepContext) -> dict[str, Tensor]:
        stats, self._stats = self._stats, {}
        return stats


class AdaptSegNet(OutputSpaceAdversarial):
    """Output-space adversarial alignment on the softmax (AdaptSegNet).

    Losses ``adv`` / ``adv_aux`` (generator, weighted); side losses ``d`` / ``d_aux``;
    logs ``d_accuracy`` per level.
    """

    name = "adaptsegnet"

    def discriminator_input(self, prob: Tensor) -> Tensor:
        return prob


class AdvEnt(OutputSpaceAdversarial):
    """Adversarial entropy alignment (ADVENT's AdvEnt): D reads -p log2(p) / log2(C) per channel.

    Losses ``adv`` / ``adv_aux`` (generator, weighted); side losses ``d`` / ``d_aux``;
    logs ``d_accuracy`` per level; visual: the target entropy map.
    """

    name = "advent"

    def discriminator_input(self, prob: Tensor) -> Tensor:
        return weighted_self_information(prob)

    def visuals(self, ctx: StepContext) -> dict[str, Tensor]:
        return entropy_visual(ctx)
