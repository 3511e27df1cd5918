"""The fully-convolutional domain discriminator of AdaptSegNet and ADVENT.

It looks at a per-pixel C-channel map (a softmax, or ADVENT's weighted self-information) and
scores each 32x32 neighbourhood as source (label 0) or target (label 1): a patch-level domain
classifier on the segmenter's *output* space, where source and target layouts are similar even
when their appearance is not.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class FCDiscriminator(nn.Module):
    """Five 4x4 convs with stride 2 and padding 1: C -> ndf -> 2ndf -> 4ndf -> 8ndf -> 1.

    LeakyReLU(0.2) after the first four, no normalization (as AdaptSegNet's ``FCDiscriminator``
    and ADVENT's ``get_fc_discriminator``).

    Shape:
        input:  (N, C, H, W), e.g. a softmax of logits upsampled to the image size.
        output: (N, 1, H/32, W/32) raw logits (no sigmoid; the loss takes logits), for H and W
                multiples of 32 (each conv maps a size s to floor(s/2) for even s).
    """

    MIN_SIZE = 32  # four halvings leave 2 pixels, the least the last 4x4 conv (padding 1) accepts

    def __init__(self, in_channels: int, ndf: int = 64):
        super().__init__()
        widths = [in_channels, ndf, ndf * 2, ndf * 4, ndf * 8]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1),
                       nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(widths[-1], 1, kernel_size=4, stride=2, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if min(x.shape[-2:]) < self.MIN_SIZE:
            raise ValueError(
                f"the domain discriminator needs maps of at least {self.MIN_SIZE}x{self.MIN_SIZE} pixels (five "
                f"stride-2 4x4 convs), got {tuple(x.shape[-2:])}: its input is the output upsampled to the "
                "image size, so use larger images or crops (data.*_size, augment.*.crop)")
        return self.layers(x)


class ASPPDiscriminator(nn.Module):
    """FCAN's domain discriminator on *features* (Zhang et al., CVPR 2018, Sec. 3.3): k parallel
    3x3 dilated convolutions (rates 1, 2, 3, 4 in the paper) of c channels each (c = 128) over
    the feature map, stacked to c*k channels, then a 1x1 convolution to one domain score per
    location (the paper's sigmoid is inside the BCE-with-logits loss).

    Our choice where the paper is silent: a LeakyReLU(0.2) on the stacked branches (as in
    AdaptSegNet's discriminator); without a nonlinearity the branches and the 1x1 conv would
    collapse into a single linear filter. Padding = rate keeps the size, so every feature cell
    gets a prediction; no stride, no normalization.

    Shape:
        input:  (N, C_in, h, w), e.g. the segmenter's ``features["backbone"]``.
        output: (N, 1, h, w) raw logits, P(target) = sigmoid.
    """

    def __init__(self, in_channels: int, channels: int = 128, rates: tuple[int, ...] = (1, 2, 3, 4)):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, channels, kernel_size=3, padding=rate, dilation=rate) for rate in rates)
        self.act = nn.LeakyReLU(0.2, inplace=True)
        self.classifier = nn.Conv2d(channels * len(rates), 1, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        stacked = torch.cat([branch(x) for branch in self.branches], dim=1)   # (N, c*k, h, w)
        return self.classifier(self.act(stacked))                             # (N, 1, h, w)
