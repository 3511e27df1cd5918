"""Batch augmentation on the training device.

Decoding and resizing happen in CPU loader workers; everything random happens here, on whole
batches on the GPU: one affine resample does scale jitter, crop and flip for images and labels
together, then kornia applies photometric changes to the images only.

Labels are resampled nearest-neighbour and padded with the ignore index. (kornia and
``grid_sample`` pad with 0, which is a real class: road in Cityscapes train ids. We sample
``label + 1`` so that 0 can only mean "outside the image", then map it to ignore.)
"""
from __future__ import annotations

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import Tensor

from da_seg.config import AugmentConfig

IGNORE_INDEX = 255


def to_float_images(images: Tensor) -> Tensor:
    """uint8 (N, 3, H, W) -> float (N, 3, H, W) in [0, 1]."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def random_geometry(images: Tensor, labels: Tensor | None, crop: tuple[int, int] | None,
                    scale: tuple[float, float], flip: bool,
                    generator: torch.Generator | None = None, mask: Tensor | None = None):
    """Per-sample random rescale, crop (padded with ignore) and horizontal flip.

    images: (N, 3, H, W) float; labels: (N, H, W) int64 or None.
    Returns images (N, 3, h, w) and labels (N, h, w) with (h, w) = crop or (H, W); with a
    ``mask`` (N, H, W) bool, also the mask through the same geometry (False where padded).
    """
    n, _, height, width = images.shape
    out_h, out_w = crop if crop is not None else (height, width)
    device = images.device
    if mask is not None:  # the mask rides along as a label map: 1 = True, 0 = False, ignore = padding
        labels_and_mask = mask.long() if labels is None else labels + 256 * mask.long()
        images, moved = random_geometry(images, labels_and_mask, crop, scale, flip, generator)
        if labels is None:
            return images, None, moved == 1
        padded = moved == IGNORE_INDEX
        return images, torch.where(padded, moved, moved % 256), (moved >= 256) & ~padded
    if (out_h, out_w) == (height, width) and tuple(scale) == (1.0, 1.0):
        return _random_flip(images, labels, generator) if flip else (images, labels)
    lo, hi = scale
    s = lo + (hi - lo) * torch.rand(n, device=device, generator=generator)
    scaled_h, scaled_w = s * height, s * width
    # Offset of the crop window in the rescaled image; negative = the image is smaller than the
    # crop and lands at a random place inside it, the rest padded.
    oy = _uniform_between(scaled_h - out_h, generator, device)
    ox = _uniform_between(scaled_w - out_w, generator, device)
    # Map normalized output coordinates to normalized input coordinates (align_corners=False):
    # x_in = (out_w / (s W)) x_out + (2 ox + out_w) / (s W) - 1, mirrored when flipped.
    ax, bx = out_w / scaled_w, (2 * ox + out_w) / scaled_w - 1
    ay, by = out_h / scaled_h, (2 * oy + out_h) / scaled_h - 1
    if flip:
        sign = torch.where(torch.rand(n, device=device, generator=generator) < 0.5, -1.0, 1.0)
        ax, bx = ax * sign, bx * sign
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = ax, bx
    theta[:, 1, 1], theta[:, 1, 2] = ay, by
    grid = F.affine_grid(theta, [n, 1, out_h, out_w], align_corners=False)
    images = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    if labels is not None:
        shifted = (labels + 1).unsqueeze(1).float()
        sampled = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        sampled = sampled.squeeze(1).round().long()
        labels = torch.where(sampled == 0, torch.full_like(sampled, IGNORE_INDEX), sampled - 1)
    return images, labels


def _random_flip(images: Tensor, labels: Tensor | None,
                 generator: torch.Generator | None) -> tuple[Tensor, Tensor | None]:
    """Mirror each sample with probability 1/2: an exact copy, no resampling."""
    mirror = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    images = torch.where(mirror.view(-1, 1, 1, 1), images.flip(-1), images)
    if labels is not None:
        labels = torch.where(mirror.view(-1, 1, 1), labels.flip(-1), labels)
    return images, labels


def _uniform_between(limit: Tensor, generator: torch.Generator | None, device) -> Tensor:
    """Uniform in [min(0, limit), max(0, limit)], per element."""
    u = torch.rand(limit.shape, device=device, generator=generator)
    return torch.minimum(limit, torch.zeros_like(limit)) + u * limit.abs()


class PhotometricAugment(torch.nn.Module):
    """Colour jitter, Gaussian blur and grayscale on float images in [0, 1] (kornia, per sample)."""

    def __init__(self, cfg: AugmentConfig):
        super().__init__()
        ops = []
        if any(v > 0 for v in (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)):
            ops.append(K.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=cfg.color_p))
        if cfg.grayscale_p > 0:
            ops.append(K.RandomGrayscale(p=cfg.grayscale_p))
        if cfg.blur_p > 0:
            # Kernel large enough for the biggest sigma (~ +-2 sigma), odd.
            kernel = 2 * int(round(2 * cfg.blur_sigma[1])) + 1
            ops.append(K.RandomGaussianBlur((kernel, kernel), cfg.blur_sigma, p=cfg.blur_p))
        self.ops = torch.nn.Sequential(*ops)

    @property
    def active(self) -> bool:
        return len(self.ops) > 0

    def forward(self, images: Tensor) -> Tensor:
        if not self.active:
            return images
        return self.ops(images).clamp_(0.0, 1.0)


def check_crop_fits(crop: tuple[int, int], scale: tuple[float, float], size: tuple[int, int],
                    domain: str = "") -> None:
    """Refuse a crop that is larger than the image even at the largest rescale factor.

    ``size`` is the (H, W) of the images as loaded (``data.<domain>_size``, else the files'
    size). The crop is taken after the random rescale, so it only has to fit the image at
    ``max(scale)``: then some crops lie wholly inside the image, and the padding that smaller
    factors bring is the intended scale jitter (as in mmseg's resize + crop + pad). A crop
    larger than ``size * max(scale)`` pads every sample: training on ignored labels and black
    borders, which is never what a recipe means.
    """
    top = max(scale)
    if crop[0] > size[0] * top or crop[1] > size[1] * top:
        key = f"augment.{domain}.crop" if domain else "the augmentation crop"
        size_key = f"data.{domain}_size" if domain else "load size"
        at_top = f", {size[0] * top:g}x{size[1] * top:g} at the largest scale {top:g}" if top != 1 else ""
        raise ValueError(
            f"{key} {list(crop)} (HxW) is larger than the {size[0]}x{size[1]} images it is applied to"
            f"{at_top}: every crop would be partly padding. Use a smaller crop, a larger {size_key}, or a "
            f"larger scale."
        )


class BatchAugment(torch.nn.Module):
    """One domain's augmentation: uint8 batch -> float images in [0, 1] (+ aligned labels).

    ``domain`` ("source", "target") names the recipe keys in error messages.
    """

    def __init__(self, cfg: AugmentConfig, domain: str = ""):
        super().__init__()
        self.cfg = cfg
        self.domain = domain
        self.photometric = PhotometricAugment(cfg)
        self.geometric = cfg.crop is not None or cfg.flip or tuple(cfg.scale) != (1.0, 1.0)

    def forward(self, images: Tensor, labels: Tensor | None = None, mask: Tensor | None = None):
        """images: (N, 3, H, W) uint8; labels: (N, H, W) int64 or None -> (images, labels); with a
        ``mask`` (N, H, W) bool -> (images, labels, mask), the mask cropped and flipped as the labels."""
        if self.cfg.crop is not None:  # shapes are host ints: no device sync
            check_crop_fits(self.cfg.crop, self.cfg.scale, tuple(images.shape[-2:]), self.domain)
        images = to_float_images(images)
        if mask is not None:
            if self.geometric:
                images, labels, mask = random_geometry(images, labels, self.cfg.crop, self.cfg.scale,
                                                       self.cfg.flip, mask=mask)
            return self.photometric(images), labels, mask
        if self.geometric:
            images, labels = random_geometry(images, labels, self.cfg.crop, self.cfg.scale, self.cfg.flip)
        return self.photometric(images), labels
