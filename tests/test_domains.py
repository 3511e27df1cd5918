"""Descriptor parsing, lookup, root resolution, listing, and their error messages."""
from __future__ import annotations

import builtins
import dataclasses
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from da_seg.data.classes import CLASS_PRESETS, class_preset
from da_seg.data.domains import DomainError, available_domains, load_domain

REPO_DATASETS = Path(__file__).resolve().parents[1] / "datasets"
OWN_DESCRIPTORS = [
    "cityscapes", "gta5", "synthia", "bdd100k", "mapillary", "loveda_urban", "loveda_rural",
    "potsdam", "vaihingen", "potsdam_mmseg", "vaihingen_mmseg",
]

MINIMAL = """
root = "{root}"
layout = "img/<name>.png + ann/<name>.png"
[classes]
names = ["a", "b", "c"]
colors = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
[label]
encoding = "index"
unknown = "error"
[splits.train]
images = "img"
labels = "ann"
"""


def write_descriptor(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def write_pairs(root: Path, n: int = 2, size=(6, 4)) -> None:
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "ann").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size[1], size[0], 3), 10 * i, np.uint8)).save(root / "img" / f"{i:03d}.png")
        Image.fromarray(np.full((size[1], size[0]), i % 3, np.uint8)).save(root / "ann" / f"{i:03d}.png")


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """cwd = tmp_path, no inherited $DA_SEG_* settings."""
    monkeypatch.chdir(tmp_path)
    for var in ("DA_SEG_DATA", "DA_SEG_DATASETS", "DA_SEG_CACHE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.mark.parametrize("name", OWN_DESCRIPTORS)
def test_shipped_descriptors_load(name, isolated):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no shared display colours, no other complaint
        domain = load_domain(name)
    assert domain.name == name and domain.descriptor == REPO_DATASETS / f"{name}.toml"
    assert domain.root == isolated / "data" / domain.root.relative_to(isolated / "data")
    assert domain.splits and domain.layout
    preset = {"loveda_urban": "loveda7", "loveda_rural": "loveda7"}.get(name)
    if name.startswith(("potsdam", "vaihingen")):
        preset = "isprs6"
    assert domain.class_names == CLASS_PRESETS[preset or "cityscapes19"].names
    for ids in domain.class_subsets.values():
        assert all(0 <= i < domain.num_classes for i in ids)


def test_class_presets():
    assert len(class_preset("cityscapes19").names) == 19
    assert class_preset("synth_streets8").names == (
        "road", "sidewalk", "building", "vegetation", "sky", "pole", "person", "car"
    )
    assert class_preset("synth_streets8").colors[0] == class_preset("cityscapes19").colors[0]
    assert class_preset("loveda7").names[-1] == "agriculture" and len(class_preset("isprs6").names) == 6
    with pytest.raises(KeyError, match="valid presets: cityscapes19"):
        class_preset("cityscape")


def test_lookup_order_and_paths(isolated, monkeypatch):
    env_dir, cwd_dir = isolated / "env_descriptors", isolated / "datasets"
    write_descriptor(cwd_dir, "cityscapes", MINIMAL.format(root="from_cwd"))
    assert load_domain("cityscapes").root == isolated / "data" / "from_cwd"  # ./datasets beats the repo
    write_descriptor(env_dir, "cityscapes", MINIMAL.format(root="from_env"))
    monkeypatch.setenv("DA_SEG_DATASETS", os.pathsep.join([str(isolated / "absent"), str(env_dir)]))
    assert load_domain("cityscapes").root == isolated / "data" / "from_env"
    assert available_domains()["cityscapes"] == env_dir / "cityscapes.toml"
    assert available_domains()["gta5"] == REPO_DATASETS / "gta5.toml"  # still found in the repo
    path = write_descriptor(isolated / "elsewhere", "mine", MINIMAL.format(root="x"))
    assert load_domain(str(path)).name == "mine"
    assert load_domain(Path("elsewhere/mine.toml")).descriptor == path


def test_root_resolution(isolated, monkeypatch):
    path = write_descriptor(isolated, "d", MINIMAL.format(root="sub/dir"))
    assert load_domain(str(path)).root == isolated / "data" / "sub" / "dir"
    monkeypatch.setenv("DA_SEG_DATA", str(isolated / "store"))
    assert load_domain(str(path)).root == isolated / "store" / "sub" / "dir"
    path.write_text(MINIMAL.format(root=str(isolated / "abs")))
    assert load_domain(str(path)).root == isolated / "abs"


def test_unknown_domain_lists_valid_names(isolated):
    with pytest.raises(DomainError) as err:
        load_domain("cityscape")
    message = str(err.value)
    assert "unknown domain 'cityscape'" in message and "Did you mean 'cityscapes'" in message
    for name in ("gta5", "synthia", "loveda_urban", "potsdam"):
        assert name in message
    with pytest.raises(DomainError, match="descriptor file not found: .*nothere.toml"):
        load_domain("nothere.toml")


@pytest.mark.parametrize(
    "old, new, key, closest",
    [
        ('layout = "', 'layot = "', "'layot'", "'layout'"),
        ('encoding = "index"', 'encodng = "index"', "'encodng'", "'encoding'"),
        ('labels = "ann"', 'label = "ann"', "'label'", "'labels'"),
        ('colors = [', 'colours = [', "'colours'", "'colors'"),
    ],
)
def test_unknown_key_names_closest_valid_key(isolated, old, new, key, closest):
    path = write_descriptor(isolated, "d", MINIMAL.format(root="r").replace(old, new))
    with pytest.raises(DomainError) as err:
        load_domain(str(path))
    message = str(err.value)
    assert str(path) in message and f"unknown key {key}" in message and f"did you mean {closest}" in message


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ('encoding = "index"', 'encoding = "palette"', "label.encoding is 'palette'; valid: index, rgb"),
        ('unknown = "error"', 'unknown = "drop"', "label.unknown is 'drop'"),
        ('unknown = "error"', 'unknown = "error"\nid_map = { "7" = 3 }', "id_map.7 must be a train id in 0"),
        ('encoding = "index"', 'encoding = "index"\nid_map = { "x" = 1 }', "must be an integer label value"),
        ('names = ["a", "b", "c"]', 'names = ["a", "b"]', "classes.colors has 3 entries but names has 2"),
        ('root = "r"', 'root = 3', "root must be a str"),
        ('root = "r"', 'name = "other"\nroot = "r"', "name is 'other' but the file is d.toml"),
        ('[splits.train]\nimages = "img"', '[splits.train]', "splits.train.images is required"),
        ('encoding = "index"', 'encoding = "rgb"', "label.rgb_map is required"),
    ],
)
def test_invalid_values_are_named(isolated, old, new, expected):
    text = MINIMAL.format(root="r")
    assert old in text
    path = write_descriptor(isolated, "d", text.replace(old, new, 1))
    with pytest.raises(DomainError) as err:
        load_domain(str(path))
    assert expected in str(err.value) and str(path) in str(err.value)


