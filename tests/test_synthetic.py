"""The synthetic benchmark: determinism, layout, label values, and that its shift is a real one."""
from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from da_seg.data import synthetic
from da_seg.data.synthetic import (
    AERIAL_CLASS_IDS,
    STREET_CLASS_IDS,
    SYNTHETIC_VERSION,
    SyntheticDataError,
    check_synthetic,
    generate,
    render_sample,
)

REPO = Path(__file__).resolve().parents[1]
STREET_VALUES = {0, 1, 2, 5, 8, 10, 11, 13}
TINY = dict(n_train=3, n_val=2, log=None)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "synth"
    generate(root, seed=3, workers=1, **TINY)
    return root


def _render_many(benchmark: str, domain: str, n: int, split: str = "train"):
    pairs = [render_sample(benchmark, domain, split, i) for i in range(n)]
    return (np.stack([p[0] for p in pairs]).astype(np.float32) / 255, np.stack([p[1] for p in pairs]))


def _class_means(images: np.ndarray, labels: np.ndarray, classes) -> np.ndarray:
    """(len(classes), 3) mean colour of each class's pixels."""
    return np.stack([images[labels == c].mean(0) for c in classes])


def _normalize_per_image(images: np.ndarray) -> np.ndarray:
    mean = images.mean((1, 2), keepdims=True)
    std = images.std((1, 2), keepdims=True) + 1e-6
    return (images - mean) / std


# ---------------------------------------------------------------------------------------------

def test_same_seed_gives_identical_files_whatever_the_workers(tiny, tmp_path):
    again = tmp_path / "again"
    generate(again, seed=3, workers=2, **TINY)
    assert _hashes(tiny) == _hashes(again)
    other = tmp_path / "other"
    generate(other, benchmarks=("aerial",), seed=4, workers=1, **TINY)
    assert hashlib.sha256((other / "aerial/urban/train/images/00000.png").read_bytes()).hexdigest() != \
        _hashes(tiny)["aerial/urban/train/images/00000.png"]


def test_layout_sizes_and_label_values(tiny):
    expected = {("streets", "game"): ("train", "val"), ("streets", "real"): ("train", "val"),
                ("streets", "dusk"): ("val",), ("streets", "fog"): ("val",),
                ("aerial", "urban"): ("train", "val"), ("aerial", "rural"): ("train", "val")}
    for (benchmark, domain), splits in expected.items():
        present = sorted(p.name for p in (tiny / benchmark / domain).iterdir())
        assert present == sorted(splits), (benchmark, domain, present)
        for split in splits:
            n = 3 if split == "train" else 2
            names = [f"{i:05d}.png" for i in range(n)]
            assert sorted(p.name for p in (tiny / benchmark / domain / split / "images").iterdir()) == names
            assert sorted(p.name for p in (tiny / benchmark / domain / split / "labels").iterdir()) == names
            for name in names:
                image = Image.open(tiny / benchmark / domain / split / "images" / name)
                label = Image.open(tiny / benchmark / domain / split / "labels" / name)
                size = (128, 64) if benchmark == "streets" else (64, 64)       # PIL: (W, H)
                assert (image.mode, image.size) == ("RGB", size)
                assert (label.mode, label.size) == ("L", size)
                values = set(np.unique(np.asarray(label)).tolist())
                allowed = STREET_VALUES if benchmark == "streets" else set(range(8))
                assert values <= allowed, (benchmark, domain, split, name, values)


def test_render_sample_reproduces_a_file_alone(tiny):
    image, label = render_sample("streets", "real", "train", 2, seed=3)
    assert np.array_equal(np.asarray(Image.open(tiny / "streets/real/train/images/00002.png")), image)
    assert np.array_equal(np.asarray(Image.open(tiny / "streets/real/train/labels/00002.png")), label)
    image, label = render_sample("aerial", "rural", "val", 1, seed=3)
    assert np.array_equal(np.asarray(Image.open(tiny / "aerial/rural/val/images/00001.png")), image)


