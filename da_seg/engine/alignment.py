"""How well are source and target aligned? A picture and a number, for evaluation time.

Per-pixel vectors (softmax outputs, or the encoder's last feature map) are sampled on a regular
grid from a few source and a few target images, embedded in 2-D (PCA or t-SNE) and drawn as a
scatter: source orange, target blue. The number is a *domain separability* score: the
cross-validated accuracy of a logistic-regression domain classifier on the same vectors, in
percent; 50 means the two domains are indistinguishable at that level, 100 fully separable.
Output-space methods (AdaptSegNet, AdvEnt) should lower it for ``kind="output"``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from da_seg.data.augment import to_float_images
from da_seg.utils.visualize import embedding_scatter

SOURCE_COLOR = (230, 120, 20)   # orange
TARGET_COLOR = (30, 100, 220)   # blue
KINDS = ("output", "features")
METHODS = ("pca", "tsne")


class Alignment(NamedTuple):
    """``image``: uint8 (3, size, size) scatter; ``separability``: domain-classifier accuracy in
    percent (50 = aligned, 100 = separable). Unpacks as ``image, separability = ...``."""

    image: Tensor
    separability: float


@torch.no_grad()
def pixel_vectors(model: nn.Module, images: Tensor, kind: str, budget: int, batch_size: int = 4) -> np.ndarray:
    """(N, 3, H, W) images (uint8, or float in [0, 1]) -> (M, D) float32 vectors, M <= budget.

    ``output``: softmax of the logits (D = classes) at the logits resolution; ``features``:
    ``features["backbone"]`` (D = encoder channels). Pixels are taken on a regular grid whose
    step is chosen so that about ``budget`` pixels remain over all images.
    """
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = to_float_images(images[start:start + batch_size].to(device))
        out = model(batch)
        if kind == "output":
            maps = F.softmax(out.logits.float(), dim=1)
        else:
            if "backbone" not in out.features:
                raise KeyError(f"kind='features' needs features['backbone'] from the model; it returns "
                               f"{sorted(out.features)}")
            maps = out.features["backbone"].float()
        chunks.append(maps.cpu())
    maps = torch.cat(chunks)                                            # (N, D, h, w)
    n, d, h, w = maps.shape
    step = max(1, math.ceil(math.sqrt(n * h * w / max(budget, 1))))
    grid = maps[:, :, step // 2::step, step // 2::step]                 # (N, D, h', w')
    vectors = grid.permute(0, 2, 3, 1).reshape(-1, d).numpy()
    return vectors[:budget] if len(vectors) > budget else vectors


def domain_separability(source: np.ndarray, target: np.ndarray, seed: int = 0, folds: int = 5) -> float:
    """Cross-validated accuracy (percent) of a logistic-regression source/target classifier.

    source, target: (M_s, D), (M_t, D). The larger set is subsampled so both have the same size
    (chance = 50). Features are standardized inside each fold.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    m = min(len(source), len(target))
    if m < folds:
        raise ValueError(f"domain_separability needs at least {folds} vectors per domain, got "
                         f"{len(source)} source and {len(target)} target")
    source = source[rng.choice(len(source), m, replace=False)]
    target = target[rng.choice(len(target), m, replace=False)]
    x = np.concatenate([source, target])
    y = np.concatenate([np.zeros(m, dtype=int), np.ones(m, dtype=int)])
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(100.0 * cross_val_score(classifier, x, y, cv=splits).mean())


def embed_2d(vectors: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """(M, D) -> (M, 2) with PCA, or t-SNE (after PCA to 50 dimensions when D is larger)."""
    from sklearn.decomposition import PCA

    if method == "pca":
        if vectors.shape[1] < 2:
            return np.pad(vectors, ((0, 0), (0, 2 - vectors.shape[1])))
        return PCA(n_components=2, random_state=seed).fit_transform(vectors)
    from sklearn.manifold import TSNE

    if vectors.shape[1] > 50:
        vectors = PCA(n_components=50, random_state=seed).fit_transform(vectors)
    perplexity = float(min(30.0, max(2.0, (len(vectors) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(vectors)


def alignment_image(model: nn.Module, source_images: Tensor, target_images: Tensor, *, kind: str = "output",
                    method: str = "pca", max_points: int = 2000, seed: int = 0, size: int = 256) -> Alignment:
    """Scatter of source vs target pixel vectors in 2-D, and their domain separability.

    Args:
        model: a ``Segmenter`` (bare, not DDP-wrapped); run in eval mode under ``no_grad`` and put
            back in the mode it was in.
        source_images, target_images: (N, 3, H, W) uint8 or float in [0, 1], on any device; a
            few images each (they are forwarded in batches of 4).
        kind: ``"output"`` (per-pixel softmax) or ``"features"`` (``features["backbone"]``).
        method: ``"pca"`` (fast, linear) or ``"tsne"`` (seconds for 2000 points).
        max_points: total vectors, half per domain, on a regular pixel grid.
        seed: for subsampling, the classifier folds, PCA/t-SNE.
        size: side of the square image.
    Returns:
        ``Alignment(image, separability)``: image uint8 (3, size, size), source orange and target
        blue, the same number of points each; separability in percent (50 = indistinguishable,
        100 = separable).
    """
    if kind not in KINDS:
        raise ValueError(f"kind = {kind!r}; valid: {KINDS}")
    if method not in METHODS:
        raise ValueError(f"method = {method!r}; valid: {METHODS}")
    budget = max(max_points // 2, 1)
    was_training = model.training
    model.eval()
    try:
        source = pixel_vectors(model, source_images, kind, budget)
        target = pixel_vectors(model, target_images, kind, budget)
    finally:
        model.train(was_training)
    m = min(len(source), len(target))
    rng = np.random.default_rng(seed)
    source = source[rng.choice(len(source), m, replace=False)]
    target = target[rng.choice(len(target), m, replace=False)]
    separability = domain_separability(source, target, seed=seed)
    points = embed_2d(np.concatenate([source, target]), method, seed)
    groups = np.concatenate([np.zeros(m, dtype=np.int64), np.ones(m, dtype=np.int64)])
    image = embedding_scatter(points.astype(np.float64), groups, [SOURCE_COLOR, TARGET_COLOR], size=size)
    return Alignment(image=image, separability=separability)
