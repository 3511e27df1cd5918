import numpy as np
import torch

from da_seg.utils.visualize import (COLORMAP_POINTS, colorize, colormap, confusion_image,
                                     embedding_scatter, overlay, panel)

COLORS = [(128, 64, 128), (244, 35, 232), (70, 70, 70)]


def test_colorize_maps_ids_to_colors_and_ignore_to_black():
    labels = torch.tensor([[0, 1, 2], [255, 7, 0]])
    image = colorize(labels, COLORS)
    assert image.dtype == torch.uint8 and image.shape == (3, 2, 3)
    assert image[:, 0, 0].tolist() == [128, 64, 128]
    assert image[:, 0, 2].tolist() == [70, 70, 70]
    assert image[:, 1, 0].tolist() == [0, 0, 0]  # ignore
    assert image[:, 1, 1].tolist() == [0, 0, 0]  # id without a colour
    assert torch.equal(colorize(labels.numpy().astype(np.uint8), COLORS), image)


def test_overlay_and_panel_layout():
    image = torch.full((3, 4, 5), 100, dtype=torch.uint8)
    color = torch.full((3, 4, 5), 200, dtype=torch.uint8)
    assert overlay(image, color, alpha=0.25).unique().tolist() == [125]
    pred = torch.zeros(4, 5, dtype=torch.long)
    gt = torch.full((4, 5), 255)
    view = panel(image, pred, gt, COLORS)
    assert view.shape == (3, 4, 15) and view.dtype == torch.uint8
    assert torch.equal(view[:, :, :5], image)
    assert view[:, 0, 5].tolist() == [114, 82, 114]  # halfway to road colour
    assert view[:, 0, 10].tolist() == [50, 50, 50]  # ignore darkens
    small = panel(torch.zeros(3, 2, 3, dtype=torch.uint8), pred, gt, COLORS)
    assert small.shape == (3, 4, 15)


def test_confusion_image_is_row_normalized_heatmap():
    confusion = torch.tensor([[10, 0, 0], [0, 3, 0], [0, 0, 0]])
    heat = confusion_image(confusion, cell=4)
    assert heat.shape == (3, 12, 12) and heat.dtype == torch.uint8
    top, bottom = COLORMAP_POINTS[-1].byte().tolist(), COLORMAP_POINTS[0].byte().tolist()
    assert heat[:, 0, 0].tolist() == top and heat[:, 5, 5].tolist() == top
    assert heat[:, 0, 5].tolist() == bottom and heat[:, 10, 10].tolist() == bottom  # empty row
    assert torch.equal(heat[:, :4, :4], heat[:, :1, :1].expand(3, 4, 4))
    middle = colormap(torch.tensor([0.5]))
    assert middle[:, 0].tolist() == COLORMAP_POINTS[2].byte().tolist()


def test_embedding_scatter_draws_every_group_on_white():
    points = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 0.2], [0.9, 0.1]])
    groups = torch.tensor([0, 1, 1, 2])
    image = embedding_scatter(points, groups, COLORS, size=32)
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    pixels = {tuple(p) for p in image.reshape(3, -1).T.tolist()}
    assert pixels == {(255, 255, 255), *COLORS}
    # y grows upwards: the point at (0, 0) is in the lower-left corner
    assert image[:, 31 - 8, 8].tolist() == list(COLORS[0])
