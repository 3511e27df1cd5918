"""MIC, masked image consistency (Hoyer et al., CVPR 2023), as one component: ``mic``.

The student must predict the teacher's pseudo-labels of a target image from that image with most
of it hidden, so that it learns to use context. Official code: ``lhoyer/MIC``,
``seg/mmseg/models/uda/masking_consistency_module.py`` (``mask_mode = "separatetrgaug"``),
``seg/mmseg/models/utils/masking_transforms.py`` (``BlockMaskGenerator``), configured in
``seg/configs/mic/gtaHR2csHR_mic_hrda.py``. One step, in the order that code reads:
  pseudo-labels and weights of the *unmasked* target from the EMA teacher (``mask_alpha = "same"``,
  ``mask_pseudo_threshold = "same"``: the host DAFormer teacher's, weight q at tau 0.968, border
  rows / crop margins at weight 0, computed before ClassMix)
  -> colour jitter + blur of the target batch (``strong_transform``, ``mix = None``)
  -> block mask: a grid of round(H / b) x round(W / b) cells, each kept where U(0, 1) > ratio
     (b = ``mask_block_size``: 64 on HRDA's 1024 px crops, 32 on DAFormer's half-resolution 512 px
     ones, ``seg/experiments.py`` id 81; ratio 0.7), upsampled nearest to H x W; the normalized image is
     multiplied by it, so masked pixels are the normalized zero: the input normalization's mean
  -> student(masked) -> weighted CE against the pseudo-labels, times ``mask_lambda`` 1.
MIC calls its own ``backward()`` on that loss; here it is one more named term in the step's one
backward (the same gradient: the terms add).

``teacher = "shared"`` (default, the official configuration) reads ``ctx.target_pseudo``, the
pseudo-labels ``mean_teacher`` computes once per step, so the teacher runs once for both.
``teacher = "own"``: MIC keeps an EMA teacher of its own with ``ema`` / ``threshold`` (the
official code's ``mask_alpha`` / ``mask_pseudo_threshold`` set to values, or MIC without a host
self-training method), updated after every optimizer step as ``mean_teacher``'s.

Differences: the colour jitter and blur are drawn per image (da_seg's ``PhotometricAugment``, as
``mean_teacher``), not once per batch, and the blur kernel follows sigma, not 0.1 x the image size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from da_seg.config import ConfigError
from da_seg.methods.base import Component, ComponentSetup, OptionError, PseudoLabels, StepContext
from da_seg.methods.common import bare, check_choice, check_pair, check_positive_int, supervised_views
from da_seg.methods.self_training import weighted_pixel_ce
from da_seg.methods.teacher import (TEACHER_MODES, ema_alpha, ema_update, frozen_teacher, strong_augment,
                                    teacher_pseudo_labels)
from da_seg.utils.visualize import colorize, overlay, to_uint8

TEACHERS = ("shared", "own")
_NO_SHARED_TEACHER = ("components.mic.teacher = \"shared\" learns the pseudo-labels of a self-training component, "
                      "but the recipe lists none; add [components.mean_teacher] (MIC on DAFormer) or set "
                      "components.mic.teacher = \"own\"")


@dataclass(frozen=True)
class MICOptions:
    weight: float = 1.0                    # mask_lambda (official 1)
    mask_ratio: float = 0.7                # share of cells masked (official 0.7)
    block_size: int = 64                   # mask_block_size, px (official: HRDA 1024 px crops 64, DAFormer 512 px 32)
    teacher: str = "shared"                # "shared": mean_teacher's pseudo-labels (official) | "own": its own EMA teacher
    # Strong augmentation of the target before masking: DAFormer/MIC dacs.py color_jitter_strength 0.2,
    # jitter applied when U(0, 1) > color_jitter_probability 0.2, i.e. with probability 0.8; blur when U > 0.5
    color_jitter: float = 0.2
    color_p: float = 0.8
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.15, 1.15)
    aux_weight: float = 0.0                # CE on the aux head (multi-level DeepLab) of the masked pass
    # Only with teacher = "own" (official separate EMATeacher): its EMA alpha, tau and ignored rows
    ema: float = 0.999
    threshold: float = 0.968
    teacher_mode: str = "train"            # as mean_teacher.teacher_mode
    ignore_top: int = 0
    ignore_bottom: int = 0
    border_reference_height: int = 0

    def __post_init__(self):
        check_choice(self, "teacher", TEACHERS)
        check_choice(self, "teacher_mode", TEACHER_MODES)
        check_pair(self, "blur_sigma", "[min, max]")
        check_positive_int(self, ("block_size",))
        if not 0.0 <= self.mask_ratio < 1.0:
            raise OptionError("mask_ratio", f"= {self.mask_ratio!r}; expected 0 <= mask_ratio < 1 (MIC: 0.7)")
        if not 0.0 <= self.ema < 1.0:
            raise OptionError("ema", f"= {self.ema!r}; expected 0 <= ema < 1 (MIC/DAFormer: 0.999)")
        for key in ("threshold", "color_p", "blur_p"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise OptionError(key, f"= {getattr(self, key)!r}; expected a probability in [0, 1]")
        for key in ("weight", "aux_weight", "ignore_top", "ignore_bottom", "border_reference_height"):
            if getattr(self, key) < 0:
                raise OptionError(key, f"= {getattr(self, key)!r}; expected >= 0")


def block_mask(n: int, height: int, width: int, block_size: int, mask_ratio: float,
               device=None, generator: torch.Generator | None = None) -> Tensor:
    """(N, 1, H, W) float keep-mask: 1 on kept cells, 0 on masked ones. The grid has
    max(1, round(H / b)) x max(1, round(W / b)) cells, each kept where U(0, 1) > ``mask_ratio``,
    upsampled nearest (cells are whole blocks when b divides H and W)."""
    cells = (max(1, round(height / block_size)), max(1, round(width / block_size)))
    keep = (torch.rand((n, 1, *cells), device=device, generator=generator) > mask_ratio).float()
    return F.interpolate(keep, size=(height, width), mode="nearest")


def normalized_zero(model: nn.Module, device=None) -> Tensor:
    """(1, 3, 1, 1) RGB in [0, 1]: the image whose normalized value is 0 (the input norm's mean)."""
    norm = getattr(bare(model), "input_norm", None)
    if norm is None:
        raise ValueError(f"components.mic needs the segmenter's input_norm (its mean is the masked value); "
                         f"{type(bare(model)).__name__} has none")
    mean = torch.tensor(norm.mean, dtype=torch.float32, device=device) / norm.scale
    if norm.bgr:  # the mean is given in the network's BGR order
        mean = mean.flip(0)
    return mean.view(1, 3, 1, 1)


def mask_images(images: Tensor, keep: Tensor, zero: Tensor) -> Tensor:
    """images (N, 3, H, W) in [0, 1], keep (N, 1, H, W) -> the kept pixels, ``zero`` elsewhere."""
    return images * keep + zero.to(images.dtype) * (1.0 - keep)


class MaskedImageConsistency(Component):
    """The student learns the teacher's pseudo-labels of the target from a block-masked, colour-
    augmented copy of it (MIC). Shares ``mean_teacher``'s pseudo-labels, or owns an EMA teacher."""

    name = "mic"
    Options = MICOptions
    uses_target = True
    loss_domains = ()  # its loss goes through its own masked pass, not a cached output

    def __init__(self, options: MICOptions, setup: ComponentSetup):
        super().__init__(options, setup)
        if options.teacher == "own":
            self.networks["teacher"] = frozen_teacher(setup.model, options.teacher_mode)
        self.strong = strong_augment(options)
        self.zero = normalized_zero(setup.model, setup.device)
        self._last: dict[str, Tensor] = {}

    @classmethod
    def check_recipe(cls, options: MICOptions, components: dict[str, type[Component]]) -> None:
        if options.teacher == "shared" and not any(c.provides_pseudo_labels for c in components.values()):
            raise ConfigError(_NO_SHARED_TEACHER)

    def _pseudo_labels(self, ctx: StepContext) -> PseudoLabels:
        opt = self.options
        if opt.teacher == "own":
            return teacher_pseudo_labels(self.networks["teacher"], ctx.target.images, opt.threshold, ctx.autocast,
                                         opt.ignore_top, opt.ignore_bottom, opt.border_reference_height,
                                         valid=ctx.target.valid)
        if ctx.pseudo_labeler is None:
            raise ValueError(_NO_SHARED_TEACHER)
        return ctx.target_pseudo

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        opt = self.options
        pseudo = self._pseudo_labels(ctx)
        with torch.no_grad():
            images = ctx.target.images
            if self.strong.active:
                images = self.strong(images)                               # jitter + blur, then mask
            n, _, height, width = images.shape
            keep = block_mask(n, height, width, opt.block_size, opt.mask_ratio, images.device)
            masked = mask_images(images, keep, self.zero)
            self._last = {"masked": masked[0], "pseudo": pseudo.labels[0]}
        out = ctx.forward(masked)
        # On HRDA the masked image trains both scales: 0.9 fused + 0.1 detail crop (MIC's forward_train).
        terms = {f"masked_ce{suffix}": opt.weight * share * weighted_pixel_ce(
                     logits, view_labels, view_weights, self.setup.ignore_index, out.align_corners)
                 for suffix, logits, view_labels, view_weights, share
                 in supervised_views(out, pseudo.labels, pseudo.weights)}
        if opt.aux_weight > 0 and out.aux_logits is not None:
            terms["masked_ce_aux"] = opt.weight * opt.aux_weight * weighted_pixel_ce(
                out.aux_logits, pseudo.labels, pseudo.weights, self.setup.ignore_index, out.align_corners)
        return terms

    def after_step(self, ctx: StepContext) -> dict[str, Tensor | float]:
        if self.options.teacher == "own":
            alpha = ema_alpha(ctx.iteration, self.options.ema)
            ema_update(self.networks["teacher"], self.setup.model, alpha,
                       buffers=self.options.teacher_mode == "eval")
        return {}

    def visuals(self, ctx: StepContext) -> dict[str, Tensor]:
        """``masked``: the student's masked input | the pseudo-labels it learns, uint8 (3, H, W)."""
        if not self._last:
            return {}
        masked = to_uint8(self._last["masked"].detach().cpu())
        labels = colorize(self._last["pseudo"].cpu(), self.setup.palette())
        return {"masked": torch.cat([masked, overlay(masked, labels)], dim=2)}


__all__ = ["MaskedImageConsistency", "MICOptions", "block_mask", "mask_images", "normalized_zero"]
