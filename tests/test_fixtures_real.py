"""The shipped descriptors on real dataset samples (../shared/fixtures, see its MANIFEST.txt)."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from da_seg.data import png16
from da_seg.data.datasets import SegmentationDataset
from da_seg.data.domains import DomainError, load_domain
from da_seg.data.prepare import check_domain, isprs_rgb_to_index, prepare_isprs

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
DATASETS = Path(__file__).resolve().parents[1] / "datasets"

pytestmark = pytest.mark.skipif(
    not FIXTURES.is_dir(),
    reason=f"real dataset samples not found at {FIXTURES} (they live beside the repo, in ../shared/fixtures)",
)

CITYSCAPES = FIXTURES / "cityscapes/gtFine/val/frankfurt/frankfurt_000000_000294_gtFine"


def domain_at(name: str, root: str):
    return dataclasses.replace(load_domain(str(DATASETS / f"{name}.toml")), root=FIXTURES / root)


def shipped_train_ids() -> np.ndarray:
    return np.asarray(Image.open(f"{CITYSCAPES}_labelTrainIds.png"))


def test_cityscapes_label_ids_to_train_ids():
    domain = domain_at("cityscapes", "cityscapes")
    (sample,) = domain.samples("val", with_labels=True)
    image, label = domain.read_pair(sample)
    assert image.shape == (128, 256, 3)
    # The two files were resized separately by mmseg: edges differ on 0.23% of pixels (MANIFEST).
    assert (label == shipped_train_ids()).mean() >= 0.997


def test_gta5_format_reads_ids_not_palette_colours():
    domain = domain_at("gta5", "gta5_format_derived")
    (sample,) = domain.samples("all", with_labels=True)
    raw = domain.read_raw_label(sample.label)
    assert raw.ndim == 2
    np.testing.assert_array_equal(raw, np.asarray(Image.open(f"{CITYSCAPES}_labelIds.png")))
    image, label = domain.read_pair(sample)
    assert (label == shipped_train_ids()).mean() >= 0.997


def test_synthia_format_decodes_the_16bit_class_channel():
    domain = domain_at("synthia", "synthia_format_derived/RAND_CITYSCAPES")
    (sample,) = domain.samples("all", with_labels=True)
    raw = png16.read_png(sample.label)
    assert raw.dtype == np.uint16 and raw.shape == (128, 256, 3)
    assert sorted(np.unique(raw[..., 0]).tolist()) == list(range(11))
    assert np.asarray(Image.open(sample.label)).max() == 0  # Pillow's decode: all zeros
    _, label = domain.read_pair(sample)
    # Derived from the trainIds with terrain / truck / train (absent from SYNTHIA) made void.
    expected = shipped_train_ids().copy()
    expected[np.isin(expected, [9, 14, 16])] = 255
    np.testing.assert_array_equal(label, expected)


@pytest.mark.parametrize(
    "dataset, stem",
    [("potsdam", "2_10_0_0_512_512"), ("vaihingen", "area1_0_0_512_512")],
)
def test_isprs_rgb_coded_labels_match_mmseg_index_maps(dataset, stem):
    mmseg = np.asarray(Image.open(FIXTURES / f"{dataset}_mmseg/ann_dir/{stem}.png"))
    # mmseg numbering: 0 boundary, 1..6 classes; ours: 0..5 classes, 255 boundary.
    expected = np.where(mmseg == 0, 255, mmseg.astype(np.int64) - 1).astype(np.uint8)
    colours = np.asarray(Image.open(FIXTURES / f"isprs_rgb_coded_derived/{dataset}/{stem}_label_rgb.png"))
    converted, odd = isprs_rgb_to_index(colours)
    np.testing.assert_array_equal(converted, expected)
    assert odd == 0
    # The *_mmseg descriptor reads mmseg's files into the same ids.
    domain = domain_at(f"{dataset}_mmseg", f"{dataset}_mmseg")
    domain = dataclasses.replace(
        domain,
        split_specs={
            "all": dataclasses.replace(domain.split_specs["train"], images="img_dir", labels="ann_dir")
        },
    )
    (sample,) = domain.samples("all", with_labels=True)
    np.testing.assert_array_equal(domain.read_pair(sample)[1], expected)


def test_prepare_isprs_on_real_crop(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    shutil.copy(FIXTURES / "potsdam_mmseg/img_dir/2_10_0_0_512_512.png", images / "top_potsdam_2_10_RGB.png")
    shutil.copy(
        FIXTURES / "isprs_rgb_coded_derived/potsdam/2_10_0_0_512_512_label_rgb.png",
        labels / "top_potsdam_2_10_label_noBoundary.png",
    )
    prepare_isprs("potsdam", images, labels, tmp_path / "out", tile=256, log=lambda s: None)
    mmseg = np.asarray(Image.open(FIXTURES / "potsdam_mmseg/ann_dir/2_10_0_0_512_512.png"))
    crop = np.asarray(Image.open(tmp_path / "out/labels/train/2_10_256_0_512_256.png"))
    np.testing.assert_array_equal(crop, np.where(mmseg == 0, 255, mmseg - 1)[0:256, 256:512])
    domain = dataclasses.replace(load_domain(str(DATASETS / "potsdam.toml")), root=tmp_path / "out")
    assert len(SegmentationDataset(domain, "train", with_labels=True)) == 4


def test_loveda_values_and_no_data(tmp_path):
    domain = domain_at("loveda_rural", "loveda")
    (sample,) = domain.samples("train", with_labels=True)  # masks 1, 2 have no image in the fixture
    raw = np.asarray(Image.open(sample.label))
    image, label = domain.read_pair(sample)
    assert image.shape == (1024, 1024, 3)
    np.testing.assert_array_equal(label, raw - 1)  # the fixture has no no-data pixels
    with_no_data = raw.copy()
    with_no_data[:100, :50] = 0
    path = tmp_path / "mask.png"
    Image.fromarray(with_no_data).save(path)
    label = domain.read_label(path)
    assert (label[:100, :50] == 255).all() and (label[100:] == raw[100:] - 1).all()


def test_mapillary_v12_maps_to_cityscapes_classes():
    domain = domain_at("mapillary", "mapillary")
    _, label = domain.read_pair(domain.samples("train", with_labels=True)[0])
    raw = np.asarray(Image.open(FIXTURES / "mapillary/training/v1.2/labels/__CRyFzoDOXn6unQ6a3DnQ.png"))
    assert {int(v): int(label[raw == v][0]) for v in np.unique(raw)} == {17: 2, 44: 255, 45: 5}

    domain = domain_at("mapillary", "mapillary_downscaled4x_derived")
    (sample,) = domain.samples("train", with_labels=True)
    image, label = domain.read_pair(sample)
    raw = domain.read_raw_label(sample.label)
    found = {int(v): set(np.unique(label[raw == v]).tolist()) for v in np.unique(raw)}
    expected = {
        3: 4, 13: 0, 17: 2, 19: 11, 23: 255, 24: 0, 27: 10, 30: 8, 32: 255, 35: 255,
        44: 255, 45: 5, 47: 5, 49: 255, 50: 7, 55: 13, 61: 14, 65: 255,
    }
    assert found == {k: {v} for k, v in expected.items()}
    v20 = FIXTURES / "mapillary_downscaled4x_derived/training/v2.0/labels/__CRyFzoDOXn6unQ6a3DnQ.png"
    # v2.0 labels given to the v1.2 descriptor: ids beyond 65 are caught.
    with pytest.raises(DomainError, match=r"v2.0/labels/__CRyFzoDOXn6unQ6a3DnQ.png: value\(s\) \[66, 79,"):
        domain.read_label(v20)


def test_bdd100k_layout_and_check():
    domain = domain_at("bdd100k", "bdd100k")
    val = SegmentationDataset(domain, "val", with_labels=True)
    assert [s.name for s in val.samples] == ["7d06fefd-f7be05a6", "7d128593-0ccfea4c", "7d15b18b-1e0d6e3f"]
    item = val[0]
    assert item["image"].shape == (3, 8, 8) and set(item["label"].unique().tolist()) == {2}
    report = check_domain(domain)
    assert report.ok, report.text()


def test_cityscapes_check_on_real_sample():
    report = check_domain(domain_at("cityscapes", "cityscapes"), ["val"])
    assert report.ok, report.text()
    values = "raw label values found: 1, 2, 3, 4, 7, 8, 11, 13, 17, 20, 21, 23, 24, 26"
    assert any(values in line for line in report.lines)
