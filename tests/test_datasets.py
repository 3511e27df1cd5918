"""Decoding of every label layout (written small to tmp_path), the torch Dataset, the 16-bit PNG
reader, and rare-class sampling."""
from __future__ import annotations

import io
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from da_seg.data import png16
from da_seg.data.classes import class_preset
from da_seg.data.datasets import SegmentationDataset
from da_seg.data.domains import DomainError, load_domain
from da_seg.data.rare_class import (
    ClassStats,
    RareClassSampler,
    cache_paths,
    class_stats,
    rare_class_probabilities,
)


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """$DA_SEG_DATA = tmp_path/data, cwd = tmp_path, so the shipped descriptors resolve there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DA_SEG_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("DA_SEG_DATASETS", raising=False)
    monkeypatch.setenv("DA_SEG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "data"


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path, array, mode=None, palette=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array) if mode is None else Image.fromarray(array, mode)
    if palette is not None:
        im.putpalette(palette)
    im.save(path)


def strip(values, h=4) -> np.ndarray:
    """(h, len(values)) label whose columns hold ``values``."""
    return np.tile(np.asarray(values, np.uint8), (h, 1))


# -- every layout ------------------------------------------------------------------------------


def test_cityscapes_layout(data_dir):
    root = data_dir / "cityscapes"
    stem = "aachen/aachen_000000_000019"
    save(root / "leftImg8bit/train" / f"{stem}_leftImg8bit.png", rgb(4, 6))
    save(root / "gtFine/train" / f"{stem}_gtFine_labelIds.png", strip([7, 8, 26, 0, 33, 24]))
    domain = load_domain("cityscapes")
    (sample,) = domain.samples("train", with_labels=True)
    assert sample.name == stem
    image, label = domain.read_pair(sample)
    assert image.shape == (4, 6, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(label[0], [0, 1, 13, 255, 18, 11])


def test_gta5_palette_indices_not_colours(data_dir):
    root = data_dir / "gta5"
    ids = strip([7, 11, 26, 1, 33])
    palette = [0] * 768
    palette[7 * 3 : 7 * 3 + 3] = [128, 64, 128]  # the GTA5 palette gives each id its Cityscapes colour
    palette[26 * 3 : 26 * 3 + 3] = [0, 0, 142]
    save(root / "images/00001.png", rgb(4, 5))
    save(root / "labels/00001.png", ids, mode="P", palette=palette)
    assert Image.open(root / "labels/00001.png").mode == "P"
    domain = load_domain("gta5")
    label = domain.read_label(domain.samples("all", True)[0].label)
    np.testing.assert_array_equal(label[0], [0, 2, 13, 255, 18])


def test_synthia_16bit_channel(data_dir):
    root = data_dir / "synthia" / "RAND_CITYSCAPES"
    classes = np.array([[3, 4, 21, 16, 0, 1, 8, 12]] * 5, np.uint16)
    gt = np.stack([classes, classes * 40, np.zeros_like(classes)], axis=-1)  # instance ids > 255
    save(root / "RGB/0000001.png", rgb(5, 8))
    (root / "GT/LABELS").mkdir(parents=True)
    png16.write_png(root / "GT/LABELS/0000001.png", gt, filters="adaptive")
    # The pitfall: Pillow's default decode yields (almost) nothing of the class channel.
    assert np.asarray(Image.open(root / "GT/LABELS/0000001.png"))[..., 0].max() == 0
    domain = load_domain("synthia")
    label = domain.read_label(domain.samples("all", True)[0].label)
    np.testing.assert_array_equal(label[0], [0, 1, 3, 255, 255, 10, 13, 17])
    assert domain.class_subsets["13"] == (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)


def test_bdd100k_train_ids_and_missing_masks(data_dir):
    root = data_dir / "bdd100k"
    for name in ("a", "b"):
        save(root / "images/10k/val" / f"{name}.jpg", rgb(4, 4))
    save(root / "labels/sem_seg/masks/val/a.png", strip([0, 18, 255, 5]))
    domain = load_domain("bdd100k")
    samples = domain.samples("val", True)  # missing_label = "skip" drops b
    assert [s.name for s in samples] == ["a"] and len(domain.samples("val", False)) == 2
    np.testing.assert_array_equal(domain.read_label(samples[0].label)[0], [0, 18, 255, 5])


def test_mapillary_v12_to_cityscapes(data_dir):
    root = data_dir / "mapillary"
    save(root / "training/images/x.jpg", rgb(4, 8))
    save(root / "training/v1.2/labels/x.png", strip([13, 24, 2, 44, 45, 20, 58, 65]))
    domain = load_domain("mapillary")
    label = domain.read_label(domain.samples("train", True)[0].label)
    np.testing.assert_array_equal(label[0], [0, 0, 1, 255, 5, 12, 16, 255])


def test_value_outside_map_names_file_and_values(data_dir):
    root = data_dir / "mapillary"
    save(root / "training/images/x.jpg", rgb(4, 4))
    path = root / "training/v1.2/labels/x.png"
    save(path, strip([13, 70, 99, 70]))  # v2.0 ids given to the v1.2 descriptor
    domain = load_domain("mapillary")
    with pytest.raises(DomainError) as err:
        domain.read_label(path)
    message = str(err.value)
    assert str(path) in message and "[70, 99]" in message and 'unknown = "error"' in message


def test_loveda_no_data_is_ignored(data_dir):
    root = data_dir / "loveda"
    save(root / "Train/Urban/images_png/7.png", rgb(4, 8))
    save(root / "Train/Urban/masks_png/7.png", strip(range(8)))
    save(root / "Test/Urban/images_png/9.png", rgb(4, 8))
    domain = load_domain("loveda_urban")
    label = domain.read_label(domain.samples("train", True)[0].label)
    np.testing.assert_array_equal(label[0], [255, 0, 1, 2, 3, 4, 5, 6])
    assert [s.name for s in domain.samples("test", False)] == ["9"]
    assert domain.class_names == class_preset("loveda7").names


def test_rgb_coded_labels(data_dir, tmp_path):
    """A remote-sensing domain with colour-coded labels, declared only in a descriptor."""
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "rs_town.toml").write_text(
        """
