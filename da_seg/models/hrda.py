"""HRDA (Hoyer et al., ECCV 2022): multi-resolution training and inference around any segmenter.

What ``lhoyer/HRDA`` does, and where (``mmseg/models/segmentors/hrda_encoder_decoder.py``:
``HRDAEncoderDecoder``; ``mmseg/models/decode_heads/hrda_head.py``: ``HRDAHead``;
``configs/hrda/gtaHR2csHR_hrda.py``):

- The training input is a large *context* crop (1024x1024). The network sees it at half resolution
  (``scales = [1, 0.5]``) and, at full resolution, a *detail* crop of 512x512 at a random place
  inside it whose coordinates are divisible by 8 (``crop_coord_divisible = 8``: output stride 4
  times the downscale 2, so the crop starts on a cell of the context logits). One box per batch.
- A scale attention ``a = sigmoid(attention_head(context features))``, one channel per class
  (``attention_classwise = True``), is set to zero outside the detail crop during training, and
  the prediction is ``fused = up(a) * detail + up((1 - a) * context)`` with the detail logits
  inserted at the crop's place (zero elsewhere) and ``up`` the bilinear 2x upsampling. The
  official head multiplies by ``1 - a`` before upsampling, as here.
- Loss: 0.9 x CE(fused, labels) + 0.1 x CE(detail, labels cropped to the box)
  (``hr_loss_weight = 0.1``; ``HRDAHead.losses`` scales the fused term by 1 - 0.1).
- Without a crop box (pseudo-labels of the EMA teacher, evaluation) the detail prediction covers
  the whole input by overlapping sliding windows of the detail size at half its stride
  (``hr_slide_inference = True``, ``hr_slide_overlapping = True``), all windows in one batch,
  averaged where they overlap; the attention is then not masked.

Here the wrapper is a :class:`Segmenter`, so every loss component, the EMA teacher, evaluation
and checkpoints use it unchanged. A forward that trains (train mode with gradients on) draws a
detail crop and returns it as ``out.detail``; every other forward (the teacher's pseudo-labels,
evaluation, a frozen reference network) predicts the detail scale by sliding windows.
``features["backbone"]`` is the *context* pass's (DAFormer's feature distance on the
half-resolution features: ``feature_scale = 0.5``).

Differences, on purpose:
- The attention head is a light decoder of our own over chosen feature maps of the base network
  (official: a second DAFormer head with 256 channels and a 1x1 fusion for MiT; a second
  DeepLabV2 ASPP classifier for ResNet): each map is projected to ``attention_channels`` by a 1x1
  conv, upsampled to the finest, concatenated, fused by a conv (1x1 over several maps, 3x3 over
  one) + BatchNorm + ReLU, and classified by a 1x1 conv.
- The crop alignment ``crop_divisible`` defaults to output stride / context scale (8 for MiT
  at stride 4 as in the official config; 16 for DeepLab at stride 8, where the official 8 would
  leave the attention mask half a cell off).
- The base network's auxiliary head is not used (the official code refuses auxiliary heads).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from da_seg.models.segmenter import DetailOutput, Segmenter, SegmenterOutput
from da_seg.utils.windows import sliding_windows


class ScaleAttentionHead(nn.Module):
    """Feature maps [(N, C_i, h_i, w_i)] -> (N, out_channels, h_0, w_0) attention logits (no sigmoid),
    at the size of the first (finest) map."""

    def __init__(self, in_channels: Sequence[int], channels: int, out_channels: int):
        super().__init__()
        self.project = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        kernel = 1 if len(in_channels) > 1 else 3
        self.fuse = nn.Sequential(
            nn.Conv2d(channels * len(in_channels), channels, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(channels, out_channels, 1)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        size = maps[0].shape[-2:]
        projected = [F.interpolate(p(x), size=size, mode="bilinear", align_corners=False)
                     if x.shape[-2:] != size else p(x) for p, x in zip(self.project, maps)]
        return self.classifier(self.fuse(torch.cat(projected, dim=1)))


class HRDASegmenter(Segmenter):
    """HRDA around ``base``: context at ``context_scale``, a detail crop at full resolution, a
    class-wise scale attention fusing them. ``logits`` (N, C, H/os, W/os) with os the base's
    output stride, for inputs whose sides are divisible by ``crop_divisible``."""

    def __init__(self, base: Segmenter, *, context_scale: float = 0.5, detail_crop: tuple[int, int] = (512, 512),
                 crop_divisible: int = 0, detail_loss_weight: float = 0.1,
                 attention_features: Sequence[str] = ("backbone",), attention_channels: int = 256,
                 classwise_attention: bool = True, detail_batch: int = 0):
        super().__init__()
        self.base = base
        self.num_classes = base.num_classes
        self.output_stride = base.output_stride
        self.input_norm = base.input_norm
        self.context_scale = float(context_scale)
        self.detail_crop = (int(detail_crop[0]), int(detail_crop[1]))
        self.detail_loss_weight = float(detail_loss_weight)
        self.attention_features = tuple(attention_features)
        self.detail_batch = int(detail_batch)
        # One cell of the context logits, in input pixels: crops start and end on these cells.
        cell = self.output_stride / self.context_scale
        if not 0 < self.context_scale < 1 or cell != int(cell):
            raise ValueError(f"hrda: context_scale = {context_scale!r}; expected a scale in (0, 1) with output "
                             f"stride {self.output_stride} / scale an integer (HRDA: 0.5)")
        self.cell = int(cell)
        self.crop_divisible = int(crop_divisible) or self.cell
        if self.crop_divisible % self.cell:
            raise ValueError(f"hrda: crop_divisible = {crop_divisible}; expected a multiple of output stride / "
                             f"context scale = {self.cell}, so that the detail crop starts on a context logit cell")
        if any(side % self.crop_divisible or side <= 0 for side in self.detail_crop):
            raise ValueError(f"hrda: detail_crop = {list(detail_crop)}; expected sides divisible by "
                             f"{self.crop_divisible} (crop_divisible)")
        if not 0 <= self.detail_loss_weight < 1:
            raise ValueError(f"hrda: detail_loss_weight = {detail_loss_weight!r}; expected 0 <= weight < 1 (HRDA 0.1)")
        channels = self._feature_channels()
        self.attention = ScaleAttentionHead(channels, attention_channels, self.num_classes if classwise_attention else 1)

    # The encoder is the base's: its parameters get the encoder LR (Segmenter.param_groups).
    @property
    def backbone(self) -> nn.Module:
        return self.base.backbone

    @property
    def dg_norm(self) -> nn.Module | None:
        return getattr(self.base, "dg_norm", None)

    def _encoder_modules(self) -> list[nn.Module]:
        return self.base._encoder_modules()

    def _feature_channels(self) -> list[int]:
        """Channels of the attention's input maps, from one small forward of the base (no state change)."""
        side = 4 * self.cell * 4
        device = next(self.base.parameters()).device
        modes = {m: m.training for m in self.base.modules()}
        self.base.eval()
        try:
            with torch.no_grad():
                features = self.base.forward_normalized(torch.zeros(1, 3, side, side, device=device)).features
        finally:
            for module, training in modes.items():
                module.training = training
        missing = [name for name in self.attention_features if name not in features]
        if missing or not self.attention_features:
            raise ValueError(f"hrda: attention_features = {list(self.attention_features)}; the base network's "
                             f"feature maps are {sorted(features)}")
        return [features[name].shape[1] for name in self.attention_features]

    # ------------------------------------------------------------------ the two scales
    def _context(self, x: Tensor) -> tuple[SegmenterOutput, Tensor]:
        """Normalized input (N, 3, H, W) -> the base's output on the downscaled input, and the scale
        attention (N, C or 1, h, w) in (0, 1) at its logits' size (h = H * scale / os)."""
        small = F.interpolate(x, scale_factor=self.context_scale, mode="bilinear", align_corners=self.align_corners)
        out = self.base.forward_normalized(small)
        attention = self.attention([out.features[name] for name in self.attention_features])
        if attention.shape[-2:] != out.logits.shape[-2:]:
            attention = F.interpolate(attention, size=out.logits.shape[-2:], mode="bilinear",
                                      align_corners=self.align_corners)
        return out, torch.sigmoid(attention)

    def fuse(self, context_logits: Tensor, attention: Tensor, detail_logits: Tensor) -> Tensor:
        """up(a) * detail + up((1 - a) * context): context logits and attention (N, ., h, w),
        detail logits (N, C, h / scale, w / scale) already placed on the full-resolution grid."""
        size = detail_logits.shape[-2:]
        up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=self.align_corners)  # noqa: E731
        return up(attention) * detail_logits + up((1 - attention) * context_logits)

    def random_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) of a detail crop inside an (height, width) input, corners on
        multiples of ``crop_divisible`` (``get_crop_bbox`` of the official code)."""
        crop_h, crop_w = self.detail_crop
        if crop_h > height or crop_w > width:
            raise ValueError(f"hrda: the detail crop {list(self.detail_crop)} does not fit the {height}x{width} "
                             "training input (the context crop): use a larger augment.<domain>.crop")
        step = self.crop_divisible
        top = int(torch.randint(0, (height - crop_h) // step + 1, ())) * step
        left = int(torch.randint(0, (width - crop_w) // step + 1, ())) * step
        return top, top + crop_h, left, left + crop_w

    def _check_input(self, height: int, width: int) -> None:
        if height % self.cell or width % self.cell:
            raise ValueError(f"hrda: input {height}x{width} is not divisible by output stride / context scale "
                             f"= {self.cell}; crop or resize to a multiple (e.g. eval.crop, augment.<domain>.crop)")

    # ------------------------------------------------------------------ forward
    def forward_normalized(self, x: Tensor) -> SegmenterOutput:
        self._check_input(*x.shape[-2:])
        if self.training and torch.is_grad_enabled():
            return self._forward_train(x)
        return self._forward_slide(x)

    def _forward_train(self, x: Tensor) -> SegmenterOutput:
        n, _, height, width = x.shape
        top, bottom, left, right = box = self.random_box(height, width)
        context, attention = self._context(x)
        detail = self.base.forward_normalized(x[:, :, top:bottom, left:right]).logits   # (N, C, crop / os)
        cell, os_ = self.cell, self.output_stride
        inside = torch.zeros_like(attention[:, :1])
        inside[:, :, top // cell:bottom // cell, left // cell:right // cell] = 1
        attention = attention * inside                                                   # 0 outside the crop
        placed = detail.new_zeros(n, detail.shape[1], height // os_, width // os_)
        placed[:, :, top // os_:bottom // os_, left // os_:right // os_] = detail
        fused = self.fuse(context.logits, attention, placed)
        features = {**context.features, "attention": attention}
        return SegmenterOutput(logits=fused, features=features,
                               detail=DetailOutput(detail, box, self.detail_loss_weight))

    def detail_slide(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) normalized -> (N, C, H/os, W/os): detail logits of overlapping windows
        (``detail_crop`` every half crop), batched (``detail_batch`` windows a pass, 0 = all), averaged."""
        n, _, height, width = x.shape
        os_ = self.output_stride
        stride = tuple(max(side // 2, 1) for side in self.detail_crop)
        windows = sliding_windows((height, width), self.detail_crop, stride)
        chunk = self.detail_batch or len(windows)
        total = counts = None
        for start in range(0, len(windows), chunk):
            group = windows[start:start + chunk]
            crops = torch.cat([x[:, :, t:b, l:r] for t, l, b, r in group], dim=0)
            logits = self.base.forward_normalized(crops).logits
            if total is None:
                total = logits.new_zeros(n, logits.shape[1], height // os_, width // os_)
                counts = logits.new_zeros(1, 1, height // os_, width // os_)
            for i, (t, l, b, r) in enumerate(group):
                total[:, :, t // os_:b // os_, l // os_:r // os_] += logits[i * n:(i + 1) * n]
                counts[:, :, t // os_:b // os_, l // os_:r // os_] += 1
        return total / counts

    def _forward_slide(self, x: Tensor) -> SegmenterOutput:
        context, attention = self._context(x)
        fused = self.fuse(context.logits, attention, self.detail_slide(x))
        return SegmenterOutput(logits=fused, features={**context.features, "attention": attention})


def build_hrda(num_classes: int, base: str = "segformer_b5", base_options: dict | None = None,
               pretrained: str = "", context_scale: float = 0.5, detail_crop: tuple[int, int] = (512, 512),
               crop_divisible: int = 0, detail_loss_weight: float = 0.1,
               attention_features: tuple[str, ...] = ("backbone",), attention_channels: int = 256,
               classwise_attention: bool = True, detail_batch: int = 0) -> HRDASegmenter:
    """HRDA multi-resolution wrapper (context at 1/2, detail crop, scale attention) around any model."""
    from da_seg.models import MODELS, build_model   # the registry this wrapper is an entry of

    if base == "hrda" or base not in MODELS:
        raise KeyError(f"hrda: base = {base!r}; valid bases: {', '.join(m for m in sorted(MODELS) if m != 'hrda')}")
    options = dict(base_options or {})
    if pretrained:
        options["pretrained"] = pretrained
    network = build_model(base, num_classes, **options)
    return HRDASegmenter(network, context_scale=context_scale, detail_crop=tuple(detail_crop),
                         crop_divisible=crop_divisible, detail_loss_weight=detail_loss_weight,
                         attention_features=tuple(attention_features), attention_channels=attention_channels,
                         classwise_attention=classwise_attention, detail_batch=detail_batch)
