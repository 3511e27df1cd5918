"""Images for TensorBoard and reports, drawn with torch alone (no plotting library).

Everything returns uint8 tensors (3, H, W), the layout ``SummaryWriter.add_image`` takes.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# A viridis-like ramp (dark purple -> blue -> teal -> green -> yellow): perceptually ordered
# and readable in greyscale; values in between are interpolated linearly.
COLORMAP_POINTS = torch.tensor([
    [68, 1, 84],
    [59, 82, 139],
    [33, 145, 140],
    [94, 201, 98],
    [253, 231, 37],
], dtype=torch.float32)


def to_uint8(images: Tensor) -> Tensor:
    """(..., 3, H, W) float in [0, 1] -> uint8 on the CPU (clamped, rounded); no gradient."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()

def side_by_side(images: list[Tensor]) -> Tensor:
    """(3, h_i, w_i) uint8 images -> one (3, H, sum w) row at the first image's height."""
    height = images[0].shape[-2]
    row = []
    for image in images:
        if image.shape[-2] != height:
            width = max(1, round(image.shape[-1] * height / image.shape[-2]))
            image = F.interpolate(image[None].float(), size=(height, width), mode="bilinear",
                                  align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        row.append(image)
    return torch.cat(row, dim=2)


def _as_tensor(array) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)) if isinstance(array, np.ndarray) else array


def _palette(colors: Sequence[Sequence[int]]) -> Tensor:
    palette = torch.as_tensor(colors, dtype=torch.uint8)
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"colors must be a sequence of (r, g, b), got shape {tuple(palette.shape)}")
    return palette


def colorize(labels, colors: Sequence[Sequence[int]], ignore_index: int = 255) -> Tensor:
    """labels: (H, W) train ids -> uint8 (3, H, W); ``ignore_index`` and unknown ids are black."""
    labels = _as_tensor(labels).cpu().long()
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got {tuple(labels.shape)}")
    palette = _palette(colors)
    known = (labels >= 0) & (labels < len(palette)) & (labels != ignore_index)
    image = torch.zeros(*labels.shape, 3, dtype=torch.uint8)
    image[known] = palette[labels[known]]
    return image.permute(2, 0, 1).contiguous()


def overlay(image, color, alpha: float = 0.5) -> Tensor:
    """Blends uint8 (3, H, W) ``color`` over ``image``: ``(1 - alpha) * image + alpha * color``."""
    image, color = _as_tensor(image).cpu(), _as_tensor(color).cpu()
    if image.shape != color.shape:
        raise ValueError(f"image {tuple(image.shape)} and colour map {tuple(color.shape)} differ")
    blend = (1 - alpha) * image.float() + alpha * color.float()
    return blend.round().clamp(0, 255).to(torch.uint8)


def panel(image, pred, gt, colors: Sequence[Sequence[int]], ignore_index: int = 255,
          alpha: float = 0.5) -> Tensor:
    """Input | prediction overlay | ground-truth overlay, side by side: uint8 (3, H, 3W).

    image: uint8 (3, h, w), resized to the label size (H, W) of ``pred`` and ``gt`` if needed.
    """
    image, pred, gt = _as_tensor(image).cpu(), _as_tensor(pred).cpu(), _as_tensor(gt).cpu()
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(gt.shape)} differ")
    if tuple(image.shape[-2:]) != tuple(gt.shape):
        image = F.interpolate(image[None].float(), size=tuple(gt.shape), mode="bilinear",
                              align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
    pred_view = overlay(image, colorize(pred, colors, ignore_index), alpha)
    gt_view = overlay(image, colorize(gt, colors, ignore_index), alpha)
    return torch.cat([image, pred_view, gt_view], dim=2)


def colormap(values) -> Tensor:
    """values: (...) in [0, 1] (clamped; NaN -> 0) -> uint8 (3, ...) on the viridis-like ramp."""
    values = torch.nan_to_num(_as_tensor(values).cpu().float(), nan=0.0).clamp(0, 1)
    position = values * (len(COLORMAP_POINTS) - 1)
    low = position.floor().long().clamp(max=len(COLORMAP_POINTS) - 2)
    frac = (position - low).unsqueeze(-1)
    rgb = COLORMAP_POINTS[low] * (1 - frac) + COLORMAP_POINTS[low + 1] * frac  # (..., 3)
    return rgb.round().to(torch.uint8).movedim(-1, 0).contiguous()


def confusion_image(confusion, cell: int = 12) -> Tensor:
    """(C, C) counts (rows = ground truth) -> uint8 (3, C*cell, C*cell) heatmap of each row
    normalized to sum 1, i.e. where each true class's pixels went; empty rows are dark."""
    confusion = _as_tensor(confusion).cpu().double()
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be square (C, C), got {tuple(confusion.shape)}")
    rows = confusion.sum(1, keepdim=True)
    normalized = torch.where(rows > 0, confusion / rows.clamp_min(1), torch.zeros_like(confusion))
    heat = colormap(normalized)  # (3, C, C)
    return heat.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2)


def embedding_scatter(points, groups, colors: Sequence[Sequence[int]], size: int = 256,
                      dot: int = 1, margin: int = 8) -> Tensor:
    """2-D embedding (e.g. t-SNE of source vs target features) -> uint8 (3, size, size).

    points: (M, 2) x, y; groups: (M,) int index into ``colors``. White background, each point a
    (2*dot+1)^2 square; both axes share one scale so distances are not distorted. Points are
    drawn in a fixed shuffled order so no group systematically hides another.
    """
    points = _as_tensor(points).cpu().double()
    groups = _as_tensor(groups).cpu().long()
    if points.ndim != 2 or points.shape[1] != 2 or groups.shape != points.shape[:1]:
        raise ValueError(f"points must be (M, 2) and groups (M,), got {tuple(points.shape)} "
                         f"and {tuple(groups.shape)}")
    palette = _palette(colors)
    if len(groups) and (int(groups.min()) < 0 or int(groups.max()) >= len(palette)):
        raise ValueError(f"groups must index colors [0, {len(palette)}), got range "
                         f"[{int(groups.min())}, {int(groups.max())}]")
    canvas = torch.full((3, size, size), 255, dtype=torch.uint8)
    if len(points) == 0:
        return canvas
    low, high = points.min(0).values, points.max(0).values
    span = float((high - low).max()) or 1.0
    usable = size - 1 - 2 * min(margin, (size - 1) // 4)
    centre = (low + high) / 2
    pixels = ((points - centre) / span * usable + (size - 1) / 2).round().long()
    cols, rows = pixels[:, 0], size - 1 - pixels[:, 1]  # y grows upwards in the plot
    order = torch.randperm(len(points), generator=torch.Generator().manual_seed(0))
    cols, rows, point_colors = cols[order], rows[order], palette[groups[order]].T  # (3, M)
    for dy in range(-dot, dot + 1):
        for dx in range(-dot, dot + 1):
            canvas[:, (rows + dy).clamp(0, size - 1), (cols + dx).clamp(0, size - 1)] = point_colors
    return canvas
