"""The one interface every segmentation network implements.

A ``Segmenter`` takes RGB images in [0, 1] and does its own input normalization
(the convention of its pretrained weights: ImageNet RGB mean/std, or Caffe BGR 0-255
mean subtraction). Everything upstream (loaders, GPU augmentation, FDA, style
transfer) therefore works on one image convention, and the normalization travels
with the model into checkpoints, so evaluation can never mismatch it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class InputNorm:
    """How a network expects its input: ``(x * scale)[:, channel_order] - mean) / std``.

    ``imagenet``: RGB in [0, 1], ImageNet mean/std (torchvision, NVlabs MiT, HF SegFormer).
    ``caffe``: BGR in [0, 255] minus the Caffe means, std 1 (AdaptSegNet/ADVENT DeepLab-R101).
    ``clip``: RGB in [0, 1], OpenAI CLIP mean/std (EVA-02: timm's ``OPENAI_CLIP_MEAN/STD``).
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bgr: bool = False
    scale: float = 1.0

    @classmethod
    def named(cls, name: str) -> "InputNorm":
        if name not in INPUT_NORMS:
            raise KeyError(f"unknown input normalization {name!r}; valid: {sorted(INPUT_NORMS)}")
        return INPUT_NORMS[name]

    def apply(self, images: Tensor) -> Tensor:
        """images: (N, 3, H, W) RGB in [0, 1] -> normalized (N, 3, H, W)."""
        x = images * self.scale
        if self.bgr:
            x = x.flip(1)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


INPUT_NORMS = {
    "imagenet": InputNorm(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "caffe": InputNorm(mean=(104.008, 116.669, 122.675), std=(1.0, 1.0, 1.0), bgr=True, scale=255.0),
    "clip": InputNorm(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)),
}


@dataclass
class DetailOutput:
    """Logits a segmenter predicted for a crop of its input, besides its full-input ``logits``.

    logits: (N, C, h_d, w_d) at the output stride, for the input pixels ``box`` =
            (top, bottom, left, right). weight: the crop's share of any pixel loss on the output:
            loss = (1 - weight) * loss(logits, labels) + weight * loss(detail, labels[box]).
    """

    logits: Tensor
    box: tuple[int, int, int, int]
    weight: float


@dataclass
class SegmenterOutput:
    """What one forward pass returns.

    logits:     (N, C, h, w) at the network's output stride (not upsampled).
    aux_logits: (N, C, h', w') from an auxiliary head (DeepLabV2 multi-level on layer3), or None.
    features:   named intermediate maps methods may use, e.g. ``"backbone"`` (last encoder
                stage, used by feature distance) or stage names; (N, C_i, h_i, w_i) each.
    detail:     a crop's own logits and their share of a pixel loss (HRDA's detail crop), or None.
    """

    logits: Tensor
    aux_logits: Tensor | None = None
    features: dict[str, Tensor] = field(default_factory=dict)
    detail: DetailOutput | None = None
    align_corners: bool = False   # how these logits are upsampled to an image (the segmenter's convention)


class Segmenter(nn.Module):
    """Base class: encoder + head(s). Subclasses implement ``forward_normalized``.

    Attributes every subclass sets:
      num_classes:    number of output channels.
      output_stride:  input size / logits size (8 for DeepLabV2, 4 for SegFormer ...).
      input_norm:     an ``InputNorm``; ``forward`` applies it.
      backbone:       the encoder module (LR multiplier 1).
      heads:          modules trained from scratch (LR multiplier ``head_lr_mult``).
    Optional: ``dg_norm``, normalization blocks the encoder runs between its stages
    (``models/norm.py``); they train with the encoder, at LR multiplier 1, as in SAN-SAW.
    """

    num_classes: int
    output_stride: int
    input_norm: InputNorm
    # Bilinear upsampling convention of the logits: the ADVENT / AdaptSegNet / DACS codes use
    # align_corners=True, mmseg (DAFormer, SegFormer) False; ``[model] align_corners`` sets it.
    align_corners: bool = False

    def forward(self, images: Tensor) -> SegmenterOutput:
        """images: (N, 3, H, W) RGB in [0, 1]."""
        out = self.forward_normalized(self.input_norm.apply(images))
        out.align_corners = self.align_corners
        return out

    def forward_normalized(self, x: Tensor) -> SegmenterOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def _encoder_modules(self) -> list[nn.Module]:
        dg_norm = getattr(self, "dg_norm", None)
        return [self.backbone] + ([dg_norm] if dg_norm is not None else [])

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for m in self._encoder_modules() for p in m.parameters() if p.requires_grad]

    def head_parameters(self) -> list[nn.Parameter]:
        encoder_ids = {id(p) for m in self._encoder_modules() for p in m.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in encoder_ids]

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        """Two optimizer groups: pretrained encoder at ``lr``, heads at ``lr * head_lr_mult``.

        Each group carries ``initial_lr`` so schedules scale both the same way.
        """
        groups = [
            {"name": "backbone", "params": self.backbone_parameters(), "lr": lr, "initial_lr": lr},
            {"name": "head", "params": self.head_parameters(), "lr": lr * head_lr_mult,
             "initial_lr": lr * head_lr_mult},
        ]
        return [g for g in groups if g["params"]]


def upsample_logits(logits: Tensor, size: tuple[int, int], align_corners: bool = False) -> Tensor:
    """(N, C, h, w) -> (N, C, *size), bilinear; a no-op when the size already matches.
    ``align_corners``: the segmenter's convention (``SegmenterOutput.align_corners``)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=align_corners)
