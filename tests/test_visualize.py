import numpy as np
import torch

from da_seg.utils.visualize import (COLORMAP_POINTS, caption_columns, colorize, colormap, confusion_image,
                                     embedding_scatter, labelled_confusion, labelled_panels, legend, overlay,
                                     panel, with_legend)

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


def _dark(image) -> torch.Tensor:
    """(H, W) bool: pixels dark enough to be text."""
    return image.int().sum(0) < 3 * 100


def test_caption_columns_draws_each_caption_above_its_column_and_keeps_the_image():
    image = torch.full((3, 20, 90), 200, dtype=torch.uint8)
    captioned = caption_columns(image, ["input", "", "label"], font_size=12, pad=4)
    band = 12 + 2 * 4
    assert captioned.shape == (3, 20 + band, 90) and captioned.dtype == torch.uint8
    assert torch.equal(captioned[:, band:], image)
    text = _dark(captioned[:, :band])
    assert text[:, :30].any() and text[:, 60:].any()   # a caption over the first and the last column
    assert not text[:, 32:58].any()                     # the empty caption draws nothing


def test_legend_has_every_swatch_and_its_name_and_wraps_to_the_width():
    names = ["road", "sidewalk", "building"]
    strip = legend(names, COLORS, width=300)
    assert strip.shape[0] == 3 and strip.shape[2] == 300
    pixels = {tuple(p) for p in strip.reshape(3, -1).T.tolist()}
    assert set(COLORS) <= pixels and _dark(strip).any()
    narrow = legend(names, COLORS, width=80)
    assert narrow.shape[2] == 80 and narrow.shape[1] > strip.shape[1]   # one row per entry
    unnamed = legend(["", "", ""], COLORS, width=300)
    assert (_dark(strip) & ~_dark(unnamed)).sum() > 20                 # the names are drawn


def test_labelled_confusion_keeps_the_heatmap_and_names_the_classes_and_the_scale():
    confusion = torch.tensor([[10, 0, 0], [0, 3, 0], [0, 0, 0]])
    heat = confusion_image(confusion, cell=16)
    figure = labelled_confusion(confusion, ["road", "sidewalk", "sky"], cell=16)
    top = torch.tensor(COLORMAP_POINTS[-1].byte().tolist(), dtype=torch.uint8)
    ys, xs = torch.nonzero((figure == top[:, None, None]).all(0), as_tuple=True)
    y0, x0 = int(ys.min()), int(xs[ys == ys.min()].min())     # the first top-colour pixel: the (0, 0) cell
    assert torch.equal(figure[:, y0:y0 + 48, x0:x0 + 48], heat)
    assert _dark(figure[:, y0:y0 + 48, :x0]).any()              # row names left of the matrix
    assert _dark(figure[:, :y0, x0:x0 + 48]).any()              # column names above it
    scale = figure[:, y0:y0 + 48, x0 + 48:]
    assert (scale == top[:, None, None]).all(0).any()           # the colour scale's top ...
    bottom = torch.tensor(COLORMAP_POINTS[0].byte().tolist(), dtype=torch.uint8)
    assert (scale == bottom[:, None, None]).all(0).any()        # ... and bottom
    longer = labelled_confusion(confusion, ["a road name", "sidewalk", "sky"], cell=16)
    assert longer.shape[2] > figure.shape[2]                    # room made for the longer name


def test_labelled_panels_and_scatter_legend_add_captions_and_legends_around_the_image():
    image = torch.full((3, 8, 30), 90, dtype=torch.uint8)
    rows = [panel(image, torch.zeros(8, 30, dtype=torch.long), torch.ones(8, 30, dtype=torch.long), COLORS)] * 2
    figure = labelled_panels(rows, ["road", "sidewalk", "building"], COLORS)
    assert figure.shape[2] == 90 and figure.shape[1] > 16 + 20
    assert {tuple(c) for c in COLORS} <= {tuple(p) for p in figure.reshape(3, -1).T.tolist()}
    scatter = embedding_scatter(torch.rand(20, 2), torch.randint(0, 2, (20,)), COLORS[:2], size=64)
    shown = with_legend(scatter, ["source: a", "target: b"], COLORS[:2], title="PCA")
    assert shown.shape[2] == 64 and shown.shape[1] > 64
    band = shown.shape[1] - 64 - legend(["source: a", "target: b"], COLORS[:2], width=64).shape[1]
    assert torch.equal(shown[:, band:band + 64], scatter) and _dark(shown[:, :band]).any()
