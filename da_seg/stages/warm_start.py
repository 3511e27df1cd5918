"""The ``warm_start`` stage: one training run that starts from another run's model.

Methods that adapt a trained model online (SAC starts from its ABN baseline) need the baseline
first; a recipe with ``stage = "warm_start"`` and a ``[warm_start]`` table names it, so that
``da-seg train`` and ``da-seg sweep`` run both without manual steps:
  1. the start checkpoint: ``warm_start.init_checkpoint``, else the ``last.pt`` of the
     ``warm_start.warmup_recipe`` run of the same seed under the same runs folder, trained first
     when it is missing and reused when it is finished (the self_train stage's warm-up, the same
     function: :func:`da_seg.stages.self_train.start_checkpoint`);
  2. the recipe itself as an ordinary run with ``model.init_checkpoint`` = that checkpoint
     (loaded before any component copies the weights, so an EMA teacher starts from it too).
The run is filed under the recipe's own name and compared like any other; resuming a sweep
finds the finished warm-up and resumes or skips the run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from da_seg.config import Recipe, load_recipe, recipe_from_dict
from da_seg.runs import train_or_resume
from da_seg.stages.base import parse_stage_options
from da_seg.stages.self_train import start_checkpoint


@dataclass(frozen=True)
class WarmStartOptions:
    warmup_recipe: str = ""                # the start model: this recipe's run (same seed), relative to the recipe file
    init_checkpoint: str = ""              # or a checkpoint to start from


def warm_started(recipe: Recipe, checkpoint: Path) -> Recipe:
    """``recipe`` as an ordinary training run that starts from ``checkpoint``."""
    raw = recipe.to_dict()
    raw.pop(WarmStartStage.name, None)
    raw["stage"] = "train"
    raw["model"]["init_checkpoint"] = str(checkpoint)
    return recipe_from_dict(raw, source=f"{recipe.name} (warm start)")


class WarmStartStage:
    """The warm-up run (once per seed, shared with sweeps of its recipe), then this recipe from it."""

    name = "warm_start"
    Options = WarmStartOptions
    per_seed = True

    @staticmethod
    def run(recipe_path: Path, *, overrides: Sequence[str] = (), runs_root: Path, device: str = "auto",
            progress: bool = True, label: str = "") -> Path:
        recipe_path = Path(recipe_path)
        recipe = load_recipe(recipe_path, tuple(overrides))
        options = parse_stage_options(WarmStartStage, recipe)
        runs_root = Path(runs_root).absolute()  # the start checkpoint's path is part of the run's recipe
        checkpoint = start_checkpoint(recipe, recipe_path, options, None, overrides, runs_root, device, progress)
        return train_or_resume(warm_started(recipe, checkpoint), runs_root, device=device, progress=progress,
                               label=label)
