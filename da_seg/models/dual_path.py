"""DPL-Dual inference (Cheng et al., ICCV 2021): both paths of a dual-path model as one segmenter.

    P(x) = alpha * softmax(M_T(x)) + (1 - alpha) * softmax(M_S(G_ts(x)))        alpha = 0.55

x is a target-style image, G_ts the dual-path translator's target -> source generator, M_S the
segmenter of the source-style path and M_T that of the target-style path (royee182/DPL
``DPL_master/evaluation_DPL.py``: ``alpha=0.55``; the release reads G_ts(x) from images it wrote
beforehand, here the translation runs at test time). Each path's logits are upsampled to the
input size before the softmax (da_seg's convention; the release fuses at the output stride and
upsamples the fused probabilities). The segmenter returns ``log P`` as its logits, at input
resolution: ``softmax(log P) = P`` exactly, so ``da-seg eval`` and ``predict`` score the
fused probabilities through the ordinary Segmenter interface, and its checkpoint rebuilds it from
``model_meta`` like any other model (name ``dual_path``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from da_seg.models.cyclegan import ResnetGenerator, translate
from da_seg.models.segmenter import InputNorm, Segmenter, SegmenterOutput, upsample_logits

IDENTITY_NORM = InputNorm(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
FUSION_EPS = 1e-12  # log of a probability that underflowed to 0 stays finite


def fuse_paths(target_probs: Tensor, source_probs: Tensor, alpha: float) -> Tensor:
    """alpha * P_T + (1 - alpha) * P_S; both (N, C, H, W) probabilities -> (N, C, H, W)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha = {alpha!r}; expected a weight in [0, 1]")
    return alpha * target_probs + (1.0 - alpha) * source_probs


class DualPathSegmenter(Segmenter):
    """Translator G_ts + M_S + M_T; ``forward(x)`` returns the log of the fused probabilities.

    images (N, 3, H, W) RGB in [0, 1] -> logits (N, C, H, W) = log(fuse_paths(P_T, P_S, alpha)).
    ``translator``: a ResnetGenerator (target -> source style, images in [-1, 1]).
    """

    output_stride = 1

    def __init__(self, translator: nn.Module, source_model: Segmenter, target_model: Segmenter, alpha: float = 0.55):
        super().__init__()
        if source_model.num_classes != target_model.num_classes:
            raise ValueError(f"the source path predicts {source_model.num_classes} classes, the target path "
                             f"{target_model.num_classes}")
        fuse_paths(torch.zeros(1), torch.zeros(1), alpha)  # checks alpha
        self.translator, self.source_model, self.target_model = translator, source_model, target_model
        self.alpha = float(alpha)
        self.num_classes = target_model.num_classes
        self.input_norm = IDENTITY_NORM

    def path_probabilities(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(P_T(x), P_S(G_ts(x))), each (N, C, H, W) float32 at the input size."""
        size = images.shape[-2:]
        in_source_style = translate(self.translator, images).clamp(0, 1)          # (N, 3, H, W)
        out_t, out_s = self.target_model(images), self.source_model(in_source_style)
        p_t = upsample_logits(out_t.logits.float(), size, out_t.align_corners).softmax(1)
        p_s = upsample_logits(out_s.logits.float(), size, out_s.align_corners).softmax(1)
        return p_t, p_s

    def forward_normalized(self, x: Tensor) -> SegmenterOutput:
        p_t, p_s = self.path_probabilities(x)  # the identity norm: x is the [0, 1] image
        fused = fuse_paths(p_t, p_s, self.alpha)
        return SegmenterOutput(logits=fused.clamp_min(FUSION_EPS).log())


def build_dual_path(num_classes: int, build: Callable[..., Segmenter], *, alpha: float = 0.55,
                    translator: dict[str, Any] | None = None, source_model: dict[str, Any] | None = None,
                    target_model: dict[str, Any] | None = None) -> DualPathSegmenter:
    """A DualPathSegmenter with untrained networks, shaped by ``model_meta``-style entries:
    ``translator = {ngf, n_blocks}``; each path ``{name, options, input_norm, align_corners}``
    (as :func:`da_seg.engine.checkpoint.model_meta` writes them). ``build``: the model registry's
    ``build_model`` (passed in: this module is below the registry)."""
    translator = dict(translator or {"ngf": 64, "n_blocks": 9})
    generator = ResnetGenerator(int(translator.get("ngf", 64)), int(translator.get("n_blocks", 9)))
    paths = []
    for entry in (source_model, target_model):
        entry = dict(entry or {"name": "deeplab_small", "options": {}})
        model = build(entry["name"], num_classes, **dict(entry.get("options") or {}))
        norm = entry.get("input_norm")
        if norm is not None:
            model.input_norm = InputNorm(tuple(norm["mean"]), tuple(norm["std"]), norm["bgr"], norm["scale"])
        model.align_corners = bool(entry.get("align_corners", False))
        paths.append(model)
    return DualPathSegmenter(generator, paths[0], paths[1], alpha)