def test_stamp_skip_regenerate_and_version_check(tmp_path, monkeypatch):
    root = tmp_path / "synth"
    first = generate(root, benchmarks=("aerial",), seed=0, workers=1, **TINY)
    stamp = json.loads((root / "VERSION.json").read_text())
    assert stamp["version"] == SYNTHETIC_VERSION and first["benchmarks"]["aerial"]["generated"]
    assert stamp["benchmarks"]["aerial"]["palette_move"] == synthetic.AERIAL_PALETTE_MOVE
    assert check_synthetic(root / "aerial" / "urban")["version"] == SYNTHETIC_VERSION
    assert not generate(root, benchmarks=("aerial",), seed=0, workers=1, **TINY)["benchmarks"]["aerial"]["generated"]
    with pytest.raises(SyntheticDataError, match="'streets' is not"):
        check_synthetic(root / "streets" / "game")
    with pytest.raises(SyntheticDataError, match="da-seg synth"):
        check_synthetic(tmp_path / "elsewhere")

    monkeypatch.setattr(synthetic, "SYNTHETIC_VERSION", SYNTHETIC_VERSION + 1)
    with pytest.raises(SyntheticDataError, match=r"version 1.*needs version 2.*da-seg synth"):
        check_synthetic(root / "aerial" / "urban")
    stale = root / "aerial" / "urban" / "train" / "images" / "00002.png"
    stale.write_bytes(b"stale")
    again = generate(root, benchmarks=("aerial",), seed=0, workers=1, **TINY)
    assert again["benchmarks"]["aerial"]["generated"]
    assert check_synthetic(root)["version"] == SYNTHETIC_VERSION + 1
    assert stale.read_bytes()[:4] == b"\x89PNG"


def test_bad_arguments_name_the_valid_choices(tmp_path):
    with pytest.raises(ValueError, match="streets, aerial"):
        generate(tmp_path, benchmarks=("street",), log=None)
    with pytest.raises(ValueError, match="game, real, dusk, fog"):
        render_sample("streets", "night", "val", 0)
    with pytest.raises(ValueError, match="urban, rural"):
        render_sample("aerial", "suburb", "val", 0)


@pytest.mark.parametrize("style", synthetic.STREET_STYLES)
def test_every_street_class_appears_in_every_style(style):
    _, labels = _render_many("streets", style, 30, "val")
    counts = np.bincount(labels.ravel(), minlength=256)
    assert set(np.flatnonzero(counts).tolist()) == STREET_VALUES
    assert all(counts[c] > 30 for c in STREET_VALUES), counts[list(STREET_VALUES)]


def test_streets_shift_colour_not_labels():
    """Source and target share label statistics, but class-conditional colours move apart."""
    game_x, game_y = _render_many("streets", "game", 60)
    real_x, real_y = _render_many("streets", "real", 60)
    freq_game = np.bincount(game_y.ravel(), minlength=14)[list(STREET_CLASS_IDS)] / game_y.size
    freq_real = np.bincount(real_y.ravel(), minlength=14)[list(STREET_CLASS_IDS)] / real_y.size
    assert np.abs(freq_game - freq_real).sum() < 0.3, (freq_game, freq_real)
    assert (freq_game > 0.004).all() and (freq_real > 0.004).all()

    across = np.abs(_class_means(game_x, game_y, STREET_CLASS_IDS) - _class_means(real_x, real_y, STREET_CLASS_IDS))
    within = np.abs(_class_means(game_x[:30], game_y[:30], STREET_CLASS_IDS)
                    - _class_means(game_x[30:], game_y[30:], STREET_CLASS_IDS))
    # mean over RGB, per class: every class moves, by far more than sampling noise
    assert (across.mean(1) > 0.04).all(), across.mean(1)
    assert across.mean() > 0.08 and across.mean() > 4 * within.mean(), (across.mean(), within.mean())


