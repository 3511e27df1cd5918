"""Multi-view target batches for SAC (Araslanov & Roth, CVPR 2021): the views, their exact
inverse warps, and the teacher's predictions pooled over the views of one image.

Coordinates are ``affine_grid``'s normalized ones, x and y in [-1, 1] over the image, with
``align_corners=False`` everywhere (pixel centres at -1 + (2i + 1) / size). A view of an image is
its horizontal flip (f = +-1) followed by a crop of half-size s (zoom: the crop covers s of each
side) centred at c, resized back to the image size. The view's pixel at q shows the image point
    p = (f (s q_x + c_x), s q_y + c_y),
so ``to_view`` = [[f s, 0, f c_x], [0, s, c_y]] is the ``affine_grid`` matrix that warps an image
(or a map in the image's frame, "the reference") into the view, and ``to_reference``, its exact
inverse [[f / s, 0, -c_x / s], [0, 1 / s, -c_y / s]], warps the view's maps back to the reference
frame (zero outside the crop). The official code builds the same pair in
``datasets/dataloader_target.py`` (``_get_affine`` / ``_get_affine_inv``, rotation 0); it crops
and resizes with PIL on the CPU where we resample the batch on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Views:
    """``images``: (G * V, 3, H, W), the V views of each of G images, image-major (views of image g
    are rows g V .. g V + V - 1); ``to_view`` / ``to_reference``: (G * V, 2, 3) each."""

    images: Tensor
    to_view: Tensor
    to_reference: Tensor
    views: int


def view_matrices(flip: Tensor, scale: Tensor, centre: Tensor) -> tuple[Tensor, Tensor]:
    """(to_view, to_reference), (N, 2, 3) each, from flips (N,) of +-1, zooms s (N,) in (0, 1] and
    crop centres c (N, 2) as (x, y) in normalized coordinates."""
    n = flip.shape[0]
    to_view = torch.zeros(n, 2, 3, dtype=torch.float64, device=flip.device)
    to_view[:, 0, 0] = flip * scale
    to_view[:, 0, 2] = flip * centre[:, 0]
    to_view[:, 1, 1] = scale
    to_view[:, 1, 2] = centre[:, 1]
    return to_view.float(), invert_affine(to_view).float()


def invert_affine(theta: Tensor) -> Tensor:
    """(N, 2, 3) -> (N, 2, 3): the inverse map [A^-1, -A^-1 b] of p -> A p + b (in float64)."""
    a, b = theta[:, :, :2].double(), theta[:, :, 2:].double()
    a_inv = torch.linalg.inv(a)
    return torch.cat([a_inv, -a_inv @ b], dim=2)


def compose_affine(outer: Tensor, inner: Tensor) -> Tensor:
    """The matrix of p -> outer(inner(p)); (N, 2, 3) each."""
    a = outer[:, :, :2] @ inner[:, :, :2]
    b = outer[:, :, :2] @ inner[:, :, 2:] + outer[:, :, 2:]
    return torch.cat([a, b], dim=2)


def warp(maps: Tensor, theta: Tensor) -> Tensor:
    """(N, C, H, W) maps resampled (bilinear, zero outside) through ``affine_grid(theta)``, same size:
    output pixel at q takes the input at theta [q; 1]."""
    grid = F.affine_grid(theta.to(maps.dtype), list(maps.shape), align_corners=False)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_views(images: Tensor, views: int, zoom: tuple[float, float], flip: bool,
                 generator: torch.Generator | None = None) -> Views:
    """``views`` views of each image of (G, 3, H, W): view 0 the whole image (flipped with p 0.5
    when ``flip``), the others flipped likewise and zoomed in by s ~ U(zoom) at a uniformly random
    crop position (official: ``GuidedRandHFlip`` then ``MaskRandScaleCrop``, which leaves copy 0
    unzoomed)."""
    g = images.shape[0]
    n, device = g * views, images.device
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=device, dtype=torch.float64)  # noqa: E731
    flips = torch.where(rand(n) < 0.5, -1.0, 1.0) if flip else torch.ones(n, dtype=torch.float64, device=device)
    scale = zoom[0] + (zoom[1] - zoom[0]) * rand(n)
    scale = scale.view(g, views)
    scale[:, 0] = 1.0                                          # the reference view is not zoomed
    scale = scale.flatten()
    centre = (2 * rand(n, 2) - 1) * (1 - scale)[:, None]      # the crop stays inside the image
    to_view, to_reference = view_matrices(flips, scale, centre)
    repeated = images.repeat_interleave(views, dim=0)
    return Views(images=warp(repeated, to_view), to_view=to_view, to_reference=to_reference, views=views)


def pool_views(probs: Tensor, to_view: Tensor, to_reference: Tensor, views: int,
               tolerance: float = 0.1) -> Tensor:
    """The teacher's class probabilities of every view (G * V, C, H, W) averaged over the views of
    each image in the reference frame, then warped back into each view (official ``_refine`` with
    ``_avg_pool``). A reference pixel averages the views that cover it (a view's warped
    probabilities sum to its coverage there: 1 inside, fractions on the crop's rim); pixels
    covered less than ``tolerance`` are zero, so they get no pseudo-label."""
    n, c, h, w = probs.shape
    aligned = warp(probs, to_reference).view(n // views, views, c, h, w)
    summed = aligned.sum(1)                                    # (G, C, H, W)
    coverage = summed.sum(1, keepdim=True)                     # (G, 1, H, W): views covering the pixel
    mean = summed / coverage.clamp_min(1e-3)
    valid = (coverage > tolerance).to(probs.dtype)
    back = warp(mean.repeat_interleave(views, dim=0), to_view)
    return back * warp(valid.repeat_interleave(views, dim=0), to_view)
