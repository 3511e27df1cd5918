"""Sliding windows over an image: shared by sliding-window evaluation and tiled translation."""
from __future__ import annotations


def check_windows(crop: tuple[int, int], stride: tuple[int, int]) -> None:
    """Refuse sliding-window settings that cannot cover an image: sizes must be positive and
    the stride at most the crop along each axis (a wider step leaves a gap between windows,
    whose pixels would be scored with no prediction behind them)."""
    if any(v <= 0 for v in (*crop, *stride)):
        raise ValueError(f"crop {tuple(crop)} and stride {tuple(stride)} must be positive")
    if any(step > window for window, step in zip(crop, stride)):
        raise ValueError(f"eval.stride {tuple(stride)} is larger than eval.crop {tuple(crop)}: pixels "
                         f"between windows would never be predicted")


def sliding_windows(size: tuple[int, int], crop: tuple[int, int],
                    stride: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Windows ``(top, left, bottom, right)`` of ``crop`` (clipped to ``size``) every ``stride``.

    The last window in each direction is shifted back to end at the border and the stride is
    at most the crop (:func:`check_windows`), so every pixel is covered whatever the image
    size; all windows have the same shape.
    """
    check_windows(crop, stride)
    axes = []
    for length, window, step in zip(size, crop, stride):
        window = min(window, length)
        count = -(-(length - window) // step) + 1  # ceil division
        axes.append((sorted({min(i * step, length - window) for i in range(count)}), window))
    (tops, crop_h), (lefts, crop_w) = axes
    return [(y, x, y + crop_h, x + crop_w) for y in tops for x in lefts]
