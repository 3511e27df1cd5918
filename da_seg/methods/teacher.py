"""An EMA ("mean") teacher: the averaging and the mode it predicts in.

Shared by the self-training components (DACS / DAFormer's ``mean_teacher`` and those built on
it): the teacher is a frozen copy of the student whose parameters follow the student's by an
exponential moving average after each optimizer step.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from da_seg.models.segformer import DropPath

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


def set_teacher_mode(teacher: nn.Module, mode: str) -> None:
    """"eval": everything in eval mode. "train": train mode with Dropout and DropPath off (DACS/DAFormer)."""
    if mode == "eval":
        teacher.eval()
        return
    teacher.train()
    for module in teacher.modules():
        if isinstance(module, (_DropoutNd, DropPath)):
            module.eval()


def ema_due(iteration: int, every: int) -> bool:
    """Whether the teacher follows the student after the optimizer step of 0-based ``iteration``
    when it is updated once every ``every`` steps (1: after every step, as DACS / DAFormer).

    SAC's slow teacher (``NET_MOMENTUM_ITER = 100``) is updated before the steps t = 100, 200, ...
    from the student as it is after step t - 1; that is this update, after steps 99, 199, ...
    """
    return (iteration + 1) % every == 0