def test_unknown_preset_lists_presets(isolated):
    text = MINIMAL.format(root="r").replace(
        'names = ["a", "b", "c"]\ncolors = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]', 'preset = "cityscapes_19"'
    )
    with pytest.raises(DomainError, match="did you mean 'cityscapes19'.*valid: cityscapes19, loveda7"):
        load_domain(str(write_descriptor(isolated, "d", text)))


def test_missing_root_names_path_env_and_layout(isolated, monkeypatch):
    path = write_descriptor(isolated, "d", MINIMAL.format(root="nowhere"))
    with pytest.raises(DomainError) as err:
        load_domain(str(path)).samples("train", with_labels=True)
    message = str(err.value)
    assert str(isolated / "data" / "nowhere") in message
    assert "$DA_SEG_DATA" in message and "img/<name>.png + ann/<name>.png" in message
    monkeypatch.setenv("DA_SEG_DATA", str(isolated / "store"))
    with pytest.raises(DomainError, match=f"DA_SEG_DATA={isolated / 'store'}"):
        load_domain(str(path)).samples("train", with_labels=False)


def test_listing_pairs_by_relative_path(isolated):
    write_pairs(isolated / "data" / "r", n=3)
    domain = load_domain(str(write_descriptor(isolated, "d", MINIMAL.format(root="r"))))
    samples = domain.samples("train", with_labels=True)
    assert [s.name for s in samples] == ["000", "001", "002"]
    assert samples[1].label == isolated / "data" / "r" / "ann" / "001.png"
    assert all(s.label is None for s in domain.samples("train", with_labels=False))
    with pytest.raises(DomainError, match="has no split 'val'; its splits are: train"):
        domain.samples("val", with_labels=False)


