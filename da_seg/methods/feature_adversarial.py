"""Adversarial alignment of the segmenter's *features* (FCAN's Representation Adaptation Network).

Zhang et al., Fully Convolutional Adaptation Networks for Semantic Segmentation (CVPR 2018),
Sec. 3.3 (no official code; read from the paper). A discriminator D of ASPP-style dilated
convolutions (``models.discriminator.ASPPDiscriminator``) predicts, for every cell of a named
feature map F(x) (FCAN: res5c, the last encoder stage = ``features["backbone"]``), the
probability that it comes from the target domain:

    L_adv = -mean_cells log D(F(x_t)) - mean_cells log(1 - D(F(x_s)))        (paper, eq. 5)
    max_F min_D  L_adv - lambda * L_seg,  lambda = 5                             (paper, eq. 6)

so the segmenter minimizes L_seg - (1 / lambda) L_adv: ``weight`` = 1 / lambda = 0.2 beside a
source cross-entropy of weight 1. Two generator terms (``losses``, D frozen):
- ``generator_loss = "minimax"`` (the paper's eq. 6): -weight * L_adv on both domains, i.e. the
  segmenter maximizes D's own loss;
- ``"flipped"``: weight * BCE(D(F(x_t)), source), the non-saturating form of AdaptSegNet / ADVENT
  (target features only). Not in the FCAN paper; offered because the minimax gradient vanishes
  when D wins.
D (``side_losses``) minimizes L_adv on detached features, after the segmenter step, with Adam
(the paper names no optimizer for D: AdaptSegNet's 1e-4, betas (0.9, 0.99), poly-decayed).

Any segmenter works whose output carries the named feature (``da-seg list models``: ``layer1`` ..
``layer4``, ``backbone``, ``decoder``, ``stage1`` ..); D's input width is read from one
forward pass of the model when the component is built. The features are the cached
``ctx.source_out`` / ``ctx.target_out``: no extra segmenter pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from da_seg.config import ConfigError
from da_seg.methods.base import Component, ComponentSetup, OptionError, StepContext
from da_seg.methods.common import (SOURCE_LABEL, TARGET_LABEL, add_discriminator, adversarial_loss, bare, check_choice,
                                   check_nonnegative, check_pair, check_positive_int, discriminator_accuracy, frozen,
                                   warmup_ramp)
from da_seg.models.discriminator import ASPPDiscriminator

GENERATOR_LOSSES = ("minimax", "flipped")
PROBE_SIZE = 64  # side of the dummy image whose forward pass tells the feature's channel count


@dataclass(frozen=True)
class FeatureAdversarialOptions:
    feature: str = "backbone"        # the segmenter feature D reads (FCAN: res5c = the last encoder stage)
    weight: float = 0.2              # 1 / lambda, FCAN's lambda = 5 on the segmentation loss (eq. 6)
    generator_loss: str = "minimax"  # "minimax" (FCAN eq. 6) | "flipped" (target labelled source, non-saturating)
    channels: int = 128              # c, channels of each dilated branch (FCAN)
    rates: tuple[int, ...] = (1, 2, 3, 4)  # dilation rates of the k branches (FCAN: k = 4, rates 1..4)
    d_lr: float = 1e-4               # not in the paper: AdaptSegNet's discriminator Adam, poly-decayed
    d_betas: tuple[float, float] = (0.9, 0.99)
    warmup_iters: int = 0            # linear ramp of the generator weight from 0 (D trains throughout)

    def __post_init__(self):
        check_nonnegative(self, ("weight", "d_lr", "warmup_iters"))
        check_choice(self, "generator_loss", GENERATOR_LOSSES)
        check_positive_int(self, ("channels",))
        check_pair(self, "d_betas", "[beta1, beta2]")
        rates = tuple(self.rates) if isinstance(self.rates, (list, tuple)) else ()
        if not rates or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rates):
            raise OptionError("rates", f"= {self.rates!r}; expected a list of positive integer dilation rates")
        object.__setattr__(self, "rates", rates)
        if not isinstance(self.feature, str) or not self.feature:
            raise OptionError("feature", f"= {self.feature!r}; expected the name of a segmenter feature")


def feature_channels(model: torch.nn.Module, name: str, device: torch.device, model_name: str = "") -> int:
    """Channels of ``model``'s feature ``name``, from one eval-mode forward of a small dummy image
    (eval mode: BatchNorm statistics must not move)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            features = model(torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE, device=device)).features
    finally:
        model.train(was_training)
    if name not in features:
        raise ConfigError(f"components.feature_adversarial.feature = {name!r}: model {model_name!r} returns the "
                          f"features {', '.join(sorted(features)) or 'none'}")
    return int(features[name].shape[1])


class FeatureAdversarial(Component):
    """Feature-level adversarial alignment with a per-location ASPP discriminator (FCAN's RAN).

    Loss ``adv`` (generator, weighted, D frozen); side loss ``d`` (D on detached features);
    logs ``d_accuracy`` (fraction of feature cells D assigns to the right domain).
    """

    name = "feature_adversarial"
    Options = FeatureAdversarialOptions
    uses_source = True
    uses_target = True
    KEY = "discriminator"

    def __init__(self, options: FeatureAdversarialOptions, setup: ComponentSetup):
        super().__init__(options, setup)
        in_channels = feature_channels(setup.model, options.feature, setup.device, setup.model_name)
        add_discriminator(self, self.KEY, ASPPDiscriminator(in_channels, options.channels, options.rates),
                          options.d_lr, options.d_betas)
        self._stats: dict[str, Tensor] = {}

    def _features(self, out) -> Tensor:
        return out.features[self.options.feature]                                  # (N, C, h, w)

    def domain_loss(self, discriminator, source_features: Tensor, target_features: Tensor) -> tuple[Tensor, ...]:
        """FCAN's L_adv (eq. 5) and the two score maps (N, 1, h, w)."""
        scores_source = discriminator(source_features)
        scores_target = discriminator(target_features)
        loss = (adversarial_loss(scores_target, TARGET_LABEL, "bce")
                + adversarial_loss(scores_source, SOURCE_LABEL, "bce"))
        return loss, scores_source, scores_target

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        scale = warmup_ramp(ctx.iteration, self.options.warmup_iters) * self.options.weight
        # The bare module, frozen: only the segmenter receives gradient, through the features.
        with frozen(bare(self.networks[self.KEY])) as discriminator:
            if self.options.generator_loss == "flipped":
                scores = discriminator(self._features(ctx.target_out))
                return {"adv": scale * adversarial_loss(scores, SOURCE_LABEL, "bce")}
            loss, _, _ = self.domain_loss(discriminator, self._features(ctx.source_out),
                                          self._features(ctx.target_out))
        return {"adv": -scale * loss}

    def side_losses(self, ctx: StepContext) -> dict[str, Tensor]:
        # Detached: D's update must not reach the segmenter (features cached from before its step).
        loss, scores_source, scores_target = self.domain_loss(
            self.networks[self.KEY], self._features(ctx.source_out).detach(), self._features(ctx.target_out).detach())
        self._stats = {"d_accuracy": discriminator_accuracy(scores_source.detach(), scores_target.detach())}
        return {"d": loss}

    def after_step(self, ctx: StepContext) -> dict[str, Tensor]:
        stats, self._stats = self._stats, {}
        return stats
