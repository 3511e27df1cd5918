"""The high-resolution street pair (``streets_hr``): determinism, sizes, thin classes, and that it
is the ``streets`` scene drawn larger, not another scene."""
from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from da_seg.data import synthetic
from da_seg.data.synthetic import POLE, PERSON, generate, render_sample, render_street, sample_rng

REPO = Path(__file__).resolve().parents[1]
STREET_VALUES = {0, 1, 2, 5, 8, 10, 11, 13}
TINY = dict(benchmarks=("streets_hr",), n_train=2, n_val=1, log=None)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def tiny_hr(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth_hr") / "synth"
    generate(root, seed=5, workers=1, **TINY)
    return root


def test_same_seed_same_files_whatever_the_workers_and_one_file_alone(tiny_hr, tmp_path):
    again = tmp_path / "again"
    generate(again, seed=5, workers=2, **TINY)
    assert _hashes(tiny_hr) == _hashes(again) and len(_hashes(again)) == 2 * 2 * 3   # 2 styles x (2 + 1) x 2
    image, label = render_sample("streets_hr", "real", "train", 1, seed=5)
    assert np.array_equal(np.asarray(Image.open(tiny_hr / "streets_hr/real/train/images/00001.png")), image)
    assert np.array_equal(np.asarray(Image.open(tiny_hr / "streets_hr/real/train/labels/00001.png")), label)
    other, _ = render_sample("streets_hr", "real", "train", 1, seed=6)
    assert not np.array_equal(other, image)


def test_layout_sizes_label_values_and_stamp(tiny_hr):
    assert sorted(p.name for p in (tiny_hr / "streets_hr").iterdir()) == ["game", "real"]
    for style in ("game", "real"):
        for split, n in (("train", 2), ("val", 1)):
            for i in range(n):
                image = Image.open(tiny_hr / f"streets_hr/{style}/{split}/images/{i:05d}.png")
                label = Image.open(tiny_hr / f"streets_hr/{style}/{split}/labels/{i:05d}.png")
                assert (image.mode, image.size) == ("RGB", (512, 256))         # PIL: (W, H)
                assert (label.mode, label.size) == ("L", (512, 256))
                assert set(np.unique(np.asarray(label)).tolist()) <= STREET_VALUES
    stamp = synthetic.check_synthetic(tiny_hr / "streets_hr" / "game")
    assert stamp["benchmarks"]["streets_hr"]["size"] == [256, 512]
    assert not (tiny_hr / "streets").exists()      # naming streets_hr generates only it
    with pytest.raises(ValueError, match="game, real"):
        render_sample("streets_hr", "fog", "val", 0)


def _runs(mask: np.ndarray) -> np.ndarray:
    """Lengths of the horizontal runs of True in a (H, W) mask."""
    padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1)))
    edges = np.diff(padded, axis=1)
    return np.flatnonzero(edges.ravel() == -1) - np.flatnonzero(edges.ravel() == 1)


def test_thin_classes_are_present_and_thin():
    labels = np.stack([render_sample("streets_hr", style, "val", i)[1] for style in ("game", "real")
                       for i in range(12)])
    assert (labels == PERSON).any(axis=(1, 2)).sum() >= 6
    poles = labels == POLE
    assert poles.any(axis=(1, 2)).sum() >= 18
    runs = _runs(poles.reshape(-1, poles.shape[-1]))
    # Pole shafts: 3 to 9 px at 256x512, i.e. 1.5 to 4.5 px at the half resolution a baseline sees
    # (the arms are long horizontal runs: take the shafts, the common case).
    assert 2 <= np.median(runs) <= 9, np.median(runs)
    assert np.mean(runs <= 9) > 0.8


def test_hr_scene_is_the_streets_scene_drawn_four_times_larger():
    """Same random draws, every length scaled: the nearest-downscaled label agrees with the 64x128
    drawing almost everywhere (thin structures and edges may differ by a pixel)."""
    agree = []
    for index in range(4):
        _, small = render_street("real", sample_rng(0, "check", "real", "val", index), (64, 128))
        _, large = render_street("real", sample_rng(0, "check", "real", "val", index), (256, 512), scale=4.0)
        agree.append(np.mean(large[1::4, 1::4] == small))
    assert min(agree) > 0.9, agree


def test_descriptors_name_the_generated_folders():
    streets_map = {"0": 0, "1": 1, "2": 2, "8": 3, "10": 4, "5": 5, "11": 6, "13": 7}
    for style in synthetic.HR_STREET_STYLES:
        data = tomllib.loads((REPO / "datasets" / f"synth_streets_hr_{style}.toml").read_text())
        assert data["root"] == f"synth/streets_hr/{style}" and data["generator"] == "synthetic"
        assert data["classes"]["preset"] == "synth_streets8" and data["label"]["id_map"] == streets_map
        assert tuple(data["splits"]) == ("train", "val")


SHORT_RUN = ["schedule.iters=2", "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1",
             "data.num_workers=0", "data.batch_size=2", "eval.alignment_images=0", "eval.max_panels=0",
             "model.options.width=8", "model.options.aspp_channels=16"]


@pytest.mark.parametrize("name", ["source_only_aug", "mean_teacher_aug"])
def test_each_base_recipe_runs_end_to_end(name, tiny_hr, tmp_path, monkeypatch):
    from da_seg.config import load_recipe
    from da_seg.engine.trainer import Trainer

    monkeypatch.setenv("DA_SEG_DATA", str(tiny_hr.parent))
    recipe = load_recipe(REPO / "recipes" / "synthetic" / "streets_hr" / f"{name}.toml", SHORT_RUN)
    metrics = Trainer(recipe, tmp_path / "run", device="cpu", progress=False).fit()
    assert metrics["finished"] and metrics["iteration"] == 2
    assert 0 <= metrics["last"]["domains"]["synth_streets_hr_real"]["miou"] <= 100
