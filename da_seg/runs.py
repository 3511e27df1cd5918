"""Run folders: where a run lives, whether it finished, and training one (new or resumed).

``runs/<recipe>/<source>_to_<target>/<seed>-<time>-<identity>/`` holds one run (recipe first, so
that TensorBoard's run names start with it): ``recipe.toml``, ``trackers.json`` (MLflow / W&B run ids),
``metrics.json``, ``last.pt``, ``best.pt``, ``train.log`` (the log records of the run: which
pretrained tensors loaded, warnings) and its TensorBoard events. ``<identity>`` is
:func:`da_seg.config.recipe_identity`, a hash of everything the run trains: a run is found
(skipped when finished, resumed when interrupted) only by a recipe with the same name, seed and
identity, so a sweep with another ``--set`` never reuses a run it did not ask for. Folders are
created with an exclusive ``mkdir``: two runs started in the same second get two folders.
Stages (``da_seg.stages``) call :func:`train` and :func:`train_or_resume`; nothing here knows a stage.
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from da_seg.config import Recipe, recipe_identity, saved_identity
from da_seg.utils import distributed as du
from da_seg.utils.files import StorageError, make_new_folder, remove_new_folders


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


def run_identity(run_dir: Path) -> str | None:
    """The identity of the recipe a run trained: from its folder name, or (folders made before
    identities were named) from its saved ``recipe.toml``; None when neither tells."""
    parts = run_dir.name.split("-")
    if len(parts) >= 4 and re.fullmatch(r"[0-9a-f]{8}", parts[3]):
        return parts[3]
    return saved_identity(run_dir / "recipe.toml")


def recipe_runs_dir(runs_root: Path, recipe: Recipe) -> Path:
    """Where this recipe's runs are made: ``<runs_root>/<recipe>/<source>_to_<target>``."""
    return Path(runs_root) / recipe.name / recipe.pair


def find_runs(runs_root: Path, recipe: Recipe) -> list[Path]:
    """This recipe's run folders for its seed and identity, oldest first (by their time stamp),
    including those of the earlier layout ``<runs_root>/<source>_to_<target>/<recipe>``."""
    seed, identity = str(recipe.train.seed), recipe_identity(recipe)
    found = []
    for folder in (recipe_runs_dir(runs_root, recipe), Path(runs_root) / recipe.pair / recipe.name):
        if folder.is_dir():
            found += [p for p in folder.iterdir()
                      if p.is_dir() and p.name.split("-", 1)[0] == seed and run_identity(p) == identity]
    return sorted(found, key=lambda p: (p.name, str(p)))


def new_run_dir(runs_root: Path, recipe: Recipe) -> tuple[Path, list[Path]]:
    """Create (exclusively) a fresh run folder ``<seed>-<time>-<identity>[-n]``; returns it and the
    folders made for it (for :func:`remove_new_folders`). StorageError when it cannot be written."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = recipe_runs_dir(runs_root, recipe) / f"{recipe.train.seed}-{stamp}-{recipe_identity(recipe)}"
    path, n = base, 1
    while True:
        try:
            # atomic (the last mkdir of the chain): of two runs started within the same second, one gets -1
            return path, make_new_folder(path, "the run folder")
        except (FileExistsError, StorageError) as err:
            if not isinstance(err, FileExistsError) and not isinstance(err.__cause__, FileExistsError):
                raise  # not a name clash: the folder cannot be written at all
            path, n = base.with_name(f"{base.name}-{n}"), n + 1


def train(recipe: Recipe, runs_root: Path, *, resume: Path | str | None = None, device: str = "auto",
          progress: bool = True, val_domains: Sequence[str] | None = None,
          allow_changes: Sequence[str] = ()) -> dict[str, Any]:
    """Train one recipe (one seed). ``resume``: a run folder, or "auto" for this recipe+seed's latest.
    ``val_domains``: what to score (default: the recipe's; a translator stage scores nothing).
    ``allow_changes``: recipe keys a resume may change (recorded in the run's metrics.json).
    Returns the run's metrics (:func:`train_in_folder` also returns its folder).

    Under torchrun every rank calls this; rank 0 picks the run folder and tells the others.
    """
    return train_in_folder(recipe, runs_root, resume=resume, device=device, progress=progress,
                           val_domains=val_domains, allow_changes=allow_changes)[1]


def train_in_folder(recipe: Recipe, runs_root: Path, *, resume: Path | str | None = None, device: str = "auto",
                    progress: bool = True, val_domains: Sequence[str] | None = None,
                    allow_changes: Sequence[str] = ()) -> tuple[Path, dict[str, Any]]:
    """:func:`train`, returning (run folder, metrics)."""
    from da_seg.engine.logging import run_log_file
    from da_seg.engine.trainer import Trainer, pick_device

    dist = du.init_distributed(str(pick_device(device)))
    run_dir: Path | None = None
    resuming, made = False, []
    if dist.is_main:
        if resume == "auto":
            candidates = [p for p in find_runs(runs_root, recipe) if run_status(p) in ("resumable", "finished")]
            run_dir = candidates[-1] if candidates else None
            resuming = run_dir is not None and run_status(run_dir) == "resumable"
            if run_dir is not None and not resuming:
                print(f"{run_dir} is already finished; nothing to resume")
                return run_dir, json.loads((run_dir / "metrics.json").read_text())
        elif resume:
            run_dir = Path(resume)
            if not (run_dir / "last.pt").exists():
                raise FileNotFoundError(f"--resume {run_dir}: no last.pt there (expected a run folder)")
            resuming = True
        if run_dir is None:
            run_dir, made = new_run_dir(runs_root, recipe)
    run_dir, resuming = du.broadcast_object((run_dir, resuming))
    # The folder is made (exclusively) before anything is built, so that one that cannot be written
    # fails first, and it is removed again if the run cannot start (a data error): no half-made folders.
    started = False
    try:
        with run_log_file(run_dir if dist.is_main else None):
            trainer = Trainer(recipe, run_dir, device=device, resume=resuming, progress=progress, dist=dist,
                              val_domains=val_domains, allow_changes=allow_changes)
            started = True
            if dist.is_main:
                print(("resuming " if resuming else "run folder ") + str(run_dir))
            return run_dir, trainer.fit()
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
