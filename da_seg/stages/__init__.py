"""Stage registry: what runs a recipe, named by its top-level ``stage`` key (default ``train``).

``da-seg train``, ``da-seg sweep`` and ``da-seg check`` go through :func:`load` and ``STAGES``;
a new multi-step method is a new entry here (plus its components), with no edit to the runner.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from da_seg.config import Recipe, UnknownNameError, load_recipe
from da_seg.methods import validate
from da_seg.stages.base import parse_stage_options
from da_seg.stages.self_train import SelfTrainStage
from da_seg.stages.train import TrainStage
from da_seg.stages.translate import TranslateStage

STAGES = {
    TrainStage.name: TrainStage,
    TranslateStage.name: TranslateStage,
    SelfTrainStage.name: SelfTrainStage,
}


def stage_of(recipe: Recipe, source: str | None = None):
    if recipe.stage not in STAGES:
        raise UnknownNameError(f"{source or recipe.name}: stage = {recipe.stage!r}; valid stages: "
                               f"{', '.join(STAGES)}")
    return STAGES[recipe.stage]


def load(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe and check everything that can be checked without data or networks: its keys
    and values, its stage and the stage's table, every component's name and options."""
    return validated(load_recipe(path, tuple(overrides)), str(path))


def validated(recipe: Recipe, source: str | None = None) -> Recipe:
    """``recipe`` itself once its stage, the stage's table and its components are checked (what
    :func:`load` checks beyond the keys and values, for a recipe built in Python)."""
    parse_stage_options(stage_of(recipe, source), recipe, source)
    validate(recipe, source)
    return recipe


def sweep(recipe_paths: Sequence[Path], seeds: int, runs_root: Path, *, overrides: Sequence[str] = (),
          device: str = "auto", progress: bool = True) -> list[Path]:
    """Every recipe over seeds 0..seeds-1, one after another, each by its stage; finished work is
    skipped and interrupted work resumed, so re-running a sweep after a crash completes it.
    Returns the result folders (``metrics.json``) for ``da-seg compare``."""
    done = []
    for path in recipe_paths:
        recipe = load(path, overrides)
        stage = stage_of(recipe)
        if not stage.per_seed:
            # Once, at the recipe's own seed (a translated domain serves every seed trained on it).
            done.append(stage.run(path, overrides=tuple(overrides), runs_root=runs_root, device=device,
                                  progress=progress, label=f"{recipe.name} (once, seed {recipe.train.seed})"))
            continue
        for seed in range(seeds):
            done.append(stage.run(path, overrides=(*overrides, f"train.seed={seed}"), runs_root=runs_root,
                                  device=device, progress=progress, label=f"{recipe.name} seed {seed}"))
    return done
