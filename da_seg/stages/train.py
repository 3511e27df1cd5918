"""The ``train`` stage: one ordinary run of the training loop (the default of every recipe)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from da_seg.config import load_recipe
from da_seg.runs import find_runs, run_status, train_or_resume
from da_seg.stages.base import NoOptions


class TrainStage:
    """One run per seed; a finished run of the same recipe and seed is reused, an interrupted one resumed."""

    name = "train"
    Options = NoOptions
    per_seed = True
    runs_alongside = True   # a sweep launcher may run it at the same time as other runs

    @staticmethod
    def finished(recipe_path: Path, *, overrides: Sequence[str] = (), runs_root: Path) -> Path | None:
        """The recipe's finished run (its latest), which a sweep skips; None when there is none."""
        recipe = load_recipe(recipe_path, tuple(overrides))
        runs = find_runs(Path(runs_root), recipe)
        return runs[-1] if runs and run_status(runs[-1]) == "finished" else None

    @staticmethod
    def run(recipe_path: Path, *, overrides: Sequence[str] = (), runs_root: Path, device: str = "auto",
            progress: bool = True, label: str = "") -> Path:
        recipe = load_recipe(recipe_path, tuple(overrides))
        return train_or_resume(recipe, Path(runs_root), device=device, progress=progress, label=label)
