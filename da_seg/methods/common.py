"""Helpers that several methods share: option checks, output levels, softmax at a size, loss
ramps, frozen and unwrapped networks, adversarial domain labels and losses and the discriminators
that a component owns. Method-specific math stays in each method's own file."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from da_seg.config import ConfigError
from da_seg.methods.base import ComponentSetup, OptionError
from da_seg.models.norm import DGNorm
from da_seg.models.segmenter import SegmenterOutput, upsample_logits

# ---------------------------------------------------------------------------------------------
# Option checks, called from the options dataclasses' __post_init__

def check_nonnegative(options, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(options, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise OptionError(name, f"= {value!r}; expected a number >= 0")


def check_positive_int(options, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(options, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise OptionError(name, f"= {value!r}; expected a positive integer")


def check_choice(options, name: str, valid: Sequence[str]) -> None:
    value = getattr(options, name)
    if value not in valid:
        raise OptionError(name, f"= {value!r}; valid: {', '.join(valid)}")


def check_pair(options, name: str, what: str = "[low, high]") -> None:
    """A two-entry option (betas, sigma ranges), stored as a tuple of floats."""
    value = getattr(options, name)
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise OptionError(name, f"= {value!r}; expected {what}")
    object.__setattr__(options, name, tuple(float(v) for v in value))


# ---------------------------------------------------------------------------------------------
# Outputs

def output_levels(out: SegmenterOutput, multi_level: bool, where: str) -> list[tuple[str, Tensor]]:
    """[("main", logits)] plus ("aux", aux_logits) when ``multi_level``; each (N, C, h, w)."""
    levels = [("main", out.logits)]
    if multi_level:
        if out.aux_logits is None:
            raise ValueError(
                f"{where}.multi_level = true, but the model returns no aux_logits; use a multi-level "
                "model (deeplabv2_* or deeplab_small with model.options.multi_level = true) or set "
                f"{where}.multi_level = false")
        levels.append(("aux", out.aux_logits))
    return levels


def supervised_views(out: SegmenterOutput, labels: Tensor, weights: Tensor | None = None
                     ) -> list[tuple[str, Tensor, Tensor, Tensor | None, float]]:
    """What a pixel loss on ``out`` is made of: (name suffix, logits, labels, weights, share).

    [("", logits, labels, weights, 1.0)] for a plain output; with a detail crop (HRDA) the full
    output gets ``1 - w`` and the crop's own logits ``w`` on the labels (and pixel weights) cut
    to its box: ``("_detail", ...)``. labels (N, H, W), weights (N, H, W) or None.
    """
    if out.detail is None:
        return [("", out.logits, labels, weights, 1.0)]
    top, bottom, left, right = out.detail.box
    share = out.detail.weight
    cut = (lambda t: None if t is None else t[:, top:bottom, left:right])  # noqa: E731
    return [("", out.logits, labels, weights, 1.0 - share),
            ("_detail", out.detail.logits, cut(labels), cut(weights), share)]


def level_suffix(level: str) -> str:
    """Loss-name suffix of an output level: "" for main, "_aux" for aux (as ``ce`` / ``ce_aux``)."""
    return "" if level == "main" else f"_{level}"


def softmax_at(logits: Tensor, size, align_corners: bool = False, ctx=None) -> Tensor:
    """(N, C, h, w) logits -> (N, C, *size) float32 softmax of the bilinearly upsampled logits;
    with ``ctx`` (a StepContext) the upsampled logits are the step's shared ones."""
    upsampled = ctx.upsampled(logits, size, align_corners) if ctx is not None else \
        upsample_logits(logits.float(), tuple(size), align_corners)
    return F.softmax(upsampled, dim=1)


# ---------------------------------------------------------------------------------------------
# Schedules

def warmup_ramp(iteration: int, warmup_iters: int) -> float:
    """Linear ramp of a loss weight: 0 at iteration 0 -> 1 at ``warmup_iters``; 1 when it is 0."""
    if warmup_iters <= 0:
        return 1.0
    return min(1.0, iteration / warmup_iters)


def poly_schedule(total: int, power: float):
    """LR multiplier of the official codes' ``lr_poly``: (1 - it / total) ** power, floored at 0."""
    def factor(iteration: int) -> float:
        return max(0.0, 1.0 - iteration / total) ** power
    return factor


# ---------------------------------------------------------------------------------------------
# Networks

@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Parameters of ``module`` stop requiring grad inside the block (restored after), so a loss
    computed through it sends gradient to its *inputs* only."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def bare(net: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return net.module if isinstance(net, DistributedDataParallel) else net


