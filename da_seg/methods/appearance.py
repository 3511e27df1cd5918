"""FCAN's Appearance Adaptation Network (AAN): source images with the target domain's "style".

Zhang et al., Fully Convolutional Adaptation Networks for Semantic Segmentation (CVPR 2018),
Sec. 3.2 (no official code; read from the paper). For a source image x_s and the target images
{x_t}, an output image x_o is optimised so that a fixed CNN's feature maps M^l keep x_s's
content while their Gram matrices G^l (inner products of the vectorized channel maps) match the
target domain's, averaged over target images:

    L(x_o) = sum_l w_s^l Dist(M_o^l, M_s^l) + alpha * sum_l w_t^l Dist(G_o^l, mean_t G_t^l)

    x_o <- x_o - w_i * g / |g|_1,   w_i = beta * (I - i) / I,   i = 1..I

Paper: ImageNet ResNet-50, layers {conv1, res2c, res3d, res4f, res5c} (our ``stem``, ``layer1``
.. ``layer4``), alpha = 1e-14, I = 1000 iterations from white noise, beta = 10.

Where we had to choose (the paper does not say):
- Dist is the sum of squared differences and G^l the raw inner products when ``normalize`` is
  false (the reading under which alpha = 1e-14 is meaningful); ``normalize = true`` uses means
  instead (content: mean over C*h*w; G / (h*w), mean over C*C entries), which does not depend on
  the image size (the synthetic recipes use it).
- |g|_1 is the *mean* absolute gradient of each image (a per-image normalized step): with the
  literal sum over 3*H*W pixels, 1000 steps of at most beta could not move a 1914x1052 image
  away from noise. beta is in the paper's 0..255 pixel units: our images are in [0, 1], so a step
  is beta / 255 per pixel on average; pixels are clipped to [0, 1] after each step.
- The per-layer weights w_s^l, w_t^l are not given: 1 each by default.
- ``init = "source"`` starts from x_s instead of white noise, which needs far fewer iterations to
  keep the content (the synthetic recipes, where 1000 iterations per image do not fit the CPU).
- conv1 is taken after the max-pool (our ResNet stem's output), not before.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from da_seg.models.resnet import ResNet, resnet_config
from da_seg.models.segmenter import INPUT_NORMS, InputNorm
from da_seg.models.weights import load_resnet_weights, read_state_dict

IMAGENET_LAYERS = ("stem", "layer1", "layer2", "layer3", "layer4")  # conv1, res2c, res3d, res4f, res5c
INITS = ("noise", "source")
PIXEL_SCALE = 255.0  # the paper's beta is in 0..255 units


# ---------------------------------------------------------------------------------------------
# Statistics and losses

def gram_matrix(features: Tensor, normalize: bool) -> Tensor:
    """(N, C, h, w) -> (N, C, C) float32: G_ij = <M_i, M_j> over the h*w cells, / (h*w) if ``normalize``."""
    n, c, h, w = features.shape
    flat = features.float().reshape(n, c, h * w)
    gram = flat @ flat.transpose(1, 2)
    return gram / (h * w) if normalize else gram


def squared_distance(a: Tensor, b: Tensor, normalize: bool) -> Tensor:
    """Per image (N,): the sum (or, ``normalize``, the mean) of squared differences over all but dim 0."""
    diff = (a.float() - b.float()).pow(2).flatten(1)
    return diff.mean(1) if normalize else diff.sum(1)


def content_loss(output: dict[str, Tensor], source: dict[str, Tensor], weights: dict[str, float],
                 normalize: bool) -> Tensor:
    """sum_l w_s^l Dist(M_o^l, M_s^l), per image (N,)."""
    return sum(w * squared_distance(output[l], source[l], normalize) for l, w in weights.items() if w)


def style_loss(output: dict[str, Tensor], target_grams: dict[str, Tensor], weights: dict[str, float],
               normalize: bool) -> Tensor:
    """sum_l w_t^l Dist(G_o^l, mean G_t^l), per image (N,); ``target_grams[l]``: (C, C)."""
    terms = []
    for layer, w in weights.items():
        if w:
            gram = gram_matrix(output[layer], normalize)                                   # (N, C, C)
            terms.append(w * squared_distance(gram, target_grams[layer].expand_as(gram), normalize))
    return sum(terms)


class GramAverage:
    """The target domain's style: the running mean of each layer's Gram matrix over images."""

    def __init__(self, normalize: bool):
        self.normalize = normalize
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, features: dict[str, Tensor]) -> None:
        for layer, maps in features.items():
            total = gram_matrix(maps, self.normalize).sum(0)                               # (C, C)
            self.sums[layer] = self.sums[layer] + total if layer in self.sums else total
        self.count += next(iter(features.values())).shape[0]

    def mean(self) -> dict[str, Tensor]:
        if not self.count:
            raise ValueError("no target image was seen: the target style is undefined")
        return {layer: total / self.count for layer, total in self.sums.items()}


# ---------------------------------------------------------------------------------------------
# The optimisation

def adapt_images(features: nn.Module, source: Tensor, target_grams: dict[str, Tensor], *,
                 content_weights: dict[str, float], style_weights: dict[str, float], alpha: float,
                 iterations: int, beta: float, init: str = "noise", normalize: bool = False,
                 generator: torch.Generator | None = None) -> Tensor:
    """AAN on a batch: (N, 3, H, W) source images in [0, 1] -> (N, 3, H, W) adapted images.

    Every image is its own optimisation (losses summed over the batch only to share the passes;
    each step is normalized per image). ``features``: a frozen network mapping images to a dict of
    named maps covering the layers in both weight dicts.
    """
    if init not in INITS:
        raise ValueError(f"init = {init!r}; valid: {', '.join(INITS)}")
    with torch.no_grad():
        source_features = {k: v.detach() for k, v in features(source).items()}
    if init == "noise":
        x = torch.rand(source.shape, generator=generator, device="cpu").to(source.device, source.dtype)
    else:
        x = source.clone()
    for i in range(1, iterations + 1):
        with torch.enable_grad():  # also when called under no_grad (a domain writer's transform)
            x.requires_grad_(True)
            out = features(x)
            loss = content_loss(out, source_features, content_weights, normalize)
            if alpha:
                loss = loss + alpha * style_loss(out, target_grams, style_weights, normalize)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        step = beta / PIXEL_SCALE * (iterations - i) / iterations
        scale = grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-20)   # per-image |g|_1 (mean)
        x = (x.detach() - step * grad / scale).clamp(0.0, 1.0)
    return x.detach()


# ---------------------------------------------------------------------------------------------
# The fixed feature networks

class FeatureNetwork(nn.Module):
    """A frozen image -> named feature maps network; images (N, 3, H, W) RGB in [0, 1]."""

    def __init__(self, layers: Sequence[str]):
        super().__init__()
        self.layers = tuple(layers)

    def freeze(self) -> "FeatureNetwork":
        self.requires_grad_(False)
        return self.eval()


class ImageNetResNet50(FeatureNetwork):
    """The paper's network: ResNet-50 at output stride 32 (no dilation), torchvision weights,
    ImageNet input norm; ``stem`` .. ``layer4`` = conv1 (after the pool), res2c, res3d, res4f, res5c."""

    def __init__(self, layers: Sequence[str] = IMAGENET_LAYERS):
        super().__init__(layers)
        unknown = sorted(set(layers) - set(IMAGENET_LAYERS))
        if unknown:
            raise ValueError(f"ResNet-50 layers {unknown}; valid: {', '.join(IMAGENET_LAYERS)}")
        self.backbone = ResNet(resnet_config(50, 32, caffe_style=False, deeplabv2=False))
        self.input_norm: InputNorm = INPUT_NORMS["imagenet"]

    @classmethod
    def from_file(cls, path: str | Path, layers: Sequence[str] = IMAGENET_LAYERS) -> "ImageNetResNet50":
        """Weights of a torchvision ResNet-50 file (``resnet50-0676ba61.pth`` ...), read with
        ``torch.load(weights_only=True)`` and mapped key by key (``models.weights``); the file's
        ``fc.*`` is skipped, a missing or mis-shaped encoder tensor is an error naming it."""
        net = cls(layers)
        load_resnet_weights(net, read_state_dict(path), path)
        return net.freeze()

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        def keep_stem(stage: str, x: Tensor):
            return x, ({"stem": x} if stage == "stem" else {})
        maps = self.backbone(self.input_norm.apply(images), keep_stem)
        return {layer: maps[layer] for layer in self.layers}


class SegmenterFeatures(FeatureNetwork):
    """A trained da_seg segmenter's encoder, frozen: what the synthetic recipes use instead of
    ImageNet weights (see ``stages/fcan.py``). ResNet-style encoders (``model.backbone`` returning
    a dict of stage maps) run alone; other segmenters run whole and their named features are read."""

    def __init__(self, segmenter: nn.Module, layers: Sequence[str]):
        super().__init__(layers)
        self.segmenter = segmenter

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        maps = self.segmenter.backbone(self.segmenter.input_norm.apply(images))
        if not isinstance(maps, dict) or not all(layer in maps for layer in self.layers):
            maps = self.segmenter(images).features
        missing = [layer for layer in self.layers if layer not in maps]
        if missing:
            raise ValueError(f"fcan.layers {missing}: the segmenter returns the features {', '.join(sorted(maps))}")
        return {layer: maps[layer] for layer in self.layers}
