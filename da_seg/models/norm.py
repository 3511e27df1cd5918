"""Normalization blocks inserted between encoder stages, for domain generalization.

Two methods train on the source only and make the encoder's features insensitive to style:

- **SAN** (semantic-aware normalization; Peng et al., "Semantic-Aware Domain Generalized
  Segmentation", CVPR 2022). After a stage, a 1x1 *aux classifier* on the detached features gives
  class probabilities m_c; for each selected class c:
      mid = x * m_c;  a = sigmoid(conv7x7([mean_ch(mid), max_ch(mid), m_c]));  y_c = mid * a
      out_c = gamma_c * RN(y_c; region_c) + beta_c
  and ``ReLU(sum_c out_c)`` replaces x. RN is region normalization: the pixels of region_c and the
  rest are each standardized (per channel) with their own mean and variance. region_c is the class
  heatmap mean_ch(y_c) outside the lowest of ``kmeans_clusters`` 1-D k-means clusters, per image.
  [!] The release shares one IN affine between the classes and its region clustering never runs
  (the mask is always 1, so RN is a plain IN): ``release_behaviour = true`` reproduces that.
  Our reading where neither says: the pixels outside a region are standardized on their own, as
  in Region Normalization (Yu et al., AAAI 2020), rather than zeroed, so that classes outside the
  selected ones keep their features; the clustering (which the release meant to run on the whole
  batch with an exact 1-D solver) runs per image and class, with Lloyd iterations.
- **ISW**'s instance normalization (RobustNet; Choi et al., CVPR 2021): IN (no affine) then ReLU
  after a stage; the whitening loss on the IN output lives in ``methods/isw.py`` (and SAN-SAW's losses in ``methods/san_saw.py``).
  RobustNet puts the IN inside the stage's last block, before its ReLU (and replaces the stem's
  BN); here it sits on the stage output, so that one hook point serves every ResNet here.

How they are wired: a ResNet-based segmenter built with ``dg_norm = {kind = ..., stages = [...]}``
owns one ``DGNorm``; its encoder calls ``dg_norm(stage_name, x)`` after the stem and after each
stage, and puts what the block returns for the losses into ``SegmenterOutput.features`` under
``"dg/<stage>/<name>"`` (see ``feature_key``). The blocks are part of the segmenter before the
optimizer is built, are saved with it, and train in the encoder's LR group (SAN-SAW trains SAN
and its classifiers at the backbone LR).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from da_seg.config import ConfigError, check_keys

STAGE_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4")  # dg_norm.stages: 0 = stem, 1..4 = layers
DG_KINDS = ("san_saw", "isw")
EPS = 1e-5  # as nn.InstanceNorm2d


def feature_key(stage: str, name: str) -> str:
    """Where a block's output for the losses sits in ``SegmenterOutput.features``."""
    return f"dg/{stage}/{name}"


@dataclass(frozen=True)
class DGNormOptions:
    """``model.options.dg_norm``: which blocks, after which stages."""

    kind: str = ""                       # "san_saw" | "isw"
    stages: tuple[int, ...] = (1, 2)     # 0 = stem, 1..4 = layer1..layer4 (SAN-SAW: layer1, layer2)
    classes: tuple[int, ...] = ()        # SAN's selected classes (train ids); () = every class
    release_behaviour: bool = False      # SAN as released: one shared IN affine, region mask always 1
    kmeans_clusters: int = 5             # SAN regions: clusters of each class heatmap (release: 5)

    @classmethod
    def parse(cls, raw: dict[str, Any], num_classes: int) -> "DGNormOptions":
        where = "model.options.dg_norm."
        if not isinstance(raw, dict):
            raise ConfigError(f"model.options.dg_norm must be a table, e.g. {{ kind = \"san_saw\", stages = [1, 2] }}; "
                              f"got {raw!r}")
        check_keys(raw, [f.name for f in dataclasses.fields(cls)], where, "model options")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        options = cls(**values)
        if options.kind not in DG_KINDS:
            raise ConfigError(f"{where}kind = {options.kind!r}; valid: {list(DG_KINDS)}")
        if not options.stages or any(s not in range(len(STAGE_NAMES)) for s in options.stages) \
                or len(set(options.stages)) != len(options.stages):
            raise ConfigError(f"{where}stages = {list(options.stages)}; expected distinct stage numbers "
                              "0 (stem) .. 4 (layer4)")
        if any(not 0 <= c < num_classes for c in options.classes) or len(set(options.classes)) != len(options.classes):
            raise ConfigError(f"{where}classes = {list(options.classes)}; expected distinct class ids in "
                              f"0..{num_classes - 1}")
        if options.kind == "san_saw" and options.kmeans_clusters < 2:
            raise ConfigError(f"{where}kmeans_clusters = {options.kmeans_clusters}; expected >= 2")
        return options

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(STAGE_NAMES[s] for s in sorted(self.stages))