def frozen_copy(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with no parameter requiring grad (a fixed reference network)."""
    model.requires_grad_(False)
    return model.eval()


def _batchnorm_eval(module: nn.Module, inputs) -> None:
    module.training = False


def freeze_batchnorm_statistics(model: nn.Module) -> list:
    """Every BatchNorm of ``model`` normalizes with its running statistics and stops updating
    them, whatever ``model.train()`` says (its scale and shift still train): a forward pre-hook
    puts the layer in eval mode before each call, so it holds however often the trainer switches
    the model to training mode, and whichever component runs the model first in a step.
    Returns the hook handles (``handle.remove()`` undoes it)."""
    return [m.register_forward_pre_hook(_batchnorm_eval) for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# ---------------------------------------------------------------------------------------------
# Adversarial alignment (output space: adversarial.py; features: feature_adversarial.py)

SOURCE_LABEL = 0.0   # the domain labels of the official codes (AdaptSegNet, ADVENT; FCAN's D_i is P(target))
TARGET_LABEL = 1.0
ADVERSARIAL_LOSSES = ("bce", "lsgan")


def adversarial_loss(scores: Tensor, label: float, kind: str) -> Tensor:
    """Discriminator scores (N, 1, h, w), raw logits, against a constant domain label.

    ``bce``: binary cross-entropy with logits; ``lsgan``: mean squared error of the raw scores
    (AdaptSegNet's LS-GAN option).
    """
    scores = scores.float()
    target = torch.full_like(scores, label)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(scores, target)
    if kind == "lsgan":
        return F.mse_loss(scores, target)
    raise ValueError(f"adversarial loss {kind!r}; valid: {ADVERSARIAL_LOSSES}")


def discriminator_accuracy(scores_source: Tensor, scores_target: Tensor, kind: str = "bce") -> Tensor:
    """Fraction of discriminator cells on the right side of the decision threshold (0 for logits,
    0.5 for LS-GAN scores): 0.5 = chance, near 1 = D wins and the generator term saturates."""
    threshold = 0.0 if kind == "bce" else 0.5
    right = torch.cat([(scores_source.float() < threshold).flatten(),
                       (scores_target.float() >= threshold).flatten()])
    return right.float().mean()


def add_discriminator(component, key: str, discriminator: nn.Module, lr: float, betas) -> None:
    """Register a discriminator with the Adam optimizer and poly schedule of the official codes
    (decayed like the segmenter), so that the trainer moves, wraps, checkpoints and resumes it."""
    setup: ComponentSetup = component.setup
    discriminator = discriminator.to(setup.device)
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=tuple(betas))
    component.networks[key] = discriminator
    component.optimizers[key] = optimizer
    component.schedulers[key] = torch.optim.lr_scheduler.LambdaLR(
        optimizer, poly_schedule(setup.decay_iters, setup.poly_power))


# ---------------------------------------------------------------------------------------------
# Domain generalization blocks (SAN-SAW, ISW)

COV_EPS = 1e-5  # added to the covariance diagonal (RobustNet / SAN-SAW)


def instance_covariance(x: Tensor) -> Tensor:
    """(N, C, h, w) -> (N, C, C) float32: XX^T / (hw - 1) + 1e-5 I, per image, not centred.

    Not centred on purpose: both releases apply it to instance-normalized (zero-mean) maps,
    where it is the covariance; on SAN's ReLU output it also penalizes co-activation.
    """
    n, c, h, w = x.shape
    flat = x.float().reshape(n, c, h * w)
    eye = torch.eye(c, device=x.device, dtype=flat.dtype)
    return flat @ flat.transpose(1, 2) / max(h * w - 1, 1) + COV_EPS * eye


def strict_upper(c: int, device=None) -> Tensor:
    """(C, C) float mask of the entries above the diagonal."""
    return torch.ones(c, c, device=device).triu(diagonal=1)


def require_dg_norm(setup: ComponentSetup, kind: str, component: str) -> DGNorm:
    """The segmenter's DG blocks of ``kind``, or a ConfigError that says which recipe key to set."""
    dg_norm = getattr(setup.model, "dg_norm", None)
    if dg_norm is None or dg_norm.kind != kind:
        found = "no dg_norm blocks" if dg_norm is None else f"dg_norm.kind = {dg_norm.kind!r}"
        raise ConfigError(
            f"components.{component} needs the model's {kind} blocks; set "
            f"model.options.dg_norm = {{ kind = \"{kind}\", stages = [...] }} (deeplab_small, deeplabv2_*, "
            f"deeplabv3plus_*); model {setup.model_name!r} has {found}")
    return dg_norm
