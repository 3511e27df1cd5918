"""Sliding windows over an image: shared by sliding-window evaluation and tiled translation."""
from __future__ import annotations


def sliding_windows(size: tuple[int, int], crop: tuple[int, int],
                    stride: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Windows ``(top, left, bottom, right)`` of ``crop`` (clipped to ``size``) every ``stride``.

    The last window in each direction is shifted back to end at the border, so every pixel
    is covered whatever the image size; all windows have the same shape.
    """
    axes = []
    for length, window, step in zip(size, crop, stride):
        if window <= 0 or step <= 0:
            raise ValueError(f"crop {tuple(crop)} and stride {tuple(stride)} must be positive")
        window = min(window, length)
        count = -(-(length - window) // step) + 1  # ceil division
        axes.append((sorted({min(i * step, length - window) for i in range(count)}), window))
    (tops, crop_h), (lefts, crop_w) = axes
    return [(y, x, y + crop_h, x + crop_w) for y in tops for x in lefts]
