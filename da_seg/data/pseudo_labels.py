"""A pseudo-labelled domain on disk: the target's images with labels a self-training stage wrote.

Its descriptor points at the original target images (same root, folder, suffix, list and
exclusions) and at a folder of 8-bit PNG pseudo-labels that holds a marker file
(``pseudo_labels.json``). Components that train on pseudo-labels refuse a target without the
marker: on a real labelled target they would silently be the oracle.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from da_seg.config import ConfigError
from da_seg.data.domains import Domain
from da_seg.utils.files import save_image_atomic, write_json_atomic
from da_seg.utils.tomlio import dumps_toml

MARKER = "pseudo_labels.json"


def write_label_png(label: np.ndarray, path: Path) -> None:
    """(H, W) uint8 train ids -> 8-bit grayscale PNG, atomically."""
    save_image_atomic(Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8)), path)


def write_marker(labels_dir: Path, info: dict[str, Any]) -> None:
    write_json_atomic(info, Path(labels_dir) / MARKER)


def pseudo_domain_descriptor(name: str, target: Domain, split: str, labels_dir: Path, description: str) -> str:
    """TOML of a domain whose ``train`` split holds the images of ``target``'s ``split`` and the
    pseudo-labels in ``labels_dir`` (absolute path)."""
    spec = target.split_spec(split)
    classes: dict[str, Any] = {"names": list(target.class_names), "colors": [list(c) for c in target.colors]}
    if target.class_subsets:
        classes["subsets"] = {k: list(v) for k, v in target.class_subsets.items()}
    train: dict[str, Any] = {"images": spec.images, "image_suffix": spec.image_suffix, "labels": str(labels_dir),
                             "label_suffix": ".png"}
    if spec.list:
        train["list"] = spec.list
    if spec.exclude:
        train["exclude"] = list(spec.exclude)
    return dumps_toml({
        "name": name, "description": description, "root": str(target.root),
        "layout": f"pseudo-labels of {target.name} {split}: {target.layout or ''}",
        "classes": classes, "label": {"encoding": "index", "unknown": "error"}, "splits": {"train": train}})


def pseudo_label_marker(domain: Domain, split: str) -> Path | None:
    """The marker file of ``domain``'s ``split`` if it is a pseudo-labelled domain, else None."""
    spec = domain.split_spec(split)
    if spec.labels is None:
        return None
    marker = domain.root / spec.labels / MARKER
    return marker if marker.is_file() else None


def check_pseudo_labelled(domain: Domain, split: str, who: str) -> dict[str, Any]:
    """The marker's record; a clear error when ``domain``'s ``split`` is not pseudo-labelled."""
    marker = pseudo_label_marker(domain, split)
    if marker is None:
        raise ConfigError(
            f"{who} trains on the label files of data.target = {domain.name!r} ({domain.descriptor}), but its "
            f"split {split!r} is not a pseudo-labelled domain (no {MARKER} beside its labels); on real target "
            "labels this would be the oracle. Run the recipe as its self-training stage (stage = \"self_train\"; "
            "`da-seg train RECIPE` or `da-seg self-train RECIPE`), which writes pseudo-labels each round and "
            "points data.target at them.")
    return json.loads(marker.read_text())