# ---------------------------------------------------------------------------------------------
# Functions (tested on their own)
# ---------------------------------------------------------------------------------------------

def kmeans_1d(values: Tensor, k: int, iters: int = 10) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means of each row of ``values`` (B, P) -> (assignments (B, P) int64, centroids (B, k)).

    Centroids start evenly spaced between the row's minimum and maximum (deterministic, and a
    long upper tail gets clusters of its own, which is what both uses look for) and stay sorted,
    so cluster 0 is the lowest. In 1-D a point's nearest centroid is found by comparing it with
    the k - 1 midpoints between sorted centroids. A constant row leaves k equal centroids and
    puts every point in cluster 0.
    """
    values = values.detach().float()
    low, high = values.amin(1, keepdim=True), values.amax(1, keepdim=True)
    centroids = low + (high - low) * torch.linspace(0, 1, k, device=values.device)   # (B, k)
    ones = torch.ones_like(values)
    for step in range(iters + 1):
        centroids = centroids.sort(1).values
        midpoints = (centroids[:, 1:] + centroids[:, :-1]) / 2                      # (B, k - 1)
        assign = (values.unsqueeze(-1) > midpoints.unsqueeze(1)).sum(-1)            # (B, P)
        if step == iters:
            break
        sums = torch.zeros_like(centroids).scatter_add_(1, assign, values)
        counts = torch.zeros_like(centroids).scatter_add_(1, assign, ones)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    return assign, centroids


def heatmap_region(heat: Tensor, clusters: int) -> Tensor:
    """(N, 1, h, w) class heatmap -> (N, 1, h, w) {0, 1}: pixels outside its lowest k-means cluster."""
    assign, _ = kmeans_1d(heat.flatten(1), clusters)
    return (assign > 0).to(heat.dtype).view_as(heat)


def _standardize(x: Tensor, weight: Tensor) -> Tensor:
    """(x - mean) / sqrt(var + eps) per image and channel, statistics weighted by ``weight`` (N, 1, h, w)."""
    total = weight.sum((2, 3), keepdim=True).clamp_min(EPS)
    mean = (x * weight).sum((2, 3), keepdim=True) / total
    var = ((x - mean).pow(2) * weight).sum((2, 3), keepdim=True) / total
    return (x - mean) * torch.rsqrt(var + EPS)


def region_normalize(x: Tensor, region: Tensor | None) -> Tensor:
    """Region normalization, without affine: x (N, C, h, w), region (N, 1, h, w) in [0, 1] or None.

    The region's pixels and the other pixels are standardized separately, each with its own
    per-channel mean and (biased) variance, so inside a hard region the output has zero mean and
    unit variance per channel. ``region=None`` (or all ones) is instance normalization.
    Computed in float32; returns x's dtype.
    """
    dtype = x.dtype
    x = x.float()
    if region is None:
        return F.instance_norm(x, eps=EPS).to(dtype)
    region = region.float()
    out = region * _standardize(x, region) + (1 - region) * _standardize(x, 1 - region)
    return out.to(dtype)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------

class SemanticAwareNorm(nn.Module):
    """SAN after one stage, with its aux classifier.

    x (N, C, h, w) -> (ReLU(sum_c out_c) (N, C, h, w), {"aux_logits": (N, num_classes, h, w),
    "input": x, "output": the result}). The K selected classes are processed together, as a
    (N, K, C, h, w) tensor: K times the stage's activation memory, in exchange for one kernel
    per operation instead of K.
    """

    def __init__(self, channels: int, num_classes: int, classes: tuple[int, ...], *,
                 release_behaviour: bool = False, kmeans_clusters: int = 5):
        super().__init__()
        self.classes = tuple(classes)
        self.release_behaviour = release_behaviour
        self.kmeans_clusters = kmeans_clusters
        k = len(self.classes)
        self.aux_classifier = nn.Conv2d(channels, num_classes, 1)
        # Category-level feature refinement: one 7x7 spatial attention (3 -> 1) per selected
        # class, as one grouped convolution.
        self.attention = nn.Conv2d(3 * k, k, 7, padding=3, groups=k, bias=False)
        n_affine = 1 if release_behaviour else k
        self.affine_weight = nn.Parameter(torch.ones(n_affine, channels))
        self.affine_bias = nn.Parameter(torch.zeros(n_affine, channels))
        for conv in (self.aux_classifier, self.attention):  # N(0, 0.01) as the release
            nn.init.normal_(conv.weight, 0.0, 0.01)
        nn.init.zeros_(self.aux_classifier.bias)

    def _normalize_and_sum(self, per_class: Tensor, regions: Tensor | None) -> Tensor:
        """per_class (N, K, C, h, w), regions (N, K, h, w) or None -> ReLU(sum_k affine_k(RN)) (N, C, h, w)."""
        n, k, c, h, w = per_class.shape
        flat_regions = None if regions is None else regions.reshape(n * k, 1, h, w)
        normalized = region_normalize(per_class.reshape(n * k, c, h, w), flat_regions).view(n, k, c, h, w)
        weight = self.affine_weight.view(1, -1, c, 1, 1)   # one row per class, or one shared (release)
        bias = self.affine_bias.view(1, -1, c, 1, 1)
        return F.relu((normalized * weight + bias).sum(1))

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        n, c, h, w = x.shape
        k = len(self.classes)
        # Detached: the aux classifier learns from its own CE and SAN, never steers the encoder.
        aux = self.aux_classifier(x.detach())                                # (N, num_classes, h, w)
        prob = F.softmax(aux.float(), dim=1)[:, list(self.classes)].to(x.dtype)  # (N, K, h, w)
        mid = x.unsqueeze(1) * prob.unsqueeze(2)                             # (N, K, C, h, w)
        descriptor = torch.stack([mid.mean(2), mid.amax(2), prob], dim=2)    # (N, K, 3, h, w)
        attention = torch.sigmoid(self.attention(descriptor.reshape(n, 3 * k, h, w)))  # (N, K, h, w)
        refined = mid * attention.unsqueeze(2)
        regions = None
        if not self.release_behaviour:
            heat = refined.detach().mean(2).reshape(n * k, 1, h, w)          # class heatmaps
            regions = heatmap_region(heat, self.kmeans_clusters).view(n, k, h, w)
        result = self._normalize_and_sum(refined, regions)
        return result, {"aux_logits": aux, "input": x, "output": result}

    def normalized_target(self, x: Tensor, labels: Tensor) -> Tensor:
        """The SmoothL1 target: ReLU(sum_c norm_c(x * onehot_c)) with ground-truth regions.

        x: the block's input (N, C, h, w); labels: (N, h, w) int64 at x's size (ignore = any id
        outside the classes). Paper: region normalization inside onehot_c with class c's affine;
        release: IN of the masked map with the shared affine. Not detached (as the release).
        """
        classes = torch.tensor(self.classes, device=labels.device).view(1, -1, 1, 1)
        onehot = (labels.unsqueeze(1) == classes).to(x.dtype)               # (N, K, h, w)
        per_class = x.unsqueeze(1) * onehot.unsqueeze(2)                     # (N, K, C, h, w)
        return self._normalize_and_sum(per_class, None if self.release_behaviour else onehot)


class InstanceWhiteningNorm(nn.Module):
    """ISW's normalization after one stage: x -> (ReLU(IN(x)), {"normalized": IN(x)}), no parameters."""

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        normalized = F.instance_norm(x.float(), eps=EPS).to(x.dtype)
        return F.relu(normalized), {"normalized": normalized}


