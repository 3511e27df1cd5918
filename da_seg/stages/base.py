"""What a stage is, and how its ``[<stage>]`` table is read.

A stage runs a recipe: ``train`` one ordinary run; ``translate`` a translator then a written
domain; ``self_train`` rounds of pseudo-labels and runs. Each is a class with
- ``name``: the value of the recipe's ``stage`` key, and the name of its settings table;
- ``Options``: a frozen dataclass of those settings, checked when the recipe is loaded;
- ``per_seed``: whether a sweep runs it once per seed (False: once, at the recipe's seed);
- ``run(recipe, recipe_path, *, runs_root, device, progress, **options) -> Path``: the folder
  whose ``metrics.json`` is the stage's result (what ``da-seg compare`` reads).
Stages import ``da_seg.runs`` (run folders, resume), never the reverse.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from da_seg.config import ConfigError, Recipe
from da_seg.methods.base import build_options


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A stage without settings of its own."""


def parse_stage_options(stage: Any, recipe: Recipe, source: str | None = None):
    """``stage.Options`` from the recipe's ``[<stage>]`` table; unknown keys and bad values fail
    with ``<recipe>: <stage>.<key> ...``."""
    source = source or recipe.name
    raw = dict(recipe.stage_options) if recipe.stage == stage.name else {}
    if raw and not dataclasses.fields(stage.Options):
        raise ConfigError(f"{source}: the {stage.name} stage has no settings, but the recipe has a "
                          f"[{stage.name}] table ({', '.join(raw)})")
    return build_options(stage.Options, raw, f"{stage.name}.", source)


def check_device(ctx, param, value: str) -> str:
    """Callback of every command's ``--device``: a bad name, or a GPU that is not there, fails as
    one line while the command line is read, before a recipe, a model or a run folder."""
    from da_seg.engine.trainer import pick_device  # the engine is heavy: only for commands that run

    pick_device(value)
    return value
