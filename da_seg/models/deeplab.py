"""DeepLabV2 (as in AdaptSegNet / ADVENT) and DeepLabV3+ on ResNet-50/101.

DeepLabV2: ResNet at output stride 8 (layer3 dilation 2, layer4 dilation 4, every block dilated),
an ASPP *classifier* (parallel 3x3 convs straight to class scores, summed) on layer4 and, with
``multi_level``, a second one on layer3 giving ``aux_logits``.

DeepLabV3+: ResNet at output stride 16 or 8, ASPP with image pooling, and a decoder that
refines the upsampled ASPP features with layer1 features; logits at stride 4.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from da_seg.models.norm import build_dg_norm
from da_seg.models.resnet import ResNet, freeze_batchnorm_affine, resnet_config
from da_seg.models.segmenter import InputNorm, Segmenter, SegmenterOutput
from da_seg.models.weights import load_resnet_weights, read_state_dict, resnet_layout, resolve_resnet_weights

# [!] AdaptSegNet / DACS / SAN-SAW return inside their ASPP loop, so only d=6 and d=12 are
# summed ("reduced"); ADVENT and FDA sum all four, as the DeepLabV2 paper describes ("full").
ASPP_DILATIONS = {"full": (6, 12, 18, 24), "reduced": (6, 12)}
CAFFE_LAYOUTS = ("caffe_deeplab", "deeplab_release")

log = logging.getLogger(__name__)


class ASPPClassifier(nn.Module):
    """DeepLabV2's classifier: 3x3 convs in -> classes with dilation = padding = d, summed.

    (N, in_ch, h, w) -> (N, num_classes, h, w).
    """

    def __init__(self, in_ch: int, num_classes: int, dilations: tuple[int, ...]):
        super().__init__()
        self.dilations = tuple(dilations)
        self.branches = nn.ModuleList(
            nn.Conv2d(in_ch, num_classes, 3, padding=d, dilation=d, bias=True) for d in self.dilations)
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class DeepLabV2(Segmenter):
    """ResNet (OS 8) + ASPP classifier; ``logits`` (N, C, ceil(H/8), ceil(W/8)).

    ``aux_logits`` (same size) come from an ASPP classifier on layer3 when ``multi_level``.
    ``features``: ``layer1``..``layer4`` and ``backbone`` (= layer4, 2048 channels).
    ``dg_norm``: SAN or ISW blocks after chosen stages (``da_seg/models/norm.py``); their outputs
    for the losses join ``features`` as ``dg/<stage>/<name>``.
    """

    def __init__(self, num_classes: int, depth: int = 101, *, aspp: str = "full", multi_level: bool = True,
                 freeze_bn: bool = True, caffe_style: bool = True, input_norm: str = "imagenet",
                 dg_norm: dict | None = None):
        super().__init__()
        if aspp not in ASPP_DILATIONS:
            raise ValueError(f"aspp must be one of {sorted(ASPP_DILATIONS)}, got {aspp!r}")
        self.num_classes = num_classes
        self.output_stride = 8
        self.input_norm = InputNorm.named(input_norm)
        self.backbone = ResNet(resnet_config(depth, 8, caffe_style=caffe_style, deeplabv2=True))
        dilations = ASPP_DILATIONS[aspp]
        self.classifier = ASPPClassifier(ResNet.channels[3], num_classes, dilations)
        self.aux_classifier = ASPPClassifier(ResNet.channels[2], num_classes, dilations) if multi_level else None
        self.dg_norm = build_dg_norm(dg_norm, num_classes, ResNet.stage_channels)
        if freeze_bn:
            freeze_batchnorm_affine(self.backbone)

    def forward_normalized(self, x: Tensor) -> SegmenterOutput:
        features = self.backbone(x, self.dg_norm)
        logits = self.classifier(features["layer4"])  # (N, C, H/8, W/8)
        aux = self.aux_classifier(features["layer3"]) if self.aux_classifier is not None else None
        return SegmenterOutput(logits=logits, aux_logits=aux, features={**features, "backbone": features["layer4"]})


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """DeepLabV3 ASPP: 1x1 conv, three dilated 3x3 convs, image pooling; concat -> 1x1 projection.

    (N, in_ch, h, w) -> (N, channels, h, w). The image-pooling branch has no BatchNorm: its input is
    1x1 per image, so batch statistics would not exist at batch size 1 (common in adaptation).
    """

    def __init__(self, in_ch: int, rates: tuple[int, int, int], channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.rates = tuple(rates)
        self.branches = nn.ModuleList([conv_bn_relu(in_ch, channels, 1)]
                                      + [conv_bn_relu(in_ch, channels, 3, r) for r in self.rates])
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_ch, channels, 1), nn.ReLU(inplace=True))
        self.project = nn.Sequential(conv_bn_relu(channels * (len(self.rates) + 2), channels, 1), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        outs = [branch(x) for branch in self.branches]
        outs.append(self.image_pool(x).expand(-1, -1, *x.shape[-2:]))  # (N, channels, 1, 1) -> (N, channels, h, w)
        return self.project(torch.cat(outs, dim=1))


class DeepLabV3PlusDecoder(nn.Module):
    """Upsample ASPP output to layer1's size, concat with reduced layer1 features, two 3x3 convs.

    aspp (N, 256, H/os, W/os), low (N, 256, H/4, W/4) -> (N, 256, H/4, W/4).
    """

    def __init__(self, low_ch: int, aspp_ch: int = 256, reduced_ch: int = 48, channels: int = 256):
        super().__init__()
        self.reduce = conv_bn_relu(low_ch, reduced_ch, 1)
        self.refine = nn.Sequential(conv_bn_relu(aspp_ch + reduced_ch, channels, 3),
                                    conv_bn_relu(channels, channels, 3))

    def forward(self, aspp: Tensor, low: Tensor) -> Tensor:
        aspp = F.interpolate(aspp, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.refine(torch.cat([aspp, self.reduce(low)], dim=1))


class DeepLabV3Plus(Segmenter):
    """ResNet (OS 16 or 8) + ASPP + layer1 decoder; ``logits`` (N, C, ceil(H/4), ceil(W/4)).

    ``features``: ``layer1``..``layer4``, ``backbone`` (= layer4) and ``decoder`` (the 256-channel
    map the classifier reads); ``dg_norm`` as in ``DeepLabV2`` (the decoder reads layer1 after it).
    """

    def __init__(self, num_classes: int, depth: int = 101, *, output_stride: int = 16, freeze_bn: bool = False,
                 caffe_style: bool = False, input_norm: str = "imagenet", dg_norm: dict | None = None):
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"DeepLabV3+ output_stride must be 8 or 16, got {output_stride}")
        self.num_classes = num_classes
        self.output_stride = 4
        self.encoder_stride = output_stride
        self.input_norm = InputNorm.named(input_norm)
        self.backbone = ResNet(resnet_config(depth, output_stride, caffe_style=caffe_style, deeplabv2=False))
        rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
        self.aspp = ASPP(ResNet.channels[3], rates)
        self.decoder = DeepLabV3PlusDecoder(ResNet.channels[0])
        self.classifier = nn.Conv2d(256, num_classes, 1)
        for m in [*self.aspp.modules(), *self.decoder.modules(), self.classifier]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.dg_norm = build_dg_norm(dg_norm, num_classes, ResNet.stage_channels)
        if freeze_bn:
            freeze_batchnorm_affine(self.backbone)

    def forward_normalized(self, x: Tensor) -> SegmenterOutput:
        features = self.backbone(x, self.dg_norm)
        decoded = self.decoder(self.aspp(features["layer4"]), features["layer1"])  # (N, 256, H/4, W/4)
        logits = self.classifier(decoded)
        return SegmenterOutput(logits=logits, features={**features, "backbone": features["layer4"],
                                                        "decoder": decoded})


# ---------------------------------------------------------------------------------------------
# Builders (registered in da_seg/models/__init__.py)
# ---------------------------------------------------------------------------------------------

def _read_resnet_weights(pretrained: str, depth: int):
    """(path, state, layout), or Nones without weights."""
    if not pretrained:
        return None, None, None
    path = resolve_resnet_weights(pretrained, depth)
    state = read_state_dict(path)
    return path, state, resnet_layout(state)


def _input_norm_for(layout: str | None, input_norm: str | None, caffe_style: bool) -> str:
    """Caffe-converted weights want BGR 0-255 input, everything else ImageNet RGB.

    Only the normalization follows the file; the architecture (``caffe_style``) is an explicit
    option, so that a model rebuilt from its options for evaluation is the one that was trained.
    """
    caffe_weights = layout in CAFFE_LAYOUTS
    if layout is not None and caffe_weights != caffe_style:
        log.warning("%s weights were trained with the stride on the %s conv of each downsampling bottleneck, "
                    "but caffe_style = %s; set caffe_style = %s to match them", layout,
                    "first 1x1" if caffe_weights else "3x3", caffe_style, caffe_weights)
    return input_norm or ("caffe" if caffe_weights else "imagenet")


def build_deeplabv2(num_classes: int, depth: int, *, pretrained: str = "", aspp: str = "full",
                    multi_level: bool = True, freeze_bn: bool = True, caffe_style: bool = True,
                    input_norm: str | None = None, dg_norm: dict | None = None) -> DeepLabV2:
    path, state, layout = _read_resnet_weights(pretrained, depth)
    model = DeepLabV2(num_classes, depth, aspp=aspp, multi_level=multi_level, freeze_bn=freeze_bn,
                      caffe_style=caffe_style, input_norm=_input_norm_for(layout, input_norm, caffe_style),
                      dg_norm=dg_norm)
    if state is not None:
        load_resnet_weights(model, state, Path(path))
    return model


def build_deeplabv3plus(num_classes: int, depth: int, *, pretrained: str = "", output_stride: int = 16,
                        freeze_bn: bool = False, caffe_style: bool = False,
                        input_norm: str | None = None, dg_norm: dict | None = None) -> DeepLabV3Plus:
    path, state, layout = _read_resnet_weights(pretrained, depth)
    model = DeepLabV3Plus(num_classes, depth, output_stride=output_stride, freeze_bn=freeze_bn,
                          caffe_style=caffe_style, input_norm=_input_norm_for(layout, input_norm, caffe_style),
                          dg_norm=dg_norm)
    if state is not None:
        load_resnet_weights(model, state, Path(path))
    return model


def deeplabv2_r101(num_classes: int, pretrained: str = "", aspp: str = "full", multi_level: bool = True,
                   freeze_bn: bool = True, caffe_style: bool = True,
                   input_norm: str | None = None, dg_norm: dict | None = None) -> DeepLabV2:
    """DeepLabV2 ResNet-101, ASPP classifier, aux head on layer3 (AdaptSegNet/ADVENT), OS 8."""
    return build_deeplabv2(num_classes, 101, pretrained=pretrained, aspp=aspp, multi_level=multi_level,
                           freeze_bn=freeze_bn, caffe_style=caffe_style, input_norm=input_norm, dg_norm=dg_norm)


def deeplabv2_r50(num_classes: int, pretrained: str = "", aspp: str = "full", multi_level: bool = True,
                  freeze_bn: bool = True, caffe_style: bool = True,
                  input_norm: str | None = None, dg_norm: dict | None = None) -> DeepLabV2:
    """DeepLabV2 ResNet-50, ASPP classifier, aux head on layer3, OS 8."""
    return build_deeplabv2(num_classes, 50, pretrained=pretrained, aspp=aspp, multi_level=multi_level,
                           freeze_bn=freeze_bn, caffe_style=caffe_style, input_norm=input_norm, dg_norm=dg_norm)


def deeplabv3plus_r101(num_classes: int, pretrained: str = "", output_stride: int = 16, freeze_bn: bool = False,
                       caffe_style: bool = False, input_norm: str | None = None,
                       dg_norm: dict | None = None) -> DeepLabV3Plus:
    """DeepLabV3+ ResNet-101, ASPP with image pooling + layer1 decoder, logits at 1/4."""
    return build_deeplabv3plus(num_classes, 101, pretrained=pretrained, output_stride=output_stride,
                               freeze_bn=freeze_bn, caffe_style=caffe_style, input_norm=input_norm,
                               dg_norm=dg_norm)


def deeplabv3plus_r50(num_classes: int, pretrained: str = "", output_stride: int = 16, freeze_bn: bool = False,
                      caffe_style: bool = False, input_norm: str | None = None,
                      dg_norm: dict | None = None) -> DeepLabV3Plus:
    """DeepLabV3+ ResNet-50, ASPP with image pooling + layer1 decoder, logits at 1/4."""
    return build_deeplabv3plus(num_classes, 50, pretrained=pretrained, output_stride=output_stride,
                               freeze_bn=freeze_bn, caffe_style=caffe_style, input_norm=input_norm,
                               dg_norm=dg_norm)