root = "rs_town"
[classes]
names = ["ground", "house"]
colors = [[255, 255, 255], [0, 0, 255]]
[label]
encoding = "rgb"
rgb_map = [[255, 255, 255, 0], [0, 0, 255, 1]]
ignore_values = [[0, 0, 0]]
unknown = "error"
[splits.train]
images = "img"
labels = "gt"
label_suffix = "_gt.png"
"""
    )
    root = data_dir / "rs_town"
    colours = np.array([[[255, 255, 255], [0, 0, 255], [0, 0, 0], [0, 0, 255]]], np.uint8).repeat(3, 0)
    save(root / "img/t1.png", rgb(3, 4))
    save(root / "gt/t1_gt.png", colours)
    domain = load_domain("rs_town")
    image, label = domain.read_pair(domain.samples("train", True)[0])
    np.testing.assert_array_equal(label[0], [0, 1, 255, 1])
    colours[0, 0] = [255, 0, 0]
    save(root / "gt/t1_gt.png", colours)
    with pytest.raises(DomainError, match=r"t1_gt.png: colour\(s\) \[\(255, 0, 0\)\] on 1 pixels"):
        domain.read_label(root / "gt/t1_gt.png")


def test_wrong_encoding_is_explained(data_dir):
    root = data_dir / "loveda"
    save(root / "Train/Urban/images_png/1.png", rgb(4, 4))
    save(root / "Train/Urban/masks_png/1.png", rgb(4, 4))  # an RGB file where indices are expected
    domain = load_domain("loveda_urban")
    with pytest.raises(DomainError, match='mode RGB.*encoding = "index".*encoding = "rgb"'):
        domain.read_label(root / "Train/Urban/masks_png/1.png")
    png16.write_png(root / "Train/Urban/masks_png/1.png", np.ones((4, 4, 3), np.uint16))
    with pytest.raises(DomainError, match='16-bit 3-channel PNG.*encoding = "channel"'):
        domain.read_label(root / "Train/Urban/masks_png/1.png")


# -- dataset and bad files ---------------------------------------------------------------------


def _potsdam(data_dir, n=3, size=(8, 6)):
    root = data_dir / "potsdam"
    w, h = size
    for i in range(n):
        save(root / f"images/train/2_10_{i}.png", rgb(h, w, i))
        save(root / f"labels/train/2_10_{i}.png", (np.arange(h * w).reshape(h, w) % 6).astype(np.uint8))
    return root, load_domain("potsdam")


def test_segmentation_dataset_items(data_dir):
    root, domain = _potsdam(data_dir)
    dataset = SegmentationDataset(domain, "train", with_labels=True)
    item = dataset[1]
    assert len(dataset) == 3 and item["index"] == 1
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 6, 8)
    assert item["label"].dtype == torch.int64 and item["label"].shape == (6, 8)
    np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), rgb(6, 8, 1))
    resized = SegmentationDataset(domain, "train", with_labels=True, size=(3, 4))[0]
    assert resized["image"].shape == (3, 3, 4) and resized["image"].dtype == torch.uint8
    assert resized["label"].shape == (3, 4) and set(resized["label"].unique().tolist()) <= set(range(6))
    # Nearest-exact on a 2x downscale keeps pixel (2i+1, 2j+1)... of a pattern with distinct values.
    full = dataset[0]["label"]
    np.testing.assert_array_equal(resized["label"].numpy(), full[1::2, 1::2].numpy())
    unlabelled = SegmentationDataset(domain, "train", with_labels=False)[0]
    assert set(unlabelled) == {"image", "index"}
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert batch["image"].shape == (2, 3, 6, 8) and batch["label"].shape == (2, 6, 8)


def test_size_mismatch_names_both_files(data_dir):
    root, domain = _potsdam(data_dir, n=1)
    save(root / "labels/train/2_10_0.png", np.zeros((6, 7), np.uint8))
    with pytest.raises(DomainError) as err:
        SegmentationDataset(domain, "train", with_labels=True)[0]
    message = str(err.value)
    assert str(root / "images/train/2_10_0.png") in message
    assert str(root / "labels/train/2_10_0.png") in message
    assert "8x6" in message and "7x6" in message


def test_corrupt_files_are_named(data_dir):
    root, domain = _potsdam(data_dir, n=2)
    (root / "images/train/2_10_1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DomainError, match=r"cannot read image file .*images/train/2_10_1.png"):
        SegmentationDataset(domain, "train", with_labels=False)[1]
    (root / "labels/train/2_10_0.png").write_bytes(b"not an image at all")
    with pytest.raises(DomainError, match=r"cannot read label file .*labels/train/2_10_0.png"):
        domain.read_label(root / "labels/train/2_10_0.png")
    with pytest.raises(DomainError, match=r"image file not found: .*nothere.png"):
        domain.read_image(root / "nothere.png")


def test_prepared_isprs_values_outside_range_fail(data_dir):
    root, domain = _potsdam(data_dir, n=1)
    save(root / "labels/train/2_10_0.png", np.full((6, 8), 6, np.uint8))  # mmseg "clutter" numbering
    with pytest.raises(DomainError, match=r"2_10_0.png: value\(s\) \[6\] on 48 pixels"):
        domain.read_label(root / "labels/train/2_10_0.png")


# -- 16-bit PNG reader -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_png_roundtrip_every_filter(dtype, channels):
    rng = np.random.default_rng(channels)
    shape = (9, 7) if channels == 1 else (9, 7, channels)
    # Noise on a horizontal ramp, so the Average/Paeth predictions differ from Sub/Up.
    top = np.iinfo(dtype).max
    ramp = np.arange(7).reshape((1, 7) + (1,) * (len(shape) - 2)) * (top // 10)
    array = (rng.integers(0, top // 4, shape) + ramp).astype(dtype)
    for filters in [0, 1, 2, 3, 4, "adaptive", rng.integers(0, 5, 9)]:
        data = png16.encode_png(array, filters)
        decoded = png16.decode_png(data)
        assert decoded.dtype == dtype
        np.testing.assert_array_equal(decoded, array)


def test_png_matches_pillow():
    """Pillow as the independent decoder: exact for 8-bit RGB(A) and 16-bit grey; for 16-bit RGB
    it keeps the high byte of each sample, so the low bytes are checked on byte-swapped data."""
    rng = np.random.default_rng(0)
    filters = rng.integers(0, 5, 13)
    exact = [
        rng.integers(0, 256, (13, 11, 3)).astype(np.uint8),
        rng.integers(0, 256, (13, 11, 4)).astype(np.uint8),
        rng.integers(0, 65536, (13, 11)).astype(np.uint16),
    ]
    for array in exact:
        decoded = png16.decode_png(png16.encode_png(array, filters))
        reference = np.asarray(Image.open(io.BytesIO(png16.encode_png(array, filters))))
        np.testing.assert_array_equal(decoded, array)
        np.testing.assert_array_equal(reference.astype(np.int64), array.astype(np.int64))
    array = rng.integers(0, 65536, (13, 11, 3)).astype(np.uint16)
    decoded = png16.decode_png(png16.encode_png(array, filters))
    high = np.asarray(Image.open(io.BytesIO(png16.encode_png(array, filters))))
    low = np.asarray(Image.open(io.BytesIO(png16.encode_png(array.byteswap(), filters))))
    np.testing.assert_array_equal(decoded >> 8, high)
    np.testing.assert_array_equal(decoded & 0xFF, low)
    np.testing.assert_array_equal(decoded, array)


def test_png_errors():
    data = png16.encode_png(np.zeros((4, 4, 3), np.uint16))
    with pytest.raises(png16.PngError, match="CRC mismatch"):
        png16.decode_png(data[:40] + bytes([data[40] ^ 1]) + data[41:], "x.png")
    with pytest.raises(png16.PngError, match="x.png: truncated|x.png: no IEND"):
        png16.decode_png(data[:-20], "x.png")
    with pytest.raises(png16.PngError, match="not a PNG"):
        png16.decode_png(b"GIF89a....", "x.png")


# -- rare-class sampling -----------------------------------------------------------------------


def take(sampler, n: int) -> list[int]:
    return list(itertools.islice(sampler, n))


def _stats() -> ClassStats:
    counts = np.array(
        [
            [90000, 5000, 0],  # image 0: class 0 and a bit of class 1
            [80000, 0, 0],
            [70000, 2000, 4000],  # class 1 below min_pixels here; class 2 present
            [60000, 0, 3500],
        ],
        np.int64,
    )
    return ClassStats("toy", "train", ("a", "b", "c", "d"), counts)


def test_rare_class_probabilities():
    freqs = np.array([0.9, 0.09, 0.01])
    probs = rare_class_probabilities(freqs, temperature=0.01)
    expected = np.exp((1 - freqs) / 0.01) / np.exp((1 - freqs) / 0.01).sum()
    np.testing.assert_allclose(probs, expected)
    assert probs[2] > probs[1] > probs[0]


def test_sampler_draws_only_images_with_enough_pixels():
    stats = _stats()
    sampler = RareClassSampler(stats, seed=0, min_pixels=3000)
    indices = take(sampler, 2000)
    counts = np.bincount(indices, minlength=4)
    # class 1 (f ~ 2%) -> image 0 only; class 2 (f ~ 2%) -> images 2, 3; class 0 -> any.
    assert counts.sum() == 2000 and sampler.state == 2000
    expected_class = sampler.class_probabilities
    np.testing.assert_allclose(expected_class.sum(), 1.0)
    share_0 = counts[0] / 2000
    predicted_0 = expected_class[1] + expected_class[0] / 4
    assert abs(share_0 - predicted_0) < 0.05
    assert counts[1] / 2000 == pytest.approx(expected_class[0] / 4, abs=0.03)


def test_sampler_is_deterministic_and_resumes(monkeypatch):
    monkeypatch.setattr(RareClassSampler, "block", 16)  # cross several generator blocks
    stats = _stats()
    stream = take(RareClassSampler(stats, seed=3), 60)
    assert stream == take(RareClassSampler(stats, seed=3), 60)
    assert stream != take(RareClassSampler(stats, seed=4), 60)
    resumed = RareClassSampler(stats, seed=3, state=37)
    assert take(resumed, 23) == stream[37:]
    restored = RareClassSampler(stats, seed=0)
    restored.load_state_dict({"state": 10, "seed": 3})
    assert next(iter(restored)) == stream[10]
    # Two ranks interleave into the single-process stream.
    rank0 = take(RareClassSampler(stats, seed=3, rank=0, world_size=2), 30)
    rank1 = take(RareClassSampler(stats, seed=3, rank=1, world_size=2), 30)
    assert rank0 == stream[0::2] and rank1 == stream[1::2]
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        RareClassSampler(stats, rank=2, world_size=2)


def test_sampler_with_dataloader():
    stats = _stats()
    sampler = RareClassSampler(stats, seed=1)
    loader = torch.utils.data.DataLoader(list(range(4)), batch_size=3, sampler=sampler)
    batch = next(iter(loader))
    assert batch.shape == (3,)


def test_class_stats_cached_beside_data(data_dir, monkeypatch):
    root, domain = _potsdam(data_dir, n=3)
    stats = class_stats(domain, "train")
    assert stats.pixel_counts.shape == (3, 6) and stats.pixel_counts.sum() == 3 * 48
    cache = root / ".da_seg" / "class_stats_train.json"
    assert json.loads(cache.read_text())["names"] == ["2_10_0", "2_10_1", "2_10_2"]
    import da_seg.data.rare_class as rc

    monkeypatch.setattr(rc, "compute_class_stats", lambda *a, **k: pytest.fail("cache not used"))
    assert class_stats(domain, "train").names == stats.names
    monkeypatch.undo()
    save(root / "images/train/2_10_3.png", rgb(6, 8))  # the split changed: recompute
    save(root / "labels/train/2_10_3.png", np.zeros((6, 8), np.uint8))
    assert len(class_stats(domain, "train").names) == 4


def test_class_stats_fall_back_to_cache_dir(data_dir):
    root, domain = _potsdam(data_dir, n=1)
    (root / ".da_seg").write_text("a file where the cache folder would go: the root acts read-only")
    class_stats(domain, "train")
    fallback = cache_paths(domain, "train")[1]
    assert fallback == data_dir.parent / "cache" / "potsdam" / "class_stats_train.json"
    assert fallback.is_file()


def test_sampler_for_dataset(data_dir):
    root, domain = _potsdam(data_dir, n=3)
    for i in range(3):  # image i holds 10 pixels of class i, the other 38 of class 5
        label = np.full((6, 8), 5, np.uint8)
        label.ravel()[:10] = i
        save(root / f"labels/train/2_10_{i}.png", label)
    dataset = SegmentationDataset(domain, "train", with_labels=True)
    sampler = RareClassSampler.for_dataset(dataset, min_pixels=10, seed=0, start=5)
    assert sampler.state == 5 and set(take(sampler, 30)) == {0, 1, 2}
    assert sampler.class_probabilities[5] < 1e-6  # the frequent class is (almost) never drawn
    assert sampler.class_probabilities[3] == 0  # absent classes never are
    with pytest.raises(DomainError, match="needs labels"):
        RareClassSampler.for_dataset(SegmentationDataset(domain, "train", with_labels=False))
