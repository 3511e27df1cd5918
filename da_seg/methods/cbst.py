"""Class-balanced self-training (CBST, Zou et al., ECCV 2018; CRST code): offline pseudo-labels.

A round (driven by ``da_seg.selftrain.run_rounds``) predicts every target train image, computes one
confidence threshold per class over the whole set, writes the pseudo-labels as a new *labelled*
domain (8-bit PNGs + a descriptor whose images stay in the original target root), and trains on
source + that domain with ``pseudo_ce``.

Class-balanced thresholds (REFERENCE.md, CRST ``kc_parameters``): per class c, sort the max-prob of
the pixels predicted c in descending order; ``k_c`` is the value at index ``floor(n_c * p) - 1``,
and 1 when that index is negative (class absent or too rare). A pixel's label is
``argmax_c p_c / k_c`` where ``max_c p_c / k_c >= 1``, else ignore (255).

Memory: a whole target set has billions of pixels (Cityscapes: 6.2e9), so confidences are kept per
class in a bounded sample (:class:`ClassConfidenceSample`): every value while a class has at most
``cap`` pixels, which makes the thresholds *exactly* the direct computation (tested), and beyond
that a uniform random sample of ``cap`` values (bottom-k sampling on random keys), whose quantile
differs from the exact one by ~sqrt(p (1 - p) / cap) in rank (3.5e-4 at the default cap of 2e6).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from da_seg.config import ConfigError
from da_seg.methods.base import Component, ComponentSetup, StepContext
from da_seg.methods.source import segmentation_ce

IGNORE_INDEX = 255
MARKER = "pseudo_labels.json"   # written beside the pseudo-label PNGs; pseudo_ce refuses a target without it
DEFAULT_CAP = 2_000_000


# ---------------------------------------------------------------------------------------------
# Thresholds

def thresholds_from_values(values: Sequence[Tensor], portion: float) -> Tensor:
    """Per class, the ``floor(n_c * portion)``-th largest of ``values[c]`` (1-based), 1 when that
    count is 0. values: one 1-D tensor of confidences per class -> (C,) float32."""
    thresholds = torch.ones(len(values), dtype=torch.float32)
    for c, v in enumerate(values):
        n = v.numel()
        selected = int(math.floor(n * portion))
        if selected > 0:
            # the selected-th largest is the (n - selected + 1)-th smallest
            thresholds[c] = torch.kthvalue(v.float().cpu(), n - selected + 1).values
    return thresholds


class ClassConfidenceSample:
    """Max-probabilities of the pixels predicted as each class, gathered image by image.

    Exact (all values kept) while a class has at most ``cap`` pixels; beyond, a uniform sample of
    ``cap`` of them without replacement: each value gets a random float64 key and the ``cap``
    smallest keys are kept (pruned whenever a class holds more than ``2 * cap``).
    Memory: at most ``num_classes * 2 * cap * 12`` bytes on ``device``.
    """

    def __init__(self, num_classes: int, cap: int = DEFAULT_CAP, seed: int = 0, device: str | torch.device = "cpu"):
        if cap < 1:
            raise ValueError(f"cap must be >= 1, got {cap}")
        self.num_classes, self.cap = num_classes, cap
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.values: list[Tensor] = [torch.empty(0, device=self.device) for _ in range(num_classes)]
        self.keys: list[Tensor] = [torch.empty(0, dtype=torch.float64, device=self.device) for _ in range(num_classes)]
        self.bound = [math.inf] * num_classes   # keys at or above this can no longer be sampled
        self.counts = torch.zeros(num_classes, dtype=torch.int64)  # pixels predicted per class, all seen

    def add(self, probs: Tensor) -> None:
        """probs: (C, H, W) or (N, C, H, W) softmax probabilities."""
        if probs.dim() == 3:
            probs = probs.unsqueeze(0)
        confidence, predicted = probs.to(self.device).max(1)
        confidence, predicted = confidence.reshape(-1).float(), predicted.reshape(-1)
        counts = torch.bincount(predicted, minlength=self.num_classes).cpu()
        self.counts += counts
        order = torch.argsort(predicted, stable=True)
        for c, part in enumerate(torch.split(confidence[order], counts.tolist())):
            if part.numel() == 0:
                continue
            keys = torch.rand(part.numel(), dtype=torch.float64, device=self.device, generator=self.generator)
            if self.bound[c] < math.inf:
                keep = keys < self.bound[c]
                part, keys = part[keep], keys[keep]
            self.values[c] = torch.cat([self.values[c], part])
            self.keys[c] = torch.cat([self.keys[c], keys])
            if self.values[c].numel() > 2 * self.cap:
                self._prune(c)

    def _prune(self, c: int) -> None:
        keys, index = torch.topk(self.keys[c], self.cap, largest=False)
        self.values[c], self.keys[c] = self.values[c][index], keys
        self.bound[c] = float(keys.max())

    def sample(self, c: int) -> Tensor:
        if self.values[c].numel() > self.cap:
            self._prune(c)
        return self.values[c]

    @property
    def exact(self) -> bool:
        """True when no class had more than ``cap`` pixels: the thresholds are the direct computation."""
        return bool((self.counts <= self.cap).all())

    def thresholds(self, portion: float) -> Tensor:
        """(C,) class-balanced thresholds k_c for the selected ``portion`` (0 < p <= 1)."""
        if not 0.0 < portion <= 1.0:
            raise ValueError(f"portion must be in (0, 1], got {portion}")
        return thresholds_from_values([self.sample(c) for c in range(self.num_classes)], portion)


def select_pseudo_labels(probs: Tensor, thresholds: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """probs (C, H, W) or (N, C, H, W), thresholds (C,) -> labels (H, W) / (N, H, W) int64:
    ``argmax_c p_c / k_c`` where its maximum is >= 1, else ``ignore_index``."""
    shape = (-1, 1, 1) if probs.dim() == 3 else (1, -1, 1, 1)
    scaled = probs.float() / thresholds.to(probs.device, torch.float32).view(shape)
    best, label = scaled.max(-3)
    return torch.where(best >= 1.0, label, torch.full_like(label, ignore_index))


# ---------------------------------------------------------------------------------------------
# Prediction

@torch.no_grad()
def predict_probabilities(model: nn.Module, image: Tensor, out_size: tuple[int, int],
                          scales: Sequence[float] = (1.0,), flip: bool = False,
                          autocast: Callable[[], Any] | None = None) -> Tensor:
    """Softmax averaged over input scales (and horizontal flips), at ``out_size``.

    image: (N, 3, h, w) float in [0, 1] -> (N, C, *out_size) float32.
    """
    from contextlib import nullcontext

    autocast = autocast or nullcontext
    height, width = image.shape[-2:]
    total, count = None, 0
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = image if size == (height, width) else F.interpolate(image, size=size, mode="bilinear",
                                                                     align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            x = scaled.flip(-1) if flipped else scaled
            with autocast():
                logits = model(x).logits
            logits = F.interpolate(logits.float(), size=out_size, mode="bilinear", align_corners=False)
            probs = torch.softmax(logits, dim=1)
            probs = probs.flip(-1) if flipped else probs
            total = probs if total is None else total + probs
            count += 1
    return total / count


# ---------------------------------------------------------------------------------------------
# Writing a pseudo-labelled domain

def write_label_png(label: np.ndarray, path: Path) -> None:
    """(H, W) uint8 train ids -> 8-bit grayscale PNG, written to a hidden temp file then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)


