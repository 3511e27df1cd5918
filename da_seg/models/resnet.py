"""ResNet-50/101 encoders for DeepLab, with the two conventions the literature mixes.

Module names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``
...), so torchvision state dicts load by name and the Caffe-converted DeepLab weights load after
dropping their ``Scale.`` prefix (see ``weights.py``).

Two conventions differ in ways that matter for loading pretrained weights:

- ``caffe_style=True`` (DeepLabV2 of AdaptSegNet / ADVENT, ResNet "v1"): the stride of a
  downsampling bottleneck sits on its first 1x1 conv; torchvision ("v1.5") puts it on the 3x3.
- DeepLabV2 dilates every block of layer3/layer4 (``dilate_first_block=True``); torchvision's
  ``replace_stride_with_dilation`` gives the first block of a dilated layer the previous dilation.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from da_seg.models.norm import after_stage

LAYER_NAMES = ("layer1", "layer2", "layer3", "layer4")
DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


@dataclass(frozen=True)
class ResNetConfig:
    """Strides and dilations of layer1..layer4 (the stem always has stride 4)."""

    depth: int = 101
    strides: tuple[int, int, int, int] = (1, 2, 1, 1)
    dilations: tuple[int, int, int, int] = (1, 1, 2, 4)
    caffe_style: bool = True
    dilate_first_block: bool = True
    ceil_mode: bool = True  # max-pool rounding: DeepLabV2 rounds up (512x1024 -> 65x129 logits)

    @property
    def output_stride(self) -> int:
        stride = 4
        for s in self.strides:
            stride *= s
        return stride


def resnet_config(depth: int, output_stride: int, *, caffe_style: bool, deeplabv2: bool) -> ResNetConfig:
    """Strides/dilations giving ``output_stride`` 8, 16 or 32."""
    if depth not in DEPTHS:
        raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
    table = {8: ((1, 2, 1, 1), (1, 1, 2, 4)), 16: ((1, 2, 2, 1), (1, 1, 1, 2)), 32: ((1, 2, 2, 2), (1, 1, 1, 1))}
    if output_stride not in table:
        raise ValueError(f"output_stride must be one of {sorted(table)}, got {output_stride}")
    strides, dilations = table[output_stride]
    return ResNetConfig(depth, strides, dilations, caffe_style=caffe_style,
                        dilate_first_block=deeplabv2, ceil_mode=deeplabv2)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (dilated) -> 1x1 expand (x4), residual; stride on conv1 when ``caffe_style``."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, dilation: int = 1, caffe_style: bool = True):
        super().__init__()
        out_ch = planes * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if caffe_style else (1, stride)
        self.conv1 = nn.Conv2d(in_ch, planes, 1, stride_1x1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride_3x3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Bottleneck ResNet without the classifier.

    (N, 3, H, W) -> {"layer1": (N, 256, H/4, W/4), "layer2": (N, 512, H/8, W/8),
    "layer3": (N, 1024, H/s3, W/s3), "layer4": (N, 2048, H/os, W/os)} (sizes rounded up).
    ``forward(x, hook)`` runs ``hook(stage, x)`` after the stem and each stage (``norm.after_stage``).
    """

    channels = (256, 512, 1024, 2048)
    stage_channels = {"stem": 64, **dict(zip(LAYER_NAMES, channels))}

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=config.ceil_mode)
        in_ch, previous_dilation = 64, 1
        for name, planes, blocks, stride, dilation in zip(
                LAYER_NAMES, (64, 128, 256, 512), DEPTHS[config.depth], config.strides, config.dilations):
            first_dilation = dilation if config.dilate_first_block else previous_dilation
            layer = [Bottleneck(in_ch, planes, stride, first_dilation, config.caffe_style)]
            in_ch = planes * Bottleneck.expansion
            layer += [Bottleneck(in_ch, planes, 1, dilation, config.caffe_style) for _ in range(blocks - 1)]
            setattr(self, name, nn.Sequential(*layer))
            previous_dilation = dilation
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, hook=None) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, 64, H/4, W/4)
        features: dict[str, Tensor] = {}
        x = after_stage(hook, "stem", x, features)
        for name in LAYER_NAMES:
            x = after_stage(hook, name, getattr(self, name)(x), features)
            features[name] = x
        return features


def freeze_batchnorm_affine(module: nn.Module) -> None:
    """BN scale/shift stop training; statistics still come from the batch in train mode.

    This is what AdaptSegNet/ADVENT do (``requires_grad = False`` on BN parameters, model left
    in train mode); running statistics still move on every train-mode forward.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for p in m.parameters():
                p.requires_grad_(False)
