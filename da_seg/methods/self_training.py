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

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from da_seg.config import AugmentConfig, ConfigError
from da_seg.data.augment import PhotometricAugment
from da_seg.methods.base import Component, ComponentSetup, StepContext
from da_seg.methods.mixing import CHOICES, class_mix, class_mix_masks
from da_seg.models.segmenter import upsample_logits

TEACHER_MODES = ("train", "eval")
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
        object.__setattr__(self, "blur_sigma", tuple(float(v) for v in self.blur_sigma))
        object.__setattr__(self, "feature_distance_classes", tuple(int(v) for v in self.feature_distance_classes))
        where = "components.mean_teacher."
        for key, valid in (("teacher_mode", TEACHER_MODES), ("mix", MIX_MODES), ("mix_classes", CHOICES)):
            if getattr(self, key) not in valid:
                raise ConfigError(f"{where}{key} = {getattr(self, key)!r}; valid: {', '.join(valid)}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"{where}ema = {self.ema!r}; expected 0 <= ema < 1 (DACS 0.99, DAFormer 0.999)")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"{where}threshold = {self.threshold!r}; expected a probability in [0, 1]")
        if len(self.blur_sigma) != 2:
            raise ConfigError(f"{where}blur_sigma = {list(self.blur_sigma)!r}; expected [min, max]")
        if min(self.ignore_top, self.ignore_bottom, self.border_reference_height) < 0:
            raise ConfigError(f"{where}ignore_top / ignore_bottom / border_reference_height must be >= 0")


def ema_alpha(iteration: int, alpha: float) -> float:
    """alpha_t = min(1 - 1 / (t + 1), alpha): a plain average of the first steps, then alpha."""
    return min(1.0 - 1.0 / (iteration + 1), alpha)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float, buffers: bool = False) -> None:
    """teacher <- alpha * teacher + (1 - alpha) * student, for every parameter (and floating-point
    buffer when ``buffers``; integer buffers such as ``num_batches_tracked`` are then copied)."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_mul_(t_params, alpha)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - alpha)
    if buffers:
        for t_buf, s_buf in zip(teacher.buffers(), student.buffers()):
            if t_buf.is_floating_point():
                t_buf.mul_(alpha).add_(s_buf, alpha=1.0 - alpha)
            else:
                t_buf.copy_(s_buf)


def set_teacher_mode(teacher: nn.Module, mode: str) -> None:
    """"eval": everything in eval mode. "train": train mode with Dropout and DropPath off (DACS/DAFormer)."""
    if mode == "eval":
        teacher.eval()
        return
    teacher.train()
    for module in teacher.modules():
        if isinstance(module, _DropoutNd) or type(module).__name__ == "DropPath":
            module.eval()


def confidence_weight(confidence: Tensor, threshold: float) -> Tensor:
    """q: the share of pixels (over the whole batch) with confidence >= threshold; a 0-d tensor."""
    return (confidence >= threshold).float().mean()


def border_rows(height: int, top: int, bottom: int, reference_height: int) -> tuple[int, int]:
    """Rows to ignore at the top and bottom, scaled from ``reference_height`` when it is > 0."""
    if reference_height > 0:
        scale = height / reference_height
        top, bottom = round(top * scale), round(bottom * scale)
    return min(top, height), min(bottom, height)


def weighted_pixel_ce(logits: Tensor, labels: Tensor, weights: Tensor, ignore_index: int = 255) -> Tensor:
    """mean over all pixels of weight x CE; logits (N, C, h, w) upsampled to labels (N, H, W)."""
    ce = F.cross_entropy(upsample_logits(logits, labels.shape[-2:]).float(), labels,
                         ignore_index=ignore_index, reduction="none")
    return (ce * weights).mean()


def downscale_labels(labels: Tensor, size: tuple[int, int], num_classes: int, min_ratio: float,
                     ignore_index: int = 255) -> Tensor:
    """(N, H, W) -> (N, h, w): each cell's majority class if it covers >= ``min_ratio`` of the cell
    (ignore pixels counted as a class of their own), else ``ignore_index`` (DAFormer)."""
    slots = torch.where((labels >= 0) & (labels < num_classes), labels, num_classes)
    onehot = F.one_hot(slots, num_classes + 1).permute(0, 3, 1, 2).float()  # (N, C + 1, H, W)
    share, cls = F.adaptive_avg_pool2d(onehot, size).max(1)                 # (N, h, w)
    return torch.where((share >= min_ratio) & (cls < num_classes), cls, torch.full_like(cls, ignore_index))


def feature_distance(student_features: Tensor, reference_features: Tensor, labels: Tensor | None,
                     classes: tuple[int, ...], num_classes: int, min_ratio: float) -> Tensor:
    """Mean L2 distance (over channels) between two (N, D, h, w) feature maps, over the cells whose
    downscaled label is in ``classes`` (all cells when ``classes`` is empty); 0 if there are none."""
    distance = torch.linalg.vector_norm(student_features.float() - reference_features.float(), dim=1)  # (N, h, w)
    if not classes or labels is None:
        return distance.mean()
    cells = downscale_labels(labels, tuple(distance.shape[-2:]), num_classes, min_ratio)
    wanted = torch.tensor(classes, device=cells.device)
    mask = (cells.unsqueeze(-1) == wanted).any(-1).float()
    return (distance * mask).sum() / mask.sum().clamp_min(1.0)


class MeanTeacher(Component):
    """EMA teacher pseudo-labels the target; the student learns them on ClassMix-ed, strongly
    augmented images (DACS / DAFormer). Registers ``networks["teacher"]`` (checkpointed, resumed)."""

    name = "mean_teacher"
    Options = MeanTeacherOptions
    uses_source = True
    uses_target = True

    def __init__(self, options: MeanTeacherOptions, setup: ComponentSetup):
        super().__init__(options, setup)
        teacher = copy.deepcopy(setup.model)
        teacher.requires_grad_(False)
        set_teacher_mode(teacher, options.teacher_mode)
        self.networks["teacher"] = teacher
        self.strong = PhotometricAugment(AugmentConfig(
            flip=False, brightness=options.color_jitter, contrast=options.color_jitter,
            saturation=options.color_jitter, hue=options.color_jitter, color_p=options.color_p,
            blur_p=options.blur_p, blur_sigma=options.blur_sigma))
        self.imagenet: nn.Module | None = None
        if options.imagenet_weights and options.feature_distance_weight > 0:
            self.imagenet = self._frozen_imagenet_model(setup, options.imagenet_weights)
        num_classes = setup.num_classes
        self._label_counts = torch.zeros(num_classes, device=setup.device)
        self._kept_counts = torch.zeros(num_classes, device=setup.device)
        self._q = torch.zeros((), device=setup.device)
        self._last: dict[str, Tensor] = {}
        self._colors = None

    @staticmethod
    def _frozen_imagenet_model(setup: ComponentSetup, weights: str) -> nn.Module:
        from da_seg.models import build_model

        model_cfg = setup.recipe.model
        model = build_model(model_cfg.name, setup.num_classes, **{**model_cfg.options, "pretrained": weights})
        model.requires_grad_(False)
        return model.eval().to(setup.device)

    @property
    def teacher(self) -> nn.Module:
        return self.networks["teacher"]

    # ------------------------------------------------------------------ losses
    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        opt = self.options
        source, target = ctx.source, ctx.target
        n, _, height, width = target.images.shape
        with torch.no_grad():
            with ctx.autocast():
                teacher_logits = self.teacher(target.images).logits
            probs = torch.softmax(upsample_logits(teacher_logits, (height, width)).float(), dim=1)
            confidence, pseudo = probs.max(1)                                  # (N, H, W) each
            q = confidence_weight(confidence, opt.threshold)
            weights = q.expand(n, height, width).clone()
            top, bottom = border_rows(height, opt.ignore_top, opt.ignore_bottom, opt.border_reference_height)
            if top:
                weights[:, :top] = 0.0
            if bottom:
                weights[:, height - bottom:] = 0.0
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
        terms = {"mixed_ce": opt.weight * weighted_pixel_ce(out.logits, labels, weights, self.setup.ignore_index)}
        if opt.aux_weight > 0 and out.aux_logits is not None:
            terms["mixed_ce_aux"] = opt.weight * opt.aux_weight * weighted_pixel_ce(
                out.aux_logits, labels, weights, self.setup.ignore_index)
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
        from da_seg.engine.visualize import colorize, colormap, overlay

        if not self._last:
            return {}
        last = {k: v.detach().cpu() for k, v in self._last.items()}
        colors = self._palette()
        target, mixed = _to_uint8(last["target"]), _to_uint8(last["mixed"])
        confident = torch.where(last["confidence"] >= self.options.threshold, last["pseudo"],
                                torch.full_like(last["pseudo"], 255))
        pseudo_panel = torch.cat([target, overlay(target, colorize(last["pseudo"], colors)),
                                  overlay(target, colorize(confident, colors)), colormap(last["confidence"])], dim=2)
        mixed_panel = torch.cat([mixed, overlay(mixed, colorize(last["mixed_labels"], colors)),
                                 colormap(last["weights"])], dim=2)
        return {"pseudo_labels": pseudo_panel, "mixed": mixed_panel}

    def _palette(self):
        if self._colors is None:
            try:
                from da_seg.data.domains import load_domain

                self._colors = load_domain(self.setup.recipe.data.target or self.setup.recipe.data.source).colors
            except Exception:  # visuals must never stop training: fall back to a fixed palette
                g = torch.Generator().manual_seed(0)
                self._colors = torch.randint(0, 256, (self.setup.num_classes, 3), generator=g).tolist()
        return self._colors

    # ------------------------------------------------------------------ extra state
    def state_dict(self) -> dict[str, Any]:
        return {"label_counts": self._label_counts.cpu(), "kept_counts": self._kept_counts.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "label_counts" in state:
            self._label_counts.copy_(state["label_counts"])
            self._kept_counts.copy_(state["kept_counts"])


def _to_uint8(image: Tensor) -> Tensor:
    """float (3, H, W) in [0, 1] -> uint8 (3, H, W)."""
    return (image.float() * 255.0).round().clamp(0, 255).to(torch.uint8)


__all__ = ["MeanTeacher", "MeanTeacherOptions", "ema_alpha", "ema_update", "confidence_weight",
           "weighted_pixel_ce", "feature_distance", "downscale_labels", "border_rows", "set_teacher_mode"]
