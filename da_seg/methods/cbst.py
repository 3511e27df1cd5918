"""Class-balanced self-training (CBST, Zou et al., ECCV 2018; CRST code): offline pseudo-labels.

Everything that decides a pseudo-label is here: prediction (multi-scale, flip), per-class
confidence samples, class-balanced thresholds, selection, and :func:`label_target_set`, the two
passes over a target set that write them. A round of the ``self_train`` stage
(``da_seg/stages/self_train.py``) calls it, then trains on source + the pseudo-labelled domain
(``da_seg/data/pseudo_labels.py``) with ``pseudo_ce``.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from da_seg.methods.base import Component, StepContext
from da_seg.methods.source import CrossEntropyOptions, segmentation_ce

IGNORE_INDEX = 255
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
# The training component

class PseudoLabelCE(Component):
    """Cross-entropy on a pseudo-labelled target domain written by the ``self_train`` stage.

    It reads target *label files*, so the trainer refuses a target domain that has no pseudo-label
    marker (``uses_target_labels = "pseudo"``): on a real labelled target it would be the oracle.
    The round's starting weights are the recipe's ``model.init_checkpoint``.
    """

    name = "pseudo_ce"
    Options = CrossEntropyOptions
    uses_target = True
    uses_target_labels = "pseudo"
    loss_domains = ("target",)

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        return segmentation_ce(ctx.target_out, ctx.target.labels, self.options, self.setup.ignore_index, ctx)


# ---------------------------------------------------------------------------------------------
# A round's pseudo-labels for a whole target set

@dataclass(frozen=True)
class LabellingOptions:
    """How a round predicts (the ``[self_train]`` table of the stage)."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    confidence_cap: int = DEFAULT_CAP
    num_workers: int = 0
    seed: int = 0


def label_target_set(model: nn.Module, dataset, labels_dir: Path, portion: float, options: LabellingOptions, *,
                     thresholds_file: Path, device: torch.device, autocast: Callable[[], Any] | None = None,
                     progress: bool = True, desc: str = "pseudo-labels") -> dict[str, Any]:
    """Passes 1 and 2 over ``dataset`` (a SegmentationDataset without labels): class-balanced
    thresholds from every image's confidences, then the selected labels as 8-bit PNGs
    ``labels_dir/<sample name>.png`` at each image's native size.

    Two passes instead of storing C x H x W probability maps for the whole set (160 MB per
    Cityscapes image). Resumable: ``thresholds_file`` is reused when it exists, PNGs already
    written are counted, not predicted again. Returns thresholds and per-class labelled shares.
    """
    from da_seg.data.augment import to_float_images
    from da_seg.data.loaders import OwnErrors
    from da_seg.data.pseudo_labels import write_label_png
    from da_seg.utils.files import write_json_atomic
    from da_seg.utils.progress import Progress

    num_classes = model.num_classes

    def predictions(indices: Sequence[int], what: str):
        loader = OwnErrors(torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, list(indices)),
                                                       batch_size=1, shuffle=False, num_workers=options.num_workers))
        bar = Progress(len(indices), f"{desc}: {what}", enabled=progress, every_s=30)
        for done, item in enumerate(loader, 1):
            sample = dataset.samples[int(item["index"][0])]
            image = to_float_images(item["image"].to(device))
            probs = predict_probabilities(model, image, _native_size(sample.image), options.scales,
                                          options.flip, autocast)[0]
            bar.update(done)
            yield sample, probs
        bar.close()

    if thresholds_file.exists():
        thresholds = torch.tensor(json.loads(thresholds_file.read_text())["thresholds"], dtype=torch.float32)
    else:
        sample_set = ClassConfidenceSample(num_classes, cap=options.confidence_cap, seed=options.seed, device=device)
        for _, probs in predictions(range(len(dataset)), "confidences"):
            sample_set.add(probs)
        thresholds = sample_set.thresholds(portion)
        write_json_atomic({"portion": portion, "thresholds": thresholds.tolist(),
                           "predicted_pixels": sample_set.counts.tolist(), "exact": sample_set.exact,
                           "confidence_cap": options.confidence_cap, "scales": list(options.scales),
                           "flip": options.flip}, thresholds_file)

    counts = np.zeros(num_classes + 1, dtype=np.int64)  # last slot: ignored pixels
    todo = []
    for i, sample in enumerate(dataset.samples):
        path = labels_dir / (sample.name + ".png")
        if path.exists():  # written by a previous, interrupted pass 2
            with Image.open(path) as image:
                counts += _label_counts(np.asarray(image), num_classes)
        else:
            todo.append(i)
    for sample, probs in predictions(todo, "labels"):
        label = select_pseudo_labels(probs, thresholds).to(torch.uint8).cpu().numpy()
        counts += _label_counts(label, num_classes)
        write_label_png(label, labels_dir / (sample.name + ".png"))
    total = max(int(counts.sum()), 1)
    return {"thresholds": thresholds.tolist(), "labelled_share": float(counts[:num_classes].sum() / total),
            "class_share": (counts[:num_classes] / total).tolist(), "images": len(dataset)}


def _native_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        width, height = image.size
    return height, width


def _label_counts(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels per class, ignore (and anything else) in the last slot."""
    values = np.where(label < num_classes, label, num_classes).ravel()
    return np.bincount(values, minlength=num_classes + 1)