def test_empty_split(isolated):
    (isolated / "data" / "r" / "img").mkdir(parents=True)
    domain = load_domain(str(write_descriptor(isolated, "d", MINIMAL.format(root="r"))))
    with pytest.raises(DomainError) as err:
        domain.samples("train", with_labels=False)
    message = str(err.value)
    assert "split 'train' of domain 'd' is empty" in message
    assert str(isolated / "data" / "r" / "img") in message
    assert "'.png'" in message


def test_with_labels_false_never_touches_label_files(isolated, monkeypatch):
    root = isolated / "data" / "r"
    write_pairs(root, n=2)
    domain = load_domain(str(write_descriptor(isolated, "d", MINIMAL.format(root="r"))))
    label_dir = str(root / "ann")
    touched = []

    def guard(fn):
        def wrapper(path, *args, **kwargs):
            if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(label_dir):
                touched.append(os.fspath(path))
            return fn(path, *args, **kwargs)
        return wrapper

    for module, name in [(os, "stat"), (os, "lstat"), (os, "scandir"), (os, "listdir"), (os, "walk"),
                         (builtins, "open"), (io, "open")]:
        monkeypatch.setattr(module, name, guard(getattr(module, name)))
    from da_seg.data.datasets import SegmentationDataset

    dataset = SegmentationDataset(domain, "train", with_labels=False)
    items = [dataset[i] for i in range(len(dataset))]
    monkeypatch.undo()
    assert touched == [] and "label" not in items[0]
    # And the guard does see label access when labels are asked for.
    for module, name in [(os, "walk")]:
        monkeypatch.setattr(module, name, guard(getattr(module, name)))
    domain.samples("train", with_labels=True)
    assert touched


def test_list_exclude_and_missing_labels(isolated):
    root = isolated / "data" / "r"
    write_pairs(root, n=4)
    (root / "ann" / "002.png").unlink()
    (root / "lists").mkdir()
    (root / "lists" / "few.txt").write_text("# comment\n000\n003.png\n\n")
    text = MINIMAL.format(root="r") + """
[splits.few]
images = "img"
labels = "ann"
list = "lists/few.txt"
[splits.skipping]
images = "img"
labels = "ann"
missing_label = "skip"
exclude = ["001"]
"""
    domain = load_domain(str(write_descriptor(isolated, "d", text)))
    assert [s.name for s in domain.samples("few", True)] == ["000", "003"]
    assert [s.name for s in domain.samples("skipping", True)] == ["000", "003"]
    assert [s.name for s in domain.samples("skipping", False)] == ["000", "002", "003"]
    with pytest.raises(DomainError) as err:
        domain.samples("train", True)
    message = str(err.value)
    assert "1 of 4 images have no label file" in message
    assert str(root / "img" / "002.png") in message and str(root / "ann" / "002.png") in message
    (root / "lists" / "few.txt").write_text("000\n009\n")
    with pytest.raises(DomainError, match=r"1 names in .*few.txt have no image, e.g. .*009.png"):
        domain.samples("few", False)


def test_label_less_split(isolated):
    write_pairs(isolated / "data" / "r", n=1)
    text = MINIMAL.format(root="r") + '[splits.test]\nimages = "img"\n'
    domain = load_domain(str(write_descriptor(isolated, "d", text)))
    assert len(domain.samples("test", False)) == 1
    with pytest.raises(DomainError, match="split 'test' of domain 'd' has no labels"):
        domain.samples("test", True)


def test_domain_is_a_frozen_dataclass(isolated):
    domain = load_domain("cityscapes")
    moved = dataclasses.replace(domain, root=isolated)
    assert moved.root == isolated and moved.label_spec == domain.label_spec
    with pytest.raises(dataclasses.FrozenInstanceError):
        domain.name = "x"


RGB_DESCRIPTOR = """
root = "r"
[classes]
names = ["road", "car", "sky", "tree"]
colors = [[128, 64, 128], [0, 0, 142], [70, 130, 180], [107, 142, 35]]
[label]
encoding = "rgb"
rgb_map = [{entries}]
ignore_values = [{ignored}]
[splits.train]
images = "img"
labels = "ann"
"""

INDEX_DESCRIPTOR = """
root = "r"
[classes]
names = ["road", "car", "sky", "tree"]
colors = [[128, 64, 128], [0, 0, 142], [70, 130, 180], [107, 142, 35]]
[label]
encoding = "index"
{id_map}
ignore_values = [{ignored}]
[splits.train]
images = "img"
labels = "ann"
"""


