"""An EMA ("mean") teacher: the averaging and the mode it predicts in.

Shared by the self-training components (DACS / DAFormer's ``mean_teacher`` and those built on
it): the teacher is a frozen copy of the student whose parameters follow the student's by an
exponential moving average after each optimizer step; ``teacher_pseudo_labels`` is how it labels
a target batch (DAFormer ``dacs.py`` ``get_pseudo_label_and_weight`` + ``filter_valid_pseudo_region``,
the same in MIC's ``teacher_module.py``).
"""
from __future__ import annotations

import copy
from contextlib import AbstractContextManager
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from da_seg.config import AugmentConfig
from da_seg.data.augment import PhotometricAugment
from da_seg.methods.base import PseudoLabels
from da_seg.models.segformer import DropPath
from da_seg.models.segmenter import upsample_logits

TEACHER_MODES = ("train", "eval")


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


def frozen_teacher(model: nn.Module, mode: str) -> nn.Module:
    """A gradient-free copy of the student (its weights at the first step) in ``mode``."""
    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    set_teacher_mode(teacher, mode)
    return teacher


def strong_augment(options) -> PhotometricAugment:
    """DACS's strong augmentation of the student's target images, from a component's
    ``color_jitter`` (all four strengths), ``color_p``, ``blur_p`` and ``blur_sigma`` options."""
    jitter = options.color_jitter
    return PhotometricAugment(AugmentConfig(
        flip=False, brightness=jitter, contrast=jitter, saturation=jitter, hue=jitter,
        color_p=options.color_p, blur_p=options.blur_p, blur_sigma=options.blur_sigma))


def set_teacher_mode(teacher: nn.Module, mode: str) -> None:
    """"eval": everything in eval mode. "train": train mode with Dropout and DropPath off (DACS/DAFormer)."""
    if mode == "eval":
        teacher.eval()
        return
    teacher.train()
    for module in teacher.modules():
        if isinstance(module, (_DropoutNd, DropPath)):
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


@torch.no_grad()
def teacher_pseudo_labels(teacher: nn.Module, images: Tensor, threshold: float,
                          autocast: Callable[[], AbstractContextManager], ignore_top: int = 0,
                          ignore_bottom: int = 0, border_reference_height: int = 0,
                          valid: Tensor | None = None) -> PseudoLabels:
    """images (N, 3, H, W) -> the teacher's argmax labels at (H, W), their confidence, and weights:
    q (computed before the border rows are zeroed) everywhere, 0 on ``ignore_top`` / ``ignore_bottom``
    and where ``valid`` (N, H, W) bool is False (the target's pseudo-label margins, cut with its crop)."""
    n, _, height, width = images.shape
    with autocast():
        out = teacher(images)
    probs = torch.softmax(upsample_logits(out.logits, (height, width), out.align_corners).float(), dim=1)
    confidence, labels = probs.max(1)                                       # (N, H, W) each
    q = confidence_weight(confidence, threshold)
    weights = q.expand(n, height, width).clone()
    top, bottom = border_rows(height, ignore_top, ignore_bottom, border_reference_height)
    if top:
        weights[:, :top] = 0.0
    if bottom:
        weights[:, height - bottom:] = 0.0
    if valid is not None:
        weights = weights * valid
    return PseudoLabels(labels=labels, confidence=confidence, weights=weights, q=q)


def ema_due(iteration: int, every: int) -> bool:
    """Whether the teacher follows the student after the optimizer step of 0-based ``iteration``
    when it is updated once every ``every`` steps (1: after every step, as DACS / DAFormer).

    SAC's slow teacher (``NET_MOMENTUM_ITER = 100``) is updated before the steps t = 100, 200, ...
    from the student as it is after step t - 1; that is this update, after steps 99, 199, ...
    """
    return (iteration + 1) % every == 0
