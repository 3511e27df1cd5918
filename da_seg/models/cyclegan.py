"""CycleGAN's networks (Zhu et al., ICCV 2017; the junyanz/pytorch-CycleGAN-and-pix2pix release).

- ``ResnetGenerator``: an image-to-image network, down 4x, residual blocks, up 4x, tanh output.
- ``PatchDiscriminator``: the 70x70 PatchGAN, one real/fake score per overlapping patch.
- ``ImagePool``: the history of generated images the discriminators are trained on.
- ``translate``: full-resolution inference, whole or in overlapping blended tiles.

Images are in [-1, 1] inside this module (the release's ``Normalize(0.5, 0.5)``); the rest of
da_seg works in [0, 1], so callers convert with ``x * 2 - 1`` and ``(y + 1) / 2``.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from da_seg.utils.windows import sliding_windows


def _norm(channels: int) -> nn.Module:
    # The release's "instance" norm: no affine parameters, no running statistics (so train and
    # eval mode compute the same thing: statistics of the image at hand).
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class ResidualBlock(nn.Module):
    """[ReflPad1, conv3, IN, ReLU, ReflPad1, conv3, IN] + skip; (N, C, h, w) -> (N, C, h, w)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), _norm(channels), nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), _norm(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """ReflPad3 + conv7 (ngf) + IN + ReLU; 2x [conv3 s2, IN, ReLU] -> 2ngf, 4ngf; ``n_blocks``
    residual blocks at 4ngf; 2x [ConvTranspose3 s2 p1 op1, IN, ReLU] -> 2ngf, ngf; ReflPad3 +
    conv7 -> 3, tanh. Convolutions have biases (the norm has no affine part). 11.378M parameters
    at ngf 64 with 9 blocks (the release's ``resnet_9blocks``), 7.838M with 6.

    Shape:
        input:  (N, 3, H, W) in [-1, 1], H and W multiples of 4 (``translate`` pads any size).
        output: (N, 3, H, W) in [-1, 1].
    """

    def __init__(self, ngf: int = 64, n_blocks: int = 9, channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(channels, ngf, 7), _norm(ngf),
                                   nn.ReLU(inplace=True)]
        width = ngf
        for _ in range(2):  # (N, ngf, H, W) -> (N, 4ngf, H/4, W/4)
            layers += [nn.Conv2d(width, width * 2, 3, stride=2, padding=1), _norm(width * 2), nn.ReLU(inplace=True)]
            width *= 2
        layers += [ResidualBlock(width) for _ in range(n_blocks)]
        for _ in range(2):  # back to (N, ngf, H, W)
            layers += [nn.ConvTranspose2d(width, width // 2, 3, stride=2, padding=1, output_padding=1),
                       _norm(width // 2), nn.ReLU(inplace=True)]
            width //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(width, channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        init_normal(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """The 70x70 PatchGAN: conv4 s2 (ndf, no norm) + LReLU(0.2); conv4 s2 (2ndf), conv4 s2 (4ndf),
    conv4 s1 (8ndf), each + IN + LReLU(0.2); conv4 s1 -> 1. Padding 1 throughout; 2.765M
    parameters at ndf 64. Scores are raw (LSGAN: mean squared error against 1 / 0).

    Shape:
        input:  (N, 3, H, W) in [-1, 1].
        output: (N, 1, H/8 - 2, W/8 - 2) for H, W multiples of 8 (30 x 30 for 256 x 256); each
                score sees a 70 x 70 receptive field.
    """

    def __init__(self, ndf: int = 64, channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        widths = [ndf, ndf * 2, ndf * 4, ndf * 8]
        for c_in, c_out, stride in zip(widths[:-1], widths[1:], (2, 2, 1)):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1), _norm(c_out),
                       nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)
        init_normal(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    """The release's ``init_weights(net, 'normal', 0.02)``: conv weights N(0, std), biases 0;
    affine norms (none here by default) N(1, std) and 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


class ImagePool:
    """The last ``size`` generated images; the discriminator trains on a mix of new and old fakes
    (Shrivastava et al. 2017), which damps oscillation between G and D.

    ``query``: per image, while the pool is not full it is stored and returned; afterwards, with
    probability 1/2 a random stored image is returned and replaced by the new one, else the new
    one is returned. ``size = 0`` returns the batch unchanged. Randomness comes from Python's
    ``random`` (restored with the rest of the RNG state on resume).
    """

    def __init__(self, size: int = 50):
        self.size = size
        self.images: list[Tensor] = []

    def query(self, images: Tensor) -> Tensor:
        """images: (N, 3, H, W), detached -> (N, 3, H, W)."""
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif random.random() < 0.5:
                index = random.randrange(self.size)
                out.append(self.images[index].clone())
                self.images[index] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, dim=0)

    def state_dict(self) -> dict:
        return {"images": [image.cpu() for image in self.images]}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.images = [image.to(device) for image in state["images"]]


def _pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, int, int]:
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h or pad_w:
        mode = "reflect" if min(height, width) > max(pad_h, pad_w) else "replicate"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    return x, height, width


def _run_whole(generator: nn.Module, x: Tensor) -> Tensor:
    padded, height, width = _pad_to_multiple(x, 4)
    return generator(padded)[..., :height, :width]


def _ramp(length: int, overlap: int, ramp_start: bool, ramp_end: bool, device) -> Tensor:
    """1-D blending weights of a window: linear from ~0 to 1 over ``overlap`` pixels at each end
    that borders another window, 1 at the image border (nothing to blend with there)."""
    weight = torch.ones(length, device=device)
    if overlap > 0:
        rise = (torch.arange(overlap, device=device, dtype=torch.float32) + 0.5) / overlap
        n = min(overlap, length)
        if ramp_start:
            weight[:n] = torch.minimum(weight[:n], rise[:n])
        if ramp_end:
            weight[length - n:] = torch.minimum(weight[length - n:], rise[:n].flip(0))
    return weight


@torch.no_grad()
def translate(generator: nn.Module, images: Tensor, tile: int = 0, overlap: int = 0) -> Tensor:
    """Translate images of any size at full resolution.

    images: (N, 3, H, W) in [0, 1] -> (N, 3, H, W) in [0, 1].
    tile = 0, or an image no larger than ``tile`` in both directions: one fully-convolutional pass
    (the input reflection-padded to a multiple of 4). Otherwise ``tile`` x ``tile`` windows every
    ``tile - overlap`` pixels (the last ones shifted back to the border), each translated on its
    own and blended with weights that ramp linearly across the overlaps, so that no seam shows
    where the per-window instance-norm statistics differ.
    """
    x = images.float() * 2 - 1
    height, width = x.shape[-2:]
    if tile <= 0 or (height <= tile and width <= tile):
        return (_run_whole(generator, x).float() + 1) / 2
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be in [0, tile = {tile})")
    step = tile - overlap
    out = torch.zeros_like(x)
    total = torch.zeros(1, 1, height, width, device=x.device)
    for top, left, bottom, right in sliding_windows((height, width), (tile, tile), (step, step)):
        window = _run_whole(generator, x[..., top:bottom, left:right]).float()
        weight = (_ramp(bottom - top, overlap, top > 0, bottom < height, x.device)[:, None]
                  * _ramp(right - left, overlap, left > 0, right < width, x.device)[None, :])
        out[..., top:bottom, left:right] += window * weight
        total[..., top:bottom, left:right] += weight
    return (out / total + 1) / 2