@pytest.mark.parametrize(
    "text, expected",
    [
        # One colour, two classes: the lookup kept the later entry and "road" never appeared.
        (RGB_DESCRIPTOR.format(entries="[128, 64, 128, 0], [0, 0, 142, 1], [128, 64, 128, 3]", ignored=""),
         "label.rgb_map: colour [128, 64, 128] is mapped to train ids 0 and 3 (entries 0 and 2)"),
        (RGB_DESCRIPTOR.format(entries="[128, 64, 128, 0], [0, 0, 142, 1]", ignored="[0, 0, 0], [0, 0, 142]"),
         "label.ignore_values: colour [0, 0, 142] (entry 1) is also label.rgb_map[1] -> 1"),
        (INDEX_DESCRIPTOR.format(id_map='id_map = { "7" = 0, "26" = 1, "23" = 2 }', ignored="0, 7"),
         'label.ignore_values: raw value 7 is also label.id_map key "7" -> 0'),
        # TOML keys are strings: "7" and "07" are two keys but one raw value.
        (INDEX_DESCRIPTOR.format(id_map='id_map = { "7" = 0, "26" = 1, "07" = 3 }', ignored=""),
         'label.id_map: keys "7" and "07" are both raw value 7, mapped to train ids 0 and 3'),
        (INDEX_DESCRIPTOR.format(id_map='id_map = { "7" = 0, "255" = 1 }', ignored=""),
         'label.id_map: key "255" -> 1, but raw value 255 always means ignore'),
        (INDEX_DESCRIPTOR.format(id_map="", ignored="9, 2"),
         "label.ignore_values: raw value 2 (entry 1) is train id 2 under the identity mapping"),
    ],
)
def test_contradictory_label_mappings_fail_at_load(isolated, text, expected):
    path = write_descriptor(isolated, "d", text)
    with pytest.raises(DomainError) as err:
        load_domain(str(path))
    assert str(err.value).startswith(f"{path}: {expected}")


def test_repeated_entries_with_the_same_target_are_not_contradictions(isolated):
    text = RGB_DESCRIPTOR.format(entries="[128, 64, 128, 0], [0, 0, 142, 1], [128, 64, 128, 0], [9, 9, 9, 255]",
                                 ignored="[9, 9, 9]")
    spec = load_domain(str(write_descriptor(isolated, "d", text))).label_spec
    colours = np.array([[[128, 64, 128], [0, 0, 142], [9, 9, 9]]], np.uint8)
    assert spec.to_train_ids(colours, "x.png").tolist() == [[0, 1, 255]]
    text = INDEX_DESCRIPTOR.format(id_map='id_map = { "7" = 0, "07" = 0, "3" = 255, "26" = 1 }', ignored="3, 0")
    spec = load_domain(str(write_descriptor(isolated, "e", text))).label_spec
    assert spec.to_train_ids(np.array([[7, 3, 0, 26]], np.uint8), "x.png").tolist() == [[0, 255, 255, 1]]


def test_classes_sharing_a_display_colour_warn_naming_file_and_classes(isolated):
    text = MINIMAL.format(root="r").replace("[[1, 2, 3], [4, 5, 6], [7, 8, 9]]", "[[1, 2, 3], [4, 5, 6], [1, 2, 3]]")
    path = write_descriptor(isolated, "d", text)
    with pytest.warns(UserWarning) as record:
        domain = load_domain(str(path))
    message = str(record[0].message)
    assert str(path) in message and "'a' (0) and 'c' (2)" in message and "[1, 2, 3]" in message
    assert domain.class_names == ("a", "b", "c")  # a warning only: the domain still loads


def test_prepare_check_refuses_a_contradictory_descriptor(isolated, monkeypatch):
    from click.testing import CliRunner

    from da_seg.data.prepare import prepare

    write_pairs(isolated / "data" / "r", n=1)
    text = INDEX_DESCRIPTOR.format(id_map='id_map = { "0" = 0, "1" = 1, "2" = 2 }', ignored="1")
    write_descriptor(isolated / "datasets", "d", text)
    result = CliRunner().invoke(prepare, ["check", "d"])
    assert result.exit_code != 0 and "no problems found" not in result.output
    assert 'raw value 1 is also label.id_map key "1" -> 1' in result.output