def _toml_value(value) -> str:
    """Strings, numbers and lists of them as TOML (JSON's escapes and arrays are valid TOML)."""
    return json.dumps(value)


def pseudo_domain_descriptor(name: str, target, split: str, labels_dir: Path, description: str) -> str:
    """TOML of a domain whose ``train`` split holds the images of ``target``'s ``split`` (same root,
    folder, suffix, list and exclusions) and the pseudo-labels in ``labels_dir`` (absolute path)."""
    spec = target.split_spec(split)
    lines = [f"name = {_toml_value(name)}", f"description = {_toml_value(description)}",
             f"root = {_toml_value(str(target.root))}",
             f"layout = {_toml_value('pseudo-labels of ' + target.name + ' ' + split + ': ' + (target.layout or ''))}",
             "", "[classes]", f"names = {_toml_value(list(target.class_names))}",
             f"colors = {_toml_value([list(c) for c in target.colors])}"]
    if target.class_subsets:
        lines += ["", "[classes.subsets]"]
        lines += [f"{_toml_value(k)} = {_toml_value(list(v))}" for k, v in target.class_subsets.items()]
    lines += ["", "[label]", 'encoding = "index"', 'unknown = "error"',
              "", "[splits.train]", f"images = {_toml_value(spec.images)}",
              f"image_suffix = {_toml_value(spec.image_suffix)}", f"labels = {_toml_value(str(labels_dir))}",
              'label_suffix = ".png"']
    if spec.list:
        lines.append(f"list = {_toml_value(spec.list)}")
    if spec.exclude:
        lines.append(f"exclude = {_toml_value(list(spec.exclude))}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The training component

@dataclass(frozen=True)
class PseudoCEOptions:
    weight: float = 1.0
    aux_weight: float = 0.1
    label_smoothing: float = 0.0
    # Weights the segmenter starts from (a da_seg last.pt / best.pt): the previous round's model.
    # Set by `da-seg self-train`; loaded when the component is built, before any --resume restores
    # the run's own checkpoint. List pseudo_ce before components that copy the segmenter (mean_teacher).
    init_checkpoint: str = ""
    # The rounds schedule, read by `da-seg self-train` (the component itself does not use it).
    rounds: int = 3
    portion_start: float = 0.2
    portion_step: float = 0.05
    portion_max: float = 0.5
    scales: tuple[float, ...] = (1.0,)     # prediction input scales (x data.target_size or the file's size)
    flip: bool = False                     # average with the flipped prediction
    confidence_cap: int = DEFAULT_CAP      # per-class confidences kept for the thresholds
    warmup_recipe: str = ""                # round 0 model: this recipe's run (same seed), relative to the recipe file

    def __post_init__(self):
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        where = "components.pseudo_ce."
        if not self.scales or min(self.scales) <= 0:
            raise ConfigError(f"{where}scales = {list(self.scales)!r}; expected positive factors, e.g. [1.0]")
        for key in ("portion_start", "portion_max"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise ConfigError(f"{where}{key} = {getattr(self, key)!r}; expected a portion in (0, 1]")
        if self.rounds < 1 or self.confidence_cap < 1:
            raise ConfigError(f"{where}rounds and confidence_cap must be >= 1")


class PseudoLabelCE(Component):
    """Cross-entropy on a pseudo-labelled target domain written by ``da-seg self-train``.

    It reads target *label files*, so it refuses a target domain that has no pseudo-label marker
    (``pseudo_labels.json`` in the labels folder): on a real labelled target it would be the oracle.
    """

    name = "pseudo_ce"
    Options = PseudoCEOptions
    uses_target = True
    uses_target_labels = True

    def __init__(self, options: PseudoCEOptions, setup: ComponentSetup):
        super().__init__(options, setup)
        check_pseudo_labelled(setup.recipe.data.target, setup.recipe.data.target_split)
        if options.init_checkpoint:
            load_segmenter_weights(setup.model, options.init_checkpoint)

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        return segmentation_ce(ctx.target_out, ctx.target.labels, self.options, self.setup.ignore_index)


def check_pseudo_labelled(target: str, split: str) -> Path:
    """The marker file of a pseudo-labelled domain's ``split``; a clear error when there is none."""
    from da_seg.data.domains import load_domain

    if not target:
        raise ConfigError("components.pseudo_ce needs data.target: a pseudo-labelled domain written by "
                          "`da-seg self-train`")
    domain = load_domain(target)
    spec = domain.split_spec(split)
    marker = domain.root / (spec.labels or "") / MARKER
    if spec.labels is None or not marker.is_file():
        raise ConfigError(
            f"components.pseudo_ce trains on the label files of data.target = {target!r}, but its split "
            f"{split!r} is not a pseudo-labelled domain (no {marker}); on real target labels this would "
            "be the oracle. Run this recipe with `da-seg self-train RECIPE`, which writes pseudo-labels "
            "each round and points data.target at them.")
    return marker


def load_segmenter_weights(model: nn.Module, checkpoint: str | Path) -> None:
    """Load the segmenter weights of a da_seg checkpoint (``last.pt`` / ``best.pt``) into ``model``."""
    from da_seg.engine.checkpoint import load_checkpoint

    state = load_checkpoint(Path(checkpoint))
    if "model" not in state:
        raise ValueError(f"{checkpoint}: not a da_seg checkpoint (no 'model' entry)")
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{checkpoint} does not fit the recipe's model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    # The input normalization is not a tensor: it travels in the checkpoint's model_meta.
    norm = state.get("model_meta", {}).get("input_norm")
    if norm is not None:
        from da_seg.models.segmenter import InputNorm

        model.input_norm = InputNorm(tuple(norm["mean"]), tuple(norm["std"]), norm["bgr"], norm["scale"])


def write_marker(labels_dir: Path, info: dict[str, Any]) -> None:
    labels_dir.mkdir(parents=True, exist_ok=True)
    (labels_dir / MARKER).write_text(json.dumps(info, indent=1))
