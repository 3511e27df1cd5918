"""Online self-training with an EMA teacher: DACS (Tranheden et al., WACV 2021) and DAFormer
(Hoyer et al., CVPR 2022) as one component, ``mean_teacher``.

One step, in the order the code reads:
  teacher(target) -> softmax -> pseudo-labels (argmax) and confidence weight q
  -> ClassMix: half of each source image's classes pasted onto a target image
     (weight 1 on pasted pixels, q elsewhere; DAFormer: 0 on the top/bottom border rows of target pixels)
  -> strong colour jitter + blur of the mixed images -> student(mixed) -> pixel-weighted CE.
  after the optimizer step: teacher <- alpha_t * teacher + (1 - alpha_t) * student.

The student never runs on the plain target batch here (only the teacher does), so listing
``mean_teacher`` next to ``advent`` or ``source_ce`` adds exactly one student pass: the mixed batch.
The teacher's pseudo-labels of the target batch are the step's ``ctx.target_pseudo`` (set up in
``prepare_batches``, computed on first use): ``mic`` learns the same ones without a second teacher pass.

Choices, with what the official codes do:
- EMA ``alpha_t = min(1 - 1 / (t + 1), alpha)`` with ``t`` the 0-based iteration of the optimizer step
  just taken (DACS ``update_ema_variables(..., iteration=i_iter)``): the teacher equals the student
  after the first step. Parameters are averaged, buffers are not (both codes), see ``teacher_mode``.
- ``teacher_mode = "train"`` (default) is what DACS and DAFormer run: the teacher stays in train mode,
  only Dropout and DropPath are switched off, so BatchNorm normalizes with the target batch's own
  statistics (DAFormer is often described as using an eval-mode teacher; its code does not).
  ``"eval"``: the whole teacher in eval mode; its BatchNorm running statistics are then EMA-averaged
  from the student's along with the parameters (otherwise they would stay at their initial values).
- q = share of the target batch's pixels whose teacher confidence is >= ``threshold``, one scalar per
  batch (DACS, DAFormer), computed before the border rows are zeroed.
- The loss is the mean over *all* pixels of weight x CE (ignored pixels count as 0), as DACS'
  ``CrossEntropyLoss2dPixelWiseWeighted`` and DAFormer's ``seg_weight`` reduce it.
- ImageNet feature distance (DAFormer): on the *source* batch, the L2 distance between the student's
  ``features["backbone"]`` (last encoder stage, from the source forward other components share) and
  those of a frozen network built from ``imagenet_weights`` (the ImageNet-initialised segmenter, i.e.
  a frozen copy of the initial backbone), averaged over feature cells whose downscaled source label
  is one of ``feature_distance_classes`` (a cell's label: its majority class if it covers >= 0.75 of
  the cell). Off unless ``imagenet_weights`` names a file. The frozen network is rebuilt from that
  file on every start and is not stored in checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from da_seg.methods.base import Component, ComponentSetup, OptionError, PseudoLabels, StepContext
from da_seg.methods.common import check_choice, check_pair, frozen_copy, supervised_views
from da_seg.methods.feature_distance import feature_distance
from da_seg.methods.mixing import CHOICES, class_mix, class_mix_masks
from da_seg.methods.teacher import (TEACHER_MODES, border_rows, confidence_weight, ema_alpha, ema_update,
                                    frozen_teacher, strong_augment, teacher_pseudo_labels)
from da_seg.models.segmenter import upsample_logits
from da_seg.utils.visualize import colorize, colormap, overlay, to_uint8

MIX_MODES = ("classmix", "none")
STATS_DECAY = 0.98  # per-class kept fractions are logged over roughly the last 50 steps


@dataclass(frozen=True)
class MeanTeacherOptions:
    weight: float = 1.0                    # weight of the mixed-image loss
    ema: float = 0.99                      # alpha: DACS 0.99, DAFormer 0.999
    threshold: float = 0.968               # tau for the confidence weight q
    teacher_mode: str = "train"            # "train" (DACS/DAFormer: Dropout/DropPath off, BN batch stats) | "eval"
    mix: str = "classmix"                  # "classmix" | "none" (pseudo-labelled target image alone)
    mix_classes: str = "per_image"         # "per_image" (DACS) | "per_batch" (DAFormer)
    # Strong augmentation of the mixed images (DACS: kornia ColorJitter(s, s, s, s) with p 0.8, blur p 0.5)
    color_jitter: float = 0.25             # s: brightness = contrast = saturation = hue = s; 0 = off
    color_p: float = 0.8
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.15, 1.15)
    # DAFormer: pseudo-label weight 0 on the top / bottom rows (sky border, ego-vehicle hood)
    ignore_top: int = 0
    ignore_bottom: int = 0
    border_reference_height: int = 0       # > 0: rows above are for this image height, scaled to the batch's
    aux_weight: float = 0.0                # CE on the aux head (multi-level DeepLab) of the mixed pass
    # DAFormer ImageNet feature distance; off unless imagenet_weights names the ImageNet weight file
    feature_distance_weight: float = 0.005
    imagenet_weights: str = ""
    feature_distance_classes: tuple[int, ...] = ()   # train ids; () = every cell
    feature_distance_min_ratio: float = 0.75

    def __post_init__(self):
        object.__setattr__(self, "feature_distance_classes", tuple(int(v) for v in self.feature_distance_classes))
        check_choice(self, "teacher_mode", TEACHER_MODES)
        check_choice(self, "mix", MIX_MODES)
        check_choice(self, "mix_classes", CHOICES)
        check_pair(self, "blur_sigma", "[min, max]")
        if not 0.0 <= self.ema < 1.0:
            raise OptionError("ema", f"= {self.ema!r}; expected 0 <= ema < 1 (DACS 0.99, DAFormer 0.999)")
        for key in ("threshold", "color_p", "blur_p"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise OptionError(key, f"= {getattr(self, key)!r}; expected a probability in [0, 1]")
        for key in ("ignore_top", "ignore_bottom", "border_reference_height"):
            if getattr(self, key) < 0:
                raise OptionError(key, f"= {getattr(self, key)!r}; expected >= 0")


def weighted_pixel_ce(logits: Tensor, labels: Tensor, weights: Tensor, ignore_index: int = 255,
                      align_corners: bool = False) -> Tensor:
    """mean over all pixels of weight x CE; logits (N, C, h, w) upsampled to labels (N, H, W)."""
    ce = F.cross_entropy(upsample_logits(logits, labels.shape[-2:], align_corners).float(), labels,
                         ignore_index=ignore_index, reduction="none")
    return (ce * weights).mean()


class MeanTeacher(Component):
    """EMA teacher pseudo-labels the target; the student learns them on ClassMix-ed, strongly
    augmented images (DACS / DAFormer). Registers ``networks["teacher"]`` (checkpointed, resumed)."""

    name = "mean_teacher"
    Options = MeanTeacherOptions
    uses_source = True
    uses_target = True
    provides_pseudo_labels = True

    def __init__(self, options: MeanTeacherOptions, setup: ComponentSetup):
        super().__init__(options, setup)
        self.networks["teacher"] = frozen_teacher(setup.model, options.teacher_mode)
        self.strong = strong_augment(options)
        self.imagenet: nn.Module | None = None
        if options.imagenet_weights and options.feature_distance_weight > 0:
            # The ImageNet-initialised segmenter, frozen: rebuilt from the weight file on every start.
            self.imagenet = frozen_copy(setup.build_segmenter(pretrained=options.imagenet_weights)).to(setup.device)
        num_classes = setup.num_classes
        self._label_counts = torch.zeros(num_classes, device=setup.device)
        self._kept_counts = torch.zeros(num_classes, device=setup.device)
        self._q = torch.zeros((), device=setup.device)
        self._last: dict[str, Tensor] = {}

    @property
    def teacher(self) -> nn.Module:
        return self.networks["teacher"]

    # ------------------------------------------------------------------ losses
    def prepare_batches(self, ctx: StepContext) -> None:
        # The teacher labels the target once per step, for this component and for any other that
        # learns from the same pseudo-labels (mic): ctx.target_pseudo runs it on first use.
        ctx.pseudo_labeler = self.pseudo_label

    def pseudo_label(self, ctx: StepContext) -> PseudoLabels:
        opt = self.options
        return teacher_pseudo_labels(self.teacher, ctx.target.images, opt.threshold, ctx.autocast,
                                     opt.ignore_top, opt.ignore_bottom, opt.border_reference_height,
                                     valid=ctx.target.valid)

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        opt = self.options
        source, target = ctx.source, ctx.target
        pseudo_labels = ctx.target_pseudo
        with torch.no_grad():
            pseudo, confidence, q = pseudo_labels.labels, pseudo_labels.confidence, pseudo_labels.q
            weights = pseudo_labels.weights
            if opt.mix == "classmix":
                mask = class_mix_masks(source.labels, self.setup.num_classes, opt.mix_classes,
                                       self.setup.ignore_index)
                mixed = class_mix(source.images, source.labels, target.images, pseudo, weights, mask)
                images, labels, weights, mask = mixed.images, mixed.labels, mixed.weights, mixed.mask
            else:
                images, labels, mask = target.images, pseudo, torch.zeros_like(pseudo, dtype=torch.bool)
            if self.strong.active:
                images = self.strong(images)
            self._record(q, pseudo, confidence >= opt.threshold)
            self._last = {"target": target.images[0], "pseudo": pseudo[0], "confidence": confidence[0],
                          "mixed": images[0], "mixed_labels": labels[0], "weights": weights[0], "mask": mask[0]}

        # The plain augmented target image needs no extra pass: share the cached one.
        out = ctx.target_out if (opt.mix == "none" and not self.strong.active) else ctx.forward(images)
        terms = {f"mixed_ce{suffix}": opt.weight * share * weighted_pixel_ce(
                     logits, view_labels, view_weights, self.setup.ignore_index, out.align_corners)
                 for suffix, logits, view_labels, view_weights, share in supervised_views(out, labels, weights)}
        if opt.aux_weight > 0 and out.aux_logits is not None:
            terms["mixed_ce_aux"] = opt.weight * opt.aux_weight * weighted_pixel_ce(
                out.aux_logits, labels, weights, self.setup.ignore_index, out.align_corners)
        if self.imagenet is not None:
            terms["feature_distance"] = opt.feature_distance_weight * self._feature_distance(ctx)
        return terms

    def _feature_distance(self, ctx: StepContext) -> Tensor:
        features = ctx.source_out.features["backbone"]
        with torch.no_grad(), ctx.autocast():
            reference = self.imagenet(ctx.source.images).features["backbone"]
        opt = self.options
        return feature_distance(features, reference, ctx.source.labels, opt.feature_distance_classes,
                                self.setup.num_classes, opt.feature_distance_min_ratio)

    def _record(self, q: Tensor, pseudo: Tensor, confident: Tensor) -> None:
        """Device-side bookkeeping for the logs (no host sync)."""
        flat = pseudo.reshape(-1)
        labelled = torch.zeros_like(self._label_counts).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float))
        kept = torch.zeros_like(self._kept_counts).scatter_add_(0, flat, confident.reshape(-1).float())
        self._label_counts.mul_(STATS_DECAY).add_(labelled)
        self._kept_counts.mul_(STATS_DECAY).add_(kept)
        self._q = q

    # ------------------------------------------------------------------ after the optimizer step
    def after_step(self, ctx: StepContext) -> dict[str, Tensor | float]:
        alpha = ema_alpha(ctx.iteration, self.options.ema)
        ema_update(self.teacher, self.setup.model, alpha, buffers=self.options.teacher_mode == "eval")
        kept = self._kept_counts / self._label_counts.clamp_min(1e-6)
        stats: dict[str, Tensor | float] = {"q": self._q}   # device tensors only: no host sync per step
        for c, name in enumerate(self._class_names()):
            stats[f"kept/{name}"] = kept[c]
        return stats

    def _class_names(self) -> list[str]:
        names = self.setup.class_names or tuple(str(c) for c in range(self.setup.num_classes))
        return [n.replace(" ", "_") for n in names]

    # ------------------------------------------------------------------ images for TensorBoard
    def visuals(self, ctx: StepContext) -> dict[str, Tensor]:
        """From the latest step, first image of the batch, each uint8 (3, H, W):
        ``pseudo_labels``: target | pseudo-labels | confident pseudo-labels only (>= threshold) | confidence;
        ``mixed``: mixed student input | its labels | pixel weights (black 0 ... yellow 1)."""
        if not self._last:
            return {}
        last = {k: v.detach().cpu() for k, v in self._last.items()}
        colors = self.setup.palette()
        target, mixed = to_uint8(last["target"]), to_uint8(last["mixed"])
        confident = torch.where(last["confidence"] >= self.options.threshold, last["pseudo"],
                                torch.full_like(last["pseudo"], 255))
        pseudo_panel = torch.cat([target, overlay(target, colorize(last["pseudo"], colors)),
                                  overlay(target, colorize(confident, colors)), colormap(last["confidence"])], dim=2)
        mixed_panel = torch.cat([mixed, overlay(mixed, colorize(last["mixed_labels"], colors)),
                                 colormap(last["weights"])], dim=2)
        return {"pseudo_labels": pseudo_panel, "mixed": mixed_panel}

    # ------------------------------------------------------------------ extra state
    def state_dict(self) -> dict[str, Any]:
        return {"label_counts": self._label_counts.cpu(), "kept_counts": self._kept_counts.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "label_counts" in state:
            self._label_counts.copy_(state["label_counts"])
            self._kept_counts.copy_(state["kept_counts"])



__all__ = ["MeanTeacher", "MeanTeacherOptions", "confidence_weight",
           "weighted_pixel_ce", "border_rows"]
