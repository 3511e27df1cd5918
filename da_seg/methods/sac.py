"""Self-supervised Augmentation Consistency, ``sac`` (Araslanov & Roth, CVPR 2021; official code
visinf/da-sac: ``models/sac.py``, ``train.py``, ``datasets/dataloader_target.py``,
``configs/deeplabv2_resnet101_train.yaml``).

SAC starts from an ABN baseline (source CE with target batches forwarded for BatchNorm only: the
``target_bn`` recipe; the ``warm_start`` stage trains it first) and then, each step:
  G target images -> V views each (``views.random_views``: flip, zoom in [0.5, 1]) ->
  slow teacher (eval mode) on the clean views -> softmax at the view size -> class prior chi
  updated -> probabilities warped to each image's reference frame, averaged over its views,
  warped back into every view (``views.pool_views``) -> pseudo-labels with per-view, per-class
  thresholds -> student on the photometrically augmented views -> focal, confidence-weighted CE
  x ``weight`` (LR_TARGET 5.0); the source CE is the ``source_ce`` component beside it.
  after the optimizer step, every ``update_every`` steps: teacher <- m teacher + (1 - m) student.

The official code, where it says more than the paper (followed here):
- chi (``running_conf``): starts at beta; a class whose chi is still exactly beta takes the mean
  probability of the batch, then chi <- 0.99 chi + 0.01 mean, where mean is the teacher's
  softmax averaged over views and pixels *before* pooling (``_update_running_conf``).
- threshold of class c in view n: max(0.75 x peak_nc x (1 - exp(-chi_c / beta)), 0.2), peak_nc =
  the largest confidence among the view's pixels predicted c; a pixel keeps its label if its
  confidence is above its class's threshold (``_pseudo_labels_probs``).
- loss (``_focal_ce_conf``): CE with class weights (1 - chi)^3, times the teacher's confidence,
  averaged over all pixels (unlabelled ones count 0). In the code the per-pixel CE (N, H, W) is
  multiplied by the confidence (N, 1, H, W), which broadcasts to (N, N, H, W): every view's CE is
  weighted by the *batch-mean* confidence at that pixel position, not by its own view's.
  ``confidence_weight = "batch_mean"`` (default) is the code; ``"own"`` is the paper's reading.
- the slow teacher is a copy of the student at the first step; updates every 100 steps with
  momentum 0.99 of parameters and BatchNorm statistics (``_momentum_update``); in the code the
  100 count restarts each epoch, so there is also an update at every epoch start (not here).
- the student's BatchNorm layers are in eval mode during SAC (``freeze_bn = not BASELINE``:
  running statistics of the ABN model, scale and shift still trained): ``freeze_student_bn``.
- target augmentation of the student's views (``tf_augm``): Gaussian blur always (PIL radius
  U(0.1, 2)), colour jitter 0.4 / hue 0.1 with p 0.5, greyscale p 0.2; kornia applies them in
  the order jitter, greyscale, blur (the official: blur, jitter, greyscale).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from da_seg.config import AugmentConfig
from da_seg.data.augment import PhotometricAugment
from da_seg.methods.base import Component, ComponentSetup, OptionError, StepContext
from da_seg.methods.common import (check_choice, check_nonnegative, check_pair, check_positive_int,
                                   freeze_batchnorm_statistics)
from da_seg.methods.teacher import ema_due, ema_update, frozen_teacher
from da_seg.methods.views import pool_views, random_views
from da_seg.models.segmenter import upsample_logits
from da_seg.utils.visualize import colorize, colormap, overlay, to_uint8

CONFIDENCE_WEIGHTS = ("batch_mean", "own")


@dataclass(frozen=True)
class SACOptions:
    weight: float = 5.0                    # LR_TARGET: multiplier of the target loss
    groups: int = 2                        # NUM_GROUPS: target images per step (the first of the target batch)
    views: int = 4                         # GROUP_SIZE: views of each image (view 0 is not zoomed)
    zoom: tuple[float, float] = (0.5, 1.0)  # RND_ZOOM: share of each side a zoomed view covers
    flip: bool = True                      # GUIDED_HFLIP: each view flipped with p 0.5
    color_jitter: float = 0.4              # RND_JITTER: brightness = contrast = saturation; hue min(0.1, it)
    color_p: float = 0.5                   # MaskRandJitter p
    blur_p: float = 1.0                    # RND_BLUR: every view blurred
    blur_sigma: tuple[float, float] = (0.1, 2.0)   # PIL GaussianBlur radius U(0.1, 2)
    grayscale_p: float = 0.2               # RND_GREYSCALE
    momentum: float = 0.99                 # NET_MOMENTUM: slow teacher EMA
    update_every: int = 100                # NET_MOMENTUM_ITER: steps between teacher updates
    prior_momentum: float = 0.99           # STAT_MOMENTUM: moving class prior chi
    threshold_beta: float = 1e-3           # THRESHOLD_BETA: rare-class discount 1 - exp(-chi / beta)
    conf_upper: float = 0.75               # RUN_CONF_UPPER: threshold = this x the class's peak confidence
    conf_lower: float = 0.2                # RUN_CONF_LOWER: lowest threshold
    focal_power: float = 3.0               # FOCAL_P: class weight (1 - chi)^p
    pool: bool = True                      # CONF_POOL_ON: average the teacher over the views
    confidence_weight: str = "batch_mean"  # "batch_mean" (official code's broadcast) | "own"
    freeze_student_bn: bool = True         # student BatchNorm in eval mode (official freeze_bn in SAC)

    def __post_init__(self):
        check_pair(self, "zoom", "[min, max] with 0 < min <= max <= 1")
        check_pair(self, "blur_sigma", "[min, max]")
        check_positive_int(self, ("groups", "views", "update_every"))
        check_nonnegative(self, ("weight", "color_jitter", "threshold_beta", "focal_power"))
        check_choice(self, "confidence_weight", CONFIDENCE_WEIGHTS)
        if not 0 < self.zoom[0] <= self.zoom[1] <= 1:
            raise OptionError("zoom", f"= {list(self.zoom)!r}; expected [min, max] with 0 < min <= max <= 1 "
                                      "(views zoom in; official [0.5, 1.0])")
        if self.threshold_beta == 0:
            raise OptionError("threshold_beta", "= 0; expected > 0 (the prior is divided by it; official 1e-3)")
        for key in ("color_p", "blur_p", "grayscale_p", "conf_upper", "conf_lower"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise OptionError(key, f"= {getattr(self, key)!r}; expected a value in [0, 1]")
        for key in ("momentum", "prior_momentum"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise OptionError(key, f"= {getattr(self, key)!r}; expected 0 <= momentum < 1 (official 0.99)")


def update_class_prior(prior: Tensor, mean_probs: Tensor, momentum: float, beta: float,
                       tolerance: float = 1e-8) -> None:
    """chi (C,) in place from the batch's mean class probabilities (C,): classes never seen
    (chi still == beta) start from the batch value, then chi <- m chi + (1 - m) mean."""
    fresh = (mean_probs > tolerance) & (prior == beta)
    prior.copy_(torch.where(fresh, mean_probs, prior))
    prior.mul_(momentum).add_(mean_probs, alpha=1.0 - momentum)


def class_thresholds(probs: Tensor, prior: Tensor, upper: float, lower: float, beta: float) -> Tensor:
    """(N, C, H, W) probabilities, chi (C,) -> (N, C) thresholds:
    max(upper x peak_nc x (1 - exp(-chi_c / beta)), lower), peak_nc the largest confidence of the
    pixels of image n whose most likely class is c (0 when there are none)."""
    n, c = probs.shape[:2]
    confidence, predicted = probs.max(1, keepdim=True)                  # (N, 1, H, W)
    peaks = torch.zeros_like(probs).scatter_(1, predicted, confidence).view(n, c, -1).amax(-1)
    discount = 1.0 - torch.exp(-prior / beta)
    return (upper * peaks * discount[None]).clamp_min(lower)


def pseudo_labels(probs: Tensor, thresholds: Tensor, ignore_index: int = 255) -> tuple[Tensor, Tensor]:
    """(N, C, H, W) probabilities, (N, C) thresholds -> labels (N, H, W) int64 (``ignore_index``
    where the confidence is not above its class's threshold) and the confidence (N, H, W)."""
    confidence, predicted = probs.max(1)
    threshold = thresholds.gather(1, predicted.flatten(1)).view_as(confidence)
    labels = torch.where(confidence > threshold, predicted, torch.full_like(predicted, ignore_index))
    return labels, confidence


def focal_confidence_ce(logits: Tensor, labels: Tensor, confidence: Tensor, prior: Tensor, power: float,
                        confidence_weight: str = "batch_mean", ignore_index: int = 255) -> Tensor:
    """mean over pixels of (1 - chi_y)^p CE(logits, y) x confidence; logits (N, C, H, W) at the label
    size, labels / confidence (N, H, W). ``batch_mean``: the confidence averaged over the batch at
    each pixel position (the official code's broadcast), ``own``: each pixel's own."""
    class_weight = (1.0 - prior.clamp_min(0.0)) ** power
    ce = F.cross_entropy(logits.float(), labels, weight=class_weight, ignore_index=ignore_index, reduction="none")
    if confidence_weight == "batch_mean":
        return (ce.mean(0) * confidence.mean(0)).mean()
    return (ce * confidence).mean()


class SelfAugmentationConsistency(Component):
    """SAC's target term with its slow teacher (``networks["teacher"]``, checkpointed) and moving
    class prior; list it after ``source_ce`` and start it from an ABN model (``warm_start`` stage)."""

    name = "sac"
    Options = SACOptions
    uses_target = True

    def __init__(self, options: SACOptions, setup: ComponentSetup):
        super().__init__(options, setup)
        # = the student at the first step (model.init_checkpoint loaded)
        self.networks["teacher"] = frozen_teacher(setup.model, "eval")
        self._bn_hooks = freeze_batchnorm_statistics(setup.model) if options.freeze_student_bn else []
        jitter = options.color_jitter
        self.photometric = PhotometricAugment(AugmentConfig(
            flip=False, brightness=jitter, contrast=jitter, saturation=jitter, hue=min(0.1, jitter),
            color_p=options.color_p, blur_p=options.blur_p, blur_sigma=options.blur_sigma,
            grayscale_p=options.grayscale_p))
        self.prior = torch.full((setup.num_classes,), options.threshold_beta, device=setup.device)
        self._labelled = torch.zeros((), device=setup.device)
        self._updates = 0
        self._last: dict[str, Tensor] = {}

    @property
    def teacher(self) -> nn.Module:
        return self.networks["teacher"]

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        opt = self.options
        images = ctx.target.images
        if images.shape[0] < opt.groups:
            raise ValueError(f"components.sac.groups = {opt.groups}, but the target batch has {images.shape[0]} "
                             "images; raise data.batch_size or lower groups")
        with torch.no_grad():
            views = random_views(images[:opt.groups], opt.views, opt.zoom, opt.flip)
            size = views.images.shape[-2:]
            with ctx.autocast():
                teacher_out = self.teacher(views.images)
            probs = torch.softmax(upsample_logits(teacher_out.logits.float(), size, teacher_out.align_corners), 1)
            update_class_prior(self.prior, probs.mean((0, 2, 3)), opt.prior_momentum, opt.threshold_beta)
            if opt.pool:
                probs = pool_views(probs, views.to_view, views.to_reference, opt.views)
            thresholds = class_thresholds(probs, self.prior, opt.conf_upper, opt.conf_lower, opt.threshold_beta)
            labels, confidence = pseudo_labels(probs, thresholds, self.setup.ignore_index)
            student_images = self.photometric(views.images) if self.photometric.active else views.images
            self._labelled = (labels != self.setup.ignore_index).float().mean()
            self._last = {"views": views.images, "student": student_images, "labels": labels, "confidence": confidence}
        out = ctx.forward(student_images)
        logits = upsample_logits(out.logits, size, out.align_corners)
        return {"consistency_ce": opt.weight * focal_confidence_ce(
            logits, labels, confidence, self.prior, opt.focal_power, opt.confidence_weight, self.setup.ignore_index)}

    def after_step(self, ctx: StepContext) -> dict[str, Tensor | float]:
        if ema_due(ctx.iteration, self.options.update_every):
            ema_update(self.teacher, self.setup.model, self.options.momentum, buffers=True)
            self._updates += 1
        names = self.setup.class_names or tuple(str(c) for c in range(self.setup.num_classes))
        stats: dict[str, Tensor | float] = {"labelled": self._labelled, "teacher_updates": float(self._updates)}
        for c, name in enumerate(names):
            stats[f"prior/{name.replace(' ', '_')}"] = self.prior[c]
        return stats

    def visuals(self, ctx: StepContext) -> dict[str, Tensor]:
        """The views of the first image: clean (teacher) | augmented (student) | pseudo-labels | confidence."""
        if not self._last:
            return {}
        last = {k: v[:self.options.views].detach().cpu() for k, v in self._last.items()}
        colors = self.setup.palette()
        rows = [torch.cat([to_uint8(clean), to_uint8(student), overlay(to_uint8(clean), colorize(labels, colors)),
                           colormap(conf)], dim=2)
                for clean, student, labels, conf in zip(last["views"], last["student"], last["labels"],
                                                        last["confidence"])]
        return {"views": torch.cat(rows, dim=1)}

    def state_dict(self) -> dict[str, Any]:
        return {"prior": self.prior.cpu(), "teacher_updates": self._updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "prior" in state:
            self.prior.copy_(state["prior"])
            self._updates = int(state["teacher_updates"])


__all__ = ["SelfAugmentationConsistency", "SACOptions", "update_class_prior", "class_thresholds",
           "pseudo_labels", "focal_confidence_ce"]