def test_per_image_normalization_does_not_undo_the_shift():
    """Class colours normalized per image still differ; a source colour classifier fails on target."""
    game_x, game_y = _render_many("streets", "game", 40)
    real_x, real_y = _render_many("streets", "real", 40)
    game_n, real_n = _normalize_per_image(game_x), _normalize_per_image(real_x)
    centroids = _class_means(game_n, game_y, STREET_CLASS_IDS)
    gap = np.linalg.norm(centroids - _class_means(real_n, real_y, STREET_CLASS_IDS), axis=1)
    assert np.median(gap) > 0.5, gap                              # in per-image std units

    def nearest_centroid_accuracy(images, labels):
        distance = ((images[..., None, :] - centroids) ** 2).sum(-1)
        return (np.asarray(STREET_CLASS_IDS)[distance.argmin(-1)] == labels).mean()

    on_source, on_target = nearest_centroid_accuracy(game_n, game_y), nearest_centroid_accuracy(real_n, real_y)
    assert on_source > 0.6 and on_target < on_source - 0.25, (on_source, on_target)


def test_aerial_class_frequencies_and_colours_differ():
    urban_x, urban_y = _render_many("aerial", "urban", 40)
    rural_x, rural_y = _render_many("aerial", "rural", 40)
    urban = np.bincount(urban_y.ravel(), minlength=8) / urban_y.size
    rural = np.bincount(rural_y.ravel(), minlength=8) / rural_y.size
    for cls in AERIAL_CLASS_IDS:                                  # every class occurs in both domains
        assert urban[cls] > 0.002 and rural[cls] > 0.002, (cls, urban, rural)
    built = [synthetic.A_BUILDING, synthetic.A_ROAD]
    natural = [synthetic.AGRICULTURE, synthetic.FOREST, synthetic.WATER]
    assert urban[built].sum() > rural[built].sum() + 0.2, (urban, rural)
    assert rural[natural].sum() > urban[natural].sum() + 0.3, (urban, rural)
    assert urban[0] < 0.05 and rural[0] < 0.05                    # no-data is rare
    shared = [c for c in AERIAL_CLASS_IDS]
    across = np.abs(_class_means(urban_x, urban_y, shared) - _class_means(rural_x, rural_y, shared)).mean()
    assert across > 0.08, across


def test_descriptors_match_the_files_on_disk():
    streets_map = {"0": 0, "1": 1, "2": 2, "8": 3, "10": 4, "5": 5, "11": 6, "13": 7}
    for style in synthetic.STREET_STYLES:
        data = tomllib.loads((REPO / "datasets" / f"synth_streets_{style}.toml").read_text())
        assert data["root"] == f"synth/streets/{style}"
        assert data["classes"]["preset"] == "synth_streets8"
        assert data["label"]["encoding"] == "index" and data["label"]["id_map"] == streets_map
        splits = ("val",) if style in synthetic.STREET_VAL_ONLY else ("train", "val")
        assert tuple(data["splits"]) == splits
        for split in splits:
            assert data["splits"][split] == {"images": f"{split}/images", "image_suffix": ".png",
                                             "labels": f"{split}/labels", "label_suffix": ".png"}
    for domain in synthetic.AERIAL_DOMAINS:
        data = tomllib.loads((REPO / "datasets" / f"synth_aerial_{domain}.toml").read_text())
        assert data["root"] == f"synth/aerial/{domain}" and data["classes"]["preset"] == "loveda7"
        assert data["label"]["id_map"] == {str(v): v - 1 for v in range(1, 8)}
        assert data["label"]["ignore_values"] == [0]


def test_generated_domains_load_through_the_descriptors(tiny, monkeypatch):
    domains = pytest.importorskip("da_seg.data.domains")
    monkeypatch.setenv("DA_SEG_DATA", str(tiny.parent))
    for name, num_classes in (("synth_streets_game", 8), ("synth_streets_fog", 8), ("synth_aerial_rural", 7)):
        domain = domains.load_domain(name)
        assert domain.num_classes == num_classes
        samples = domain.samples("val", with_labels=True)
        assert len(samples) == 2
        label = domain.read_label(samples[0].label)
        assert label.shape == domain.read_image(samples[0].image).shape[:2]
        assert set(np.unique(label).tolist()) <= set(range(num_classes)) | {255}