class DGNorm(nn.Module):
    """The blocks of one segmenter, by stage name; ``forward(stage, x)`` is the encoder's hook."""

    def __init__(self, options: DGNormOptions, num_classes: int, stage_channels: dict[str, int]):
        super().__init__()
        self.kind = options.kind
        self.options = options
        self.stage_names = options.stage_names
        self.classes = options.classes or tuple(range(num_classes))
        blocks = {}
        for stage in self.stage_names:
            if options.kind == "san_saw":
                blocks[stage] = SemanticAwareNorm(stage_channels[stage], num_classes, self.classes,
                                                  release_behaviour=options.release_behaviour,
                                                  kmeans_clusters=options.kmeans_clusters)
            else:
                blocks[stage] = InstanceWhiteningNorm()
        self.blocks = nn.ModuleDict(blocks)

    def forward(self, stage: str, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if stage not in self.blocks:
            return x, {}
        x, extras = self.blocks[stage](x)
        return x, {feature_key(stage, name): value for name, value in extras.items()}


def build_dg_norm(raw: dict[str, Any] | None, num_classes: int, stage_channels: dict[str, int]) -> DGNorm | None:
    """``model.options.dg_norm`` -> a ``DGNorm``, or None when absent or empty."""
    if not raw:
        return None
    return DGNorm(DGNormOptions.parse(raw, num_classes), num_classes, stage_channels)


def after_stage(hook: DGNorm | None, stage: str, x: Tensor, features: dict[str, Tensor]) -> Tensor:
    """What an encoder does after each stage: run the hook (if any), keep its extras in ``features``."""
    if hook is None:
        return x
    x, extras = hook(stage, x)
    features.update(extras)
    return x
