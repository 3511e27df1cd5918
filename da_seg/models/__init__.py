"""Model registry: every segmenter a recipe can name, in one explicit dict."""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from da_seg.models.deeplab import deeplabv2_r50, deeplabv2_r101, deeplabv3plus_r50, deeplabv3plus_r101
from da_seg.models.dual_path import build_dual_path
from da_seg.models.hrda import build_hrda
from da_seg.models.segformer import SEGFORMER_BUILDERS
from da_seg.models.segmenter import Segmenter
from da_seg.models.small import build_deeplab_small
from da_seg.models.vit import VIT_BUILDERS

MODELS: dict[str, Callable[..., Segmenter]] = {
    "deeplab_small": build_deeplab_small,
    "deeplabv2_r50": deeplabv2_r50,
    "deeplabv2_r101": deeplabv2_r101,
    "deeplabv3plus_r50": deeplabv3plus_r50,
    "deeplabv3plus_r101": deeplabv3plus_r101,
    **SEGFORMER_BUILDERS,
    **VIT_BUILDERS,
    "dual_path": lambda num_classes, **options: build_dual_path(num_classes, build_model, **options),  # DPL-Dual
    "hrda": build_hrda,   # a wrapper: [model.options] base names the network it wraps
}


def build_model(name: str, num_classes: int, **options) -> Segmenter:
    """Build ``MODELS[name](num_classes, **options)``; unknown names and options fail clearly."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    builder = MODELS[name]
    accepted = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = sorted(k for k in options if k not in accepted)
    if unknown and not takes_any:
        valid = sorted(k for k in accepted if k != "num_classes")
        raise KeyError(f"model {name!r} has no option(s) {unknown}; valid options: {valid}")
    return builder(num_classes=num_classes, **options)


def describe_models(num_classes: int = 19) -> list[tuple[str, float, str]]:
    """(name, parameters in millions at ``num_classes``, first docstring line) for each model.

    Models are built on the meta device (no memory, no initialization cost), so listing even
    ResNet-101 and MiT-B5 takes well under a second.
    """
    rows = []
    for name, builder in MODELS.items():
        try:
            with torch.device("meta"):
                model = builder(num_classes=num_classes)
        except (NotImplementedError, RuntimeError):  # a builder that cannot run on meta tensors
            model = builder(num_classes=num_classes)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        doc = (inspect.getdoc(builder) or inspect.getdoc(type(model)) or "").splitlines()
        rows.append((name, params, doc[0] if doc else ""))
    return rows
