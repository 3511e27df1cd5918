"""A small DeepLab (ResNet of BasicBlocks + ASPP) that trains in minutes on a CPU.

It keeps the structure of the real DeepLabV2 (output stride 8 through dilation in the last
two stages, an ASPP classifier, an optional auxiliary head on stage 3) so that every method
exercises the same code paths as with ResNet-101, at 1/100 of the cost. BatchNorm is kept
in the backbone because BatchNorm statistics are one of the effects adaptation methods
(and AdaBN) act through.
"""
from __future__ import annotations

from torch import Tensor, nn

from da_seg.models.norm import after_stage, build_dg_norm
from da_seg.models.segmenter import InputNorm, Segmenter, SegmenterOutput


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class SmallResNet(nn.Module):
    """Stem (stride 2) + 4 stages of BasicBlocks; strides 1, 2, 1, 1 with dilations 1, 1, 2, 4.

    (N, 3, H, W) -> layer1 (N, w, H/4, W/4) (stem conv stride 2 + max-pool),
    layer2 / layer3 / layer4 (N, 2w / 4w / 8w, H/8, W/8).
    ``forward(x, hook)`` runs ``hook(stage, x)`` after the stem and each stage (``norm.after_stage``).
    """

    def __init__(self, width: int = 16, blocks: tuple[int, int, int, int] = (1, 1, 1, 1)):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        channels = [width, width * 2, width * 4, width * 8]
        strides, dilations = [1, 2, 1, 1], [1, 1, 2, 4]
        in_ch = width
        stages = []
        for out_ch, n, stride, dilation in zip(channels, blocks, strides, dilations):
            layers = [BasicBlock(in_ch, out_ch, stride, dilation)]
            layers += [BasicBlock(out_ch, out_ch, 1, dilation) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.channels = channels
        self.stage_channels = {"stem": width, **dict(zip(("layer1", "layer2", "layer3", "layer4"), channels))}

    def forward(self, x: Tensor, hook=None) -> dict[str, Tensor]:
        feats: dict[str, Tensor] = {}
        x = after_stage(hook, "stem", self.stem(x), feats)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = after_stage(hook, name, getattr(self, name)(x), feats)
            feats[name] = x
        return feats


class LightASPP(nn.Module):
    """Parallel dilated 3x3 convs (summed, as in DeepLabV2) after a 1x1 reduction, then a classifier."""

    def __init__(self, in_ch: int, num_classes: int, dilations=(1, 2, 4, 6), mid: int = 64):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_ch, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.branches = nn.ModuleList(nn.Conv2d(mid, mid, 3, padding=d, dilation=d, bias=False) for d in dilations)
        self.post = nn.Sequential(nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(mid, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.reduce(x)
        x = sum(branch(x) for branch in self.branches)
        return self.classifier(self.post(x))


class DeepLabSmall(Segmenter):
    """Small DeepLab: ``logits`` (N, C, H/8, W/8); ``aux_logits`` from layer3 when ``multi_level``.

    ``dg_norm``: SAN or ISW blocks after chosen stages (``da_seg/models/norm.py``).
    """

    def __init__(self, num_classes: int, width: int = 16, blocks=(1, 1, 1, 1), multi_level: bool = False,
                 aspp_channels: int = 64, dg_norm: dict | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.output_stride = 8
        self.input_norm = InputNorm.named("imagenet")
        self.backbone = SmallResNet(width, tuple(blocks))
        c = self.backbone.channels
        self.head = LightASPP(c[3], num_classes, mid=aspp_channels)
        self.aux_head = LightASPP(c[2], num_classes, mid=aspp_channels // 2) if multi_level else None
        self.dg_norm = build_dg_norm(dg_norm, num_classes, self.backbone.stage_channels)

    def forward_normalized(self, x: Tensor) -> SegmenterOutput:
        feats = self.backbone(x, self.dg_norm)
        logits = self.head(feats["layer4"])
        aux = self.aux_head(feats["layer3"]) if self.aux_head is not None else None
        return SegmenterOutput(logits=logits, aux_logits=aux, features={**feats, "backbone": feats["layer4"]})


def build_deeplab_small(num_classes: int, width: int = 16, blocks: tuple[int, ...] = (1, 1, 1, 1),
                        multi_level: bool = False, aspp_channels: int = 64, pretrained: str = "",
                        dg_norm: dict | None = None) -> DeepLabSmall:
    """Small DeepLab (BasicBlock ResNet, OS 8, light ASPP) for CPU demos and tests; random init only."""
    if pretrained:
        raise ValueError("deeplab_small has no pretrained weights; set model.pretrained = \"\"")
    if len(blocks) != 4:
        raise ValueError(f"deeplab_small: blocks must have 4 entries (one per stage), got {list(blocks)}")
    return DeepLabSmall(num_classes, width, tuple(blocks), multi_level, aspp_channels, dg_norm)
