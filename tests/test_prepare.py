"""`da-seg prepare`: ISPRS tiling, domain checks, label conversion."""
from __future__ import annotations

import tomllib

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from da_seg.data import png16
from da_seg.data.datasets import SegmentationDataset
from da_seg.data.domains import DomainError, load_domain
from da_seg.data.prepare import (
    _tile_starts,
    check_domain,
    convert_labels,
    dumps_toml,
    isprs_rgb_to_index,
    prepare,
    prepare_isprs,
)

ISPRS_COLOURS = np.array(
    [[255, 255, 255], [0, 0, 255], [0, 255, 255], [0, 255, 0], [255, 255, 0], [255, 0, 0], [0, 0, 0]],
    np.uint8,
)
ISPRS_IDS = np.array([0, 1, 2, 3, 4, 5, 255], np.uint8)


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DA_SEG_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("DA_SEG_DATASETS", raising=False)
    monkeypatch.setenv("DA_SEG_CACHE", str(tmp_path / "cache"))
    return tmp_path


def isprs_label(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A colour-coded label with slightly off colours (as in some real TIFFs) and its train ids."""
    classes = np.random.default_rng(seed).integers(0, 7, (h, w))
    colours = ISPRS_COLOURS[classes].astype(np.int16)
    colours = np.where(colours == 255, colours - (classes % 3)[..., None], colours + (classes % 2)[..., None])
    return colours.astype(np.uint8), ISPRS_IDS[classes]


def test_isprs_rgb_to_index():
    colours, ids = isprs_label(5, 9, 0)
    converted, odd = isprs_rgb_to_index(colours)
    np.testing.assert_array_equal(converted, ids)
    assert odd == 0
    converted, odd = isprs_rgb_to_index(np.array([[[255, 0, 255]]], np.uint8))
    assert converted[0, 0] == 255 and odd == 1


def test_tile_starts():
    assert _tile_starts(300, 128, 128) == [0, 128, 172]
    assert _tile_starts(256, 128, 128) == [0, 128]
    assert _tile_starts(100, 128, 128) == [0]
    assert _tile_starts(300, 128, 96) == [0, 96, 172]


def _potsdam_raw(tmp_path, size=(300, 200)):
    images, labels = tmp_path / "raw/2_Ortho_RGB", tmp_path / "raw/5_Labels_all_noBoundary"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    truth = {}
    w, h = size
    for seed, key in enumerate(["2_10", "2_13", "9_9"]):
        Image.fromarray(np.full((h, w, 3), 40 * seed, np.uint8)).save(images / f"top_potsdam_{key}_RGB.tif")
        colours, ids = isprs_label(h, w, seed)
        Image.fromarray(colours).save(labels / f"top_potsdam_{key}_label_noBoundary.tif")
        Image.fromarray(np.roll(colours, 1, axis=1)).save(labels / f"top_potsdam_{key}_label.tif")
        truth[key] = ids
    return images, labels, truth


def test_prepare_isprs_potsdam(env):
    images, labels, truth = _potsdam_raw(env)
    out = env / "data" / "potsdam"
    summary = prepare_isprs("potsdam", images, labels, out, tile=128, log=lambda s: None)
    assert summary["tiles"]["2_10"] == {"split": "train", "crops": 6, "odd_color_pixels": 0}
    assert summary["tiles"]["2_13"]["split"] == "val"
    assert any("9_9" in s and "neither" in s for s in summary["skipped"])
    crop = np.asarray(Image.open(out / "labels/train/2_10_172_72_300_200.png"))
    np.testing.assert_array_equal(crop, truth["2_10"][72:200, 172:300])
    assert Image.open(out / "images/val/2_13_0_0_128_128.png").size == (128, 128)
    domain = load_domain("potsdam")
    dataset = SegmentationDataset(domain, "train", with_labels=True)
    assert len(dataset) == 6 and dataset[0]["label"].shape == (128, 128)
    assert set(np.unique(dataset[0]["label"].numpy())) <= {0, 1, 2, 3, 4, 5, 255}
    assert check_domain(domain).ok


def test_prepare_isprs_full_labels_and_errors(env):
    images, labels, truth = _potsdam_raw(env)
    out = env / "full"
    prepare_isprs("potsdam", images, labels, out, tile=256, overlap=0, eroded=False, log=lambda s: None)
    crop = np.asarray(Image.open(out / "labels/train/2_10_0_0_256_200.png"))
    np.testing.assert_array_equal(crop, np.roll(truth["2_10"], 1, axis=1)[:, :256])
    for path in labels.glob("*_label.tif"):
        path.unlink()
    with pytest.raises(DomainError, match="holds no full .* label files; pass --eroded"):
        prepare_isprs("potsdam", images, labels, out, eroded=False, log=lambda s: None)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(labels / "top_potsdam_2_10_label_noBoundary.tif")
    with pytest.raises(DomainError) as err:
        prepare_isprs("potsdam", images, labels, out, log=lambda s: None)
    assert "top_potsdam_2_10_RGB.tif is 300x200" in str(err.value)
    assert "top_potsdam_2_10_label_noBoundary.tif is 10x10" in str(err.value)


def test_prepare_isprs_cli_vaihingen(env):
    images, labels = env / "top", env / "gts_eroded"
    images.mkdir()
    labels.mkdir()
    Image.fromarray(np.zeros((140, 130, 3), np.uint8)).save(images / "top_mosaic_09cm_area1.tif")
    colours, ids = isprs_label(140, 130, 5)
    Image.fromarray(colours).save(labels / "top_mosaic_09cm_area1_noBoundary.tif")
    out = env / "data" / "vaihingen"
    result = CliRunner().invoke(
        prepare,
        ["isprs", "--dataset", "vaihingen", "--images", str(images), "--labels", str(labels),
         "--out", str(out), "--tile", "64", "--overlap", "16"],
    )
    assert result.exit_code == 0, result.output
    assert "area1: 9 crops -> train" in result.output
    crop = np.asarray(Image.open(out / "labels/train/area1_66_76_130_140.png"))
    np.testing.assert_array_equal(crop, ids[76:140, 66:130])
    bad = CliRunner().invoke(prepare, ["isprs", "--dataset", "vaihingen", "--images", str(env / "nope"),
                                       "--labels", str(labels), "--out", str(out)])
    assert bad.exit_code != 0 and "image directory not found" in bad.output


def _loveda(env, with_problems: bool):
    root = env / "data" / "loveda"
    for i in range(3):
        (root / "Train/Urban/images_png").mkdir(parents=True, exist_ok=True)
        (root / "Train/Urban/masks_png").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / f"Train/Urban/images_png/{i}.png")
        Image.fromarray(np.full((8, 8), i + 1, np.uint8)).save(root / f"Train/Urban/masks_png/{i}.png")
    if with_problems:
        (root / "Train/Urban/images_png/1.png").write_bytes(b"broken")
        Image.fromarray(np.zeros((8, 9), np.uint8)).save(root / "Train/Urban/masks_png/2.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "Train/Urban/masks_png/orphan.png")
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "Train/Urban/images_png/lonely.png")
    return root


def test_check_reports_a_clean_domain(env):
    _loveda(env, with_problems=False)
    result = CliRunner().invoke(prepare, ["check", "loveda_urban", "--split", "train"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "[train] 3 images, 3 with labels" in out and "8x8 (3)" in out
    assert "raw label values found: 1, 2, 3" in out
    assert "background" in out and "33.33%" in out and "no problems found" in out
    assert "check loveda_urban [train] [####################] 3/3" in out   # the progress bar (stderr)


def test_check_flags_problems(env):
    root = _loveda(env, with_problems=True)
    report = check_domain(load_domain("loveda_urban"), ["train"])
    text = "\n".join(report.problems)
    assert not report.ok
    assert f"{root}/Train/Urban/images_png/lonely.png" in text  # image without label
    assert f"{root}/Train/Urban/masks_png/orphan.png" in text  # label without image
    assert f"cannot read image file {root}/Train/Urban/images_png/1.png" in text
    assert "size mismatch" in text and "9x8" in text and "value(s) [0]" not in text
    result = CliRunner().invoke(prepare, ["check", "loveda_urban"])
    assert result.exit_code == 1 and "PROBLEMS" in result.output
    # All splits by default: the absent Val and Test folders are problems too.
    assert "Val/Urban/images_png" in result.output


def test_check_unknown_values_and_missing_root(env):
    root = _loveda(env, with_problems=False)
    Image.fromarray(np.full((8, 8), 9, np.uint8)).save(root / "Train/Urban/masks_png/0.png")
    report = check_domain(load_domain("loveda_urban"), ["train"])
    assert any("0.png: value(s) [9]" in p for p in report.problems)
    result = CliRunner().invoke(prepare, ["check", "bdd100k"])
    assert result.exit_code == 1 and "dataset root of domain 'bdd100k' not found" in result.output
    result = CliRunner().invoke(prepare, ["check", "bdd10k"])
    assert result.exit_code != 0 and "Did you mean 'bdd100k'" in result.output


def test_convert_labels_for_synthia(env):
    root = env / "data" / "synthia" / "RAND_CITYSCAPES"
    (root / "RGB").mkdir(parents=True)
    (root / "GT/LABELS").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(np.zeros((6, 10, 3), np.uint8)).save(root / f"RGB/{i:07d}.png")
        classes = rng.integers(0, 23, (6, 10)).astype(np.uint16)
        png16.write_png(root / f"GT/LABELS/{i:07d}.png", np.stack([classes, classes, classes], -1))
    domain = load_domain("synthia")
    result = CliRunner().invoke(prepare, ["convert-labels", "synthia"])
    assert result.exit_code == 0, result.output
    assert "convert synthia [####################] 2/2" in result.output      # the progress bar (stderr)
    converted = load_domain("synthia_trainids")
    assert converted.descriptor == env / "datasets" / "synthia_trainids.toml"
    assert converted.class_subsets == domain.class_subsets and converted.class_names == domain.class_names
    for original, new in zip(domain.samples("train", True), converted.samples("train", True)):
        assert original.image == new.image
        assert new.label == root / "da_seg_trainids/GT/LABELS" / (new.name + ".png")
        assert Image.open(new.label).mode == "L"
        np.testing.assert_array_equal(converted.read_label(new.label), domain.read_label(original.label))
    # A second run skips the up-to-date files.
    before = new.label.stat().st_mtime_ns
    convert_labels(domain, log=lambda s: None)
    assert new.label.stat().st_mtime_ns == before


def test_dumps_toml_round_trip():
    data = {
        "name": "x", "n": 3, "flag": True, "ratio": 0.5,
        "classes": {"names": ["a b", 'q"uote'], "colors": [[1, 2, 3]], "subsets": {"16": [0, 1]}},
        "splits": {"train": {"images": "img", "exclude": []}, "val": {"images": "v"}},
    }
    assert tomllib.loads(dumps_toml(data)) == data
