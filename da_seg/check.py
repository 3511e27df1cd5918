"""``da-seg check``: everything about a recipe that can be known without data or training.

A recipe passes when it loads (keys, types, values), names a stage whose table is valid, lists
components whose options are valid and that accept the stage, and when its segmenter and its
components build: on the meta device (no memory, no initialization), with random weights, so no
weight file and no image is read. A domain that is not installed yet (a translated domain that a
translate recipe writes) is reported, not failed: the model is then built for the class count of
the recipe's other domains, or 19.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Sequence

import torch

from da_seg.config import ConfigError, Recipe
from da_seg.data.domains import DomainError, load_domain
from da_seg.engine.trainer import build_segmenter, component_setup
from da_seg.methods import build_components
from da_seg.stages import load

DEFAULT_CLASSES = 19


def _classes(recipe: Recipe) -> tuple[int, str]:
    """(class count, a note on domains not installed)."""
    missing, counts = [], []
    for name in (recipe.data.source, recipe.data.target, *recipe.val_domains):
        if not name:
            continue
        try:
            counts.append(load_domain(name).num_classes)
        except DomainError:
            missing.append(name)
    if len(set(counts)) > 1:
        raise ConfigError(f"recipe {recipe.name!r}: its domains have different class counts {sorted(set(counts))}")
    note = f"domain {', '.join(map(repr, missing))} not installed" if missing else ""
    return (counts[0] if counts else DEFAULT_CLASSES), note


def _uninitialized(recipe: Recipe, num_classes: int) -> torch.nn.Module:
    """The recipe's segmenter with uninitialized CPU weights: built once per architecture on the
    meta device (initializing ResNet-101 or MiT-B5 would take most of the check's time)."""
    key = (recipe.model.name, json.dumps(recipe.model.options, sort_keys=True), num_classes)
    if key not in _ARCHITECTURES:
        with torch.device("meta"):
            _ARCHITECTURES[key] = build_segmenter(recipe, num_classes, pretrained="")
    return copy.deepcopy(_ARCHITECTURES[key]).to_empty(device="cpu")


_ARCHITECTURES: dict[tuple, torch.nn.Module] = {}


def check_recipe(path: Path, overrides: Sequence[str] = ()) -> tuple[str | None, str]:
    """(None or the error message, a note). Never raises for a bad recipe."""
    try:
        recipe = load(path, overrides)
        num_classes, note = _classes(recipe)
        def fresh(*_, **__):  # stands in for weight files and checkpoints: nothing is read
            return _uninitialized(recipe, num_classes)

        setup = dataclasses.replace(component_setup(recipe, fresh(), torch.device("cpu")), build_segmenter=fresh,
                                    load_trained=fresh)
        build_components(recipe.components, setup, source=str(path))
        return None, note
    except (ConfigError, DomainError, KeyError, ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        return str(message), ""
