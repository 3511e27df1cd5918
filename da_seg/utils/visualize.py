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


# ---------------------------------------------------------------- labelled figures (Pillow text)
# TensorBoard shows an image as it is: what a reader needs to read it (class names, axes, a colour
# scale, column captions, legends) has to be drawn into the pixels.
TEXT_COLOR = (20, 20, 20)
BACKGROUND = (255, 255, 255)


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow's own scalable font: no font file to find


def _to_pil(image: Tensor):
    from PIL import Image

    return Image.fromarray(_as_tensor(image).cpu().permute(1, 2, 0).contiguous().numpy())


def _from_pil(picture) -> Tensor:
    return torch.from_numpy(np.array(picture.convert("RGB"))).permute(2, 0, 1).contiguous()


def _text_size(draw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` shortened with "…" until it fits ``width`` pixels."""
    if _text_size(draw, text, font)[0] <= width:
        return text
    while len(text) > 1 and _text_size(draw, text + "…", font)[0] > width:
        text = text[:-1]
    return text + "…"


def caption_columns(image, captions: Sequence[str], font_size: int = 12, pad: int = 4) -> Tensor:
    """A white band above uint8 (3, H, W) ``image`` with one centred caption per equal-width
    column (e.g. "input | prediction | ground truth"): uint8 (3, H + band, W)."""
    from PIL import Image, ImageDraw

    image = _as_tensor(image).cpu()
    width = image.shape[-1]
    font = _font(font_size)
    band = font_size + 2 * pad
    canvas = Image.new("RGB", (width, image.shape[-2] + band), BACKGROUND)
    canvas.paste(_to_pil(image), (0, band))
    draw = ImageDraw.Draw(canvas)
    column = width / max(len(captions), 1)
    for i, caption in enumerate(captions):
        text = _fit(draw, caption, font, int(column) - 2)
        text_width = _text_size(draw, text, font)[0]
        draw.text((round(i * column + (column - text_width) / 2), pad), text, fill=TEXT_COLOR, font=font)
    return _from_pil(canvas)


def legend(names: Sequence[str], colors: Sequence[Sequence[int]], width: int, font_size: int = 12,
           pad: int = 4) -> Tensor:
    """Colour swatches with their names, wrapped into rows ``width`` pixels wide: uint8 (3, h, width)."""
    from PIL import Image, ImageDraw

    palette = _palette(colors).tolist()
    font = _font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    swatch, row_height = font_size, font_size + 2 * pad
    entries, x, y = [], pad, 0
    for name, color in zip(names, palette):
        text = _fit(measure, str(name), font, width - swatch - 3 * pad)
        entry_width = swatch + pad + _text_size(measure, text, font)[0] + 3 * pad
        if x > pad and x + entry_width > width:
            x, y = pad, y + row_height
        entries.append((x, y, text, tuple(color)))
        x += entry_width
    canvas = Image.new("RGB", (width, y + row_height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for x, y, text, color in entries:
        draw.rectangle([x, y + pad, x + swatch - 1, y + pad + swatch - 1], fill=color, outline=TEXT_COLOR)
        draw.text((x + swatch + pad, y + pad), text, fill=TEXT_COLOR, font=font)
    return _from_pil(canvas)


def stack_rows(images: Sequence[Tensor]) -> Tensor:
    """uint8 (3, h_i, w_i) images one under the other on white, left-aligned: (3, sum h, max w)."""
    images = [_as_tensor(image).cpu() for image in images]
    width = max(image.shape[-1] for image in images)
    rows = []
    for image in images:
        if image.shape[-1] < width:
            fill = torch.full((3, image.shape[-2], width - image.shape[-1]), 255, dtype=torch.uint8)
            image = torch.cat([image, fill], dim=2)
        rows.append(image)
    return torch.cat(rows, dim=1)


def labelled_panels(rows: Sequence[Tensor], class_names: Sequence[str], colors: Sequence[Sequence[int]],
                    captions: Sequence[str] = ("input", "prediction", "ground truth")) -> Tensor:
    """:func:`panel` rows stacked, with column captions above and a class colour legend below."""
    body = caption_columns(torch.cat(list(rows), dim=1), captions)
    return stack_rows([body, legend(class_names, colors, width=body.shape[-1])])


def labelled_confusion(confusion, class_names: Sequence[str], cell: int = 16, font_size: int = 11,
                       title: str = "") -> Tensor:
    """:func:`confusion_image` with axes: true classes (rows) named on the left, predicted classes
    (columns) named on top (vertical text), axis titles, and a 0..1 colour scale of the row
    fractions on the right. Returns uint8 (3, H, W) with the heatmap at its natural cell size."""
    from PIL import Image, ImageDraw

    heat = _to_pil(confusion_image(confusion, cell=cell))
    classes = heat.width // cell
    names = [str(n) for n in class_names][:classes] + [str(i) for i in range(len(class_names), classes)]
    font = _font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, line = 4, font_size + 4
    label_width = max(_text_size(measure, n, font)[0] for n in names) + pad
    title_line = line if title else 0
    left = line + label_width + pad              # "true class" title (vertical) + row names
    top = title_line + line + label_width + pad  # title + "predicted class" + column names
    bar_width, scale_width = 12, 3 * pad + 12 + _text_size(measure, "1.0", font)[0] + pad
    canvas = Image.new("RGB", (left + heat.width + scale_width, top + heat.height + pad), BACKGROUND)
    canvas.paste(heat, (left, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 2), _fit(draw, title, font, canvas.width - 2 * pad), fill=TEXT_COLOR, font=font)
    axis = "predicted class"
    draw.text((left + max(0, (heat.width - _text_size(draw, axis, font)[0]) // 2), title_line), axis,
              fill=TEXT_COLOR, font=font)
    for i, name in enumerate(names):
        text_width, text_height = _text_size(draw, name, font)
        draw.text((left - pad - text_width, top + i * cell + (cell - text_height) // 2 - 2), name,
                  fill=TEXT_COLOR, font=font)
        # column names: drawn horizontally on a strip, then turned to read bottom-up
        strip = Image.new("RGB", (label_width, line), BACKGROUND)
        ImageDraw.Draw(strip).text((label_width - pad - text_width, 0), name, fill=TEXT_COLOR, font=font)
        strip = strip.rotate(90, expand=True)
        canvas.paste(strip, (left + i * cell + (cell - line) // 2, title_line + line))
    true_axis = Image.new("RGB", (max(heat.height, _text_size(draw, "true class", font)[0] + 2), line), BACKGROUND)
    ImageDraw.Draw(true_axis).text((max(0, (true_axis.width - _text_size(draw, "true class", font)[0]) // 2), 0),
                                   "true class", fill=TEXT_COLOR, font=font)
    canvas.paste(true_axis.rotate(90, expand=True), (0, top))
    # colour scale: 1.0 at the top, 0.0 at the bottom, as the ramp of confusion_image
    x0 = left + heat.width + 2 * pad
    ramp = colormap(torch.linspace(1, 0, heat.height)[:, None].expand(heat.height, bar_width))
    canvas.paste(_to_pil(ramp), (x0, top))
    draw.rectangle([x0 - 1, top - 1, x0 + bar_width, top + heat.height], outline=TEXT_COLOR)
    for value, y in ((1.0, top), (0.5, top + heat.height // 2), (0.0, top + heat.height - font_size)):
        draw.text((x0 + bar_width + pad, y), f"{value:.1f}", fill=TEXT_COLOR, font=font)
    return _from_pil(canvas)


def with_legend(image, names: Sequence[str], colors: Sequence[Sequence[int]], title: str = "") -> Tensor:
    """uint8 (3, H, W) ``image`` (e.g. :func:`embedding_scatter`) with an optional title line above
    and a legend of its colours below."""
    image = _as_tensor(image).cpu()
    parts = [caption_columns(image, [title])] if title else [image]
    return stack_rows(parts + [legend(names, colors, width=image.shape[-1])])
