"""Dual Path Learning (DPL; Cheng et al., ICCV 2021; official code royee182/DPL): its math.

Two segmenters: M_S works in the source style (source images, target images translated to the
source style by G_ts), M_T in the target style (source images translated by G_st, target images).
The ``dual_path`` stage (``da_seg/stages/dual_path.py``) sequences warm-up, translation and rounds;
what decides a loss or a label is here.

Dual-path image translation (DPIT; ``CycleGAN_DPL/models/cycle_diff_model.py``, ``backward_G``):
the CycleGAN translator gains, with frozen M_S and M_T, F = the segmenter's logits at its output
stride (the release's ``semantic`` model returns DeepLab's ``layer5``) and
IN = InstanceNorm2d without affine parameters,

    dp_rec_sem_s = lambda_cycle * lambda * MSE(IN(F_S(G_ts(G_st(x_s)))), IN(F_S(x_s)))    10 * lambda
    dp_rec_sem_t = lambda_cycle * lambda * MSE(IN(F_T(G_st(G_ts(x_t)))), IN(F_T(x_t)))    lambda = 1
    dp_sem_s     = 0.1 * MSE(IN(F_T(G_st(x_s))), IN(F_S(x_s)))                           (``loss_sem_A``)
    dp_sem_t     = 0.1 * MSE(IN(F_S(G_ts(x_t))), IN(F_T(x_t)))                           (``loss_sem_B``)

(``lambda_A * lambda_semantic`` on the reconstructions, a fixed ``* 0.1`` on the translations,
all four only when ``lambda_semantic > 0``; ``--lambda_semantic 1`` in the README's DPIT command.)

Dual-path pseudo-labels (``DPL_master/DP_SSL.py``): p = alpha * softmax(M_T(x_t)) + (1 - alpha) *
softmax(M_S(G_ts(x_t))), alpha = 0.5 (``--alpha 0.5``); label = argmax p, confidence = max p. Per
class c, with x_c the confidences of the pixels labelled c sorted ascending,
``thres_c = x_c[round(len(x_c) * threshlen)]`` (0 for a class nobody predicts), then
``thres_c = min(thres_c, thresh)``; pixels with confidence < thres of their label are ignored
(255). ``--thresh 0.9 --threshlen 0.3`` in round 1, ``threshlen`` 0.25 in the three later rounds
(README, step 3.3): each class keeps its most confident 70% (then 75%) of pixels, and every pixel
at or above 0.9.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from da_seg.models.dual_path import fuse_paths

IGNORE_INDEX = 255


# ---------------------------------------------------------------------------------------------
# DPIT: the translator's semantic terms

def instance_normalized_mse(features: Tensor, reference: Tensor) -> Tensor:
    """mean((IN(features) - IN(reference))^2); both (N, C, h, w); IN without affine parameters."""
    return torch.mean((F.instance_norm(features.float()) - F.instance_norm(reference.float())) ** 2)


def dpit_semantic_terms(source_model: nn.Module, target_model: nn.Module, images: dict[str, Tensor], *,
                        reconstruction_weight: float, translation_weight: float) -> dict[str, Tensor]:
    """DPIT's four terms. ``images``: ``real_s``, ``real_t``, ``fake_t`` = G_st(x_s), ``fake_s`` =
    G_ts(x_t), ``rec_s`` = G_ts(G_st(x_s)), ``rec_t`` = G_st(G_ts(x_t)), each (N, 3, H, W) in [-1, 1].
    The models are frozen (no parameter gets gradient); the references (real images) carry none."""
    def logits(model: nn.Module, x: Tensor) -> Tensor:
        return model((x + 1) / 2).logits                                 # (N, C, H/os, W/os)

    with torch.no_grad():
        real_s_by_s = logits(source_model, images["real_s"])
        real_t_by_t = logits(target_model, images["real_t"])
    return {
        "dp_rec_sem_s": reconstruction_weight * instance_normalized_mse(logits(source_model, images["rec_s"]), real_s_by_s),
        "dp_rec_sem_t": reconstruction_weight * instance_normalized_mse(logits(target_model, images["rec_t"]), real_t_by_t),
        "dp_sem_s": translation_weight * instance_normalized_mse(logits(target_model, images["fake_t"]), real_s_by_s),
        "dp_sem_t": translation_weight * instance_normalized_mse(logits(source_model, images["fake_s"]), real_t_by_t),
    }


# ---------------------------------------------------------------------------------------------
# Dual-path pseudo-labels

def fused_labels(target_probs: Tensor, source_probs: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """(label, confidence) of alpha * P_T + (1 - alpha) * P_S; probs (C, H, W) or (N, C, H, W)
    -> two (H, W) / (N, H, W) tensors (int64 label, float32 confidence)."""
    confidence, label = fuse_paths(target_probs.float(), source_probs.float(), alpha).max(-3)
    return label, confidence


def quantile_thresholds(values: Sequence[Tensor], quantile: float, cap: float) -> Tensor:
    """Per class: ascending-sorted confidences x_c -> min(x_c[round(len(x_c) * quantile)], cap);
    0 for a class with no pixel. values: one 1-D tensor per class -> (C,) float32."""
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"quantile = {quantile!r}; expected a fraction in [0, 1)")
    thresholds = torch.zeros(len(values), dtype=torch.float32)
    for c, v in enumerate(values):
        n = v.numel()
        if n == 0:
            continue
        index = min(int(round(n * quantile)), n - 1)   # numpy's round: half to even, as the release
        thresholds[c] = torch.sort(v.float().cpu()).values[index]
    return thresholds.clamp(max=cap)


def select_labels(label: Tensor, confidence: Tensor, thresholds: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``label`` where ``confidence >= thresholds[label]``, else ``ignore_index``; same shapes."""
    keep = confidence >= thresholds.to(confidence.device)[label]
    return torch.where(keep, label, torch.full_like(label, ignore_index))
