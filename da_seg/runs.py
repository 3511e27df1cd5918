"""Run folders: where a run lives, whether it finished, and training one (new or resumed).

``runs/<source>_to_<target>/<recipe>/<seed>-<time>/`` holds one run: ``recipe.toml``,
``metrics.json``, ``last.pt``, ``best.pt``, ``train.log`` (the log records of the run: which
pretrained tensors loaded, warnings) and its TensorBoard events. Stages
(``da_seg.stages``) call :func:`train` and :func:`train_or_resume`; nothing here knows a stage.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from da_seg.config import Recipe
from da_seg.utils import distributed as du
from da_seg.utils.files import make_new_folder, remove_new_folders


def run_status(run_dir: Path) -> str:
    """'finished', 'resumable' (has last.pt), 'failed: ...' or 'empty'."""
    metrics = run_dir / "metrics.json"
    if metrics.exists():
        data = json.loads(metrics.read_text())
        if data.get("finished"):
            return "finished"
        if str(data.get("status", "")).startswith("failed"):
            return data["status"]
    return "resumable" if (run_dir / "last.pt").exists() else "empty"


def find_runs(runs_root: Path, recipe: Recipe) -> list[Path]:
    """This recipe's run folders for its seed, oldest first."""
    folder = Path(runs_root) / recipe.pair / recipe.name
    if not folder.is_dir():
        return []
    seed = str(recipe.train.seed)
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.split("-", 1)[0] == seed)


def new_run_dir(runs_root: Path, recipe: Recipe) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(runs_root) / recipe.pair / recipe.name / f"{recipe.train.seed}-{stamp}"
    path, n = base, 1
    while path.exists():  # two runs started within the same second
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def train(recipe: Recipe, runs_root: Path, *, resume: Path | str | None = None, device: str = "auto",
          progress: bool = True, val_domains: Sequence[str] | None = None) -> dict[str, Any]:
    """Train one recipe (one seed). ``resume``: a run folder, or "auto" for this recipe+seed's latest.
    ``val_domains``: what to score (default: the recipe's; a translator stage scores nothing).

    Under torchrun every rank calls this; rank 0 picks the run folder and tells the others.
    """
    from da_seg.engine.logging import run_log_file
    from da_seg.engine.trainer import Trainer, pick_device

    dist = du.init_distributed(str(pick_device(device)))
    run_dir: Path | None = None
    resuming = False
    if dist.is_main:
        if resume == "auto":
            candidates = [p for p in find_runs(runs_root, recipe) if run_status(p) in ("resumable", "finished")]
            run_dir = candidates[-1] if candidates else None
            resuming = run_dir is not None and run_status(run_dir) == "resumable"
            if run_dir is not None and not resuming:
                print(f"{run_dir} is already finished; nothing to resume")
                return json.loads((run_dir / "metrics.json").read_text())
        elif resume:
            run_dir = Path(resume)
            if not (run_dir / "last.pt").exists():
                raise FileNotFoundError(f"--resume {run_dir}: no last.pt there (expected a run folder)")
            resuming = True
        if run_dir is None:
            run_dir = new_run_dir(runs_root, recipe)
    run_dir, resuming = du.broadcast_object((run_dir, resuming))
    # The folder is made before anything is built, so that one that cannot be written fails first,
    # and it is removed again if the run cannot start (a data error): no half-made run folders.
    made = make_new_folder(run_dir, "the run folder") if dist.is_main and not resuming else []
    started = False
    try:
        with run_log_file(run_dir if dist.is_main else None):
            trainer = Trainer(recipe, run_dir, device=device, resume=resuming, progress=progress, dist=dist,
                              val_domains=val_domains)
            started = True
            if dist.is_main:
                print(("resuming " if resuming else "run folder ") + str(run_dir))
            return trainer.fit()
    finally:
        if not started:  # after run_log_file closed train.log
            remove_new_folders(made)


def train_or_resume(recipe: Recipe, runs_root: Path, *, device: str = "auto", progress: bool = True,
                    val_domains: Sequence[str] | None = None, label: str = "") -> Path:
    """Train ``recipe`` under ``runs_root`` unless a finished run exists; resume an interrupted one.
    Returns the run folder. ``label``: printed with what was decided (a sweep's progress)."""
    existing = find_runs(runs_root, recipe)
    latest = existing[-1] if existing else None
    status = run_status(latest) if latest else "empty"
    if label:
        print(f"[sweep] {label}: " + {"finished": f"finished in {latest}, skipped",
                                      "resumable": f"resuming {latest}"}.get(status, "starting"))
    if status != "finished":
        train(recipe, runs_root, resume=latest if status == "resumable" else None, device=device, progress=progress,
              val_domains=val_domains)
        latest = find_runs(runs_root, recipe)[-1]
    return latest
