"""The ``train`` stage: one ordinary run of the training loop (the default of every recipe)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from da_seg.config import load_recipe
from da_seg.runs import train_or_resume
from da_seg.stages.base import NoOptions


class TrainStage:
    """One run per seed; a finished run of the same recipe and seed is reused, an interrupted one resumed."""

    name = "train"
    Options = NoOptions
    per_seed = True

    @staticmethod
    def run(recipe_path: Path, *, overrides: Sequence[str] = (), runs_root: Path, device: str = "auto",
            progress: bool = True, label: str = "") -> Path:
        recipe = load_recipe(recipe_path, tuple(overrides))
        return train_or_resume(recipe, Path(runs_root), device=device, progress=progress, label=label)
