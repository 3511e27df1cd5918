"""Starting, finding and resuming runs; the sweep over recipes and seeds."""
from __future__ import annotations

import json
from pathlib import Path

from da_seg.config import Recipe, load_recipe
from da_seg.engine import distributed as du


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


def train(recipe: Recipe, runs_root: Path, *, resume: Path | str | None = None, device: str = "auto",
          progress: bool = True) -> dict:
    """Train one recipe (one seed). ``resume``: a run folder, or "auto" for this recipe+seed's latest.

    Under torchrun every rank calls this; rank 0 picks the run folder and tells the others.
    """
    from da_seg.engine.trainer import Trainer, new_run_dir, pick_device

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
    trainer = Trainer(recipe, run_dir, device=device, resume=resuming, progress=progress, dist=dist)
    if dist.is_main:
        print(("resuming " if resuming else "run folder ") + str(run_dir))
    return trainer.fit()


def sweep(recipe_paths: list[Path], seeds: int, runs_root: Path, *, overrides: tuple[str, ...] = (),
          device: str = "auto", progress: bool = True) -> list[Path]:
    """Every recipe over seeds 0..seeds-1, one after another; finished runs are skipped and
    interrupted ones resumed, so re-running a sweep after a crash completes it."""
    from da_seg.selftrain import is_self_training_recipe, run_rounds, selftrain_dir
    from da_seg.translate import is_translation_recipe, run_translate

    done = []
    for path in recipe_paths:
        recipe = load_recipe(path, tuple(overrides))
        if is_translation_recipe(recipe):
            # Once, at the recipe's own seed: one translated domain serves every seed of the recipes
            # trained on it (a second translator would also be refused by the images the first wrote).
            print(f"[sweep] {recipe.name}: translation stage (once, seed {recipe.train.seed} of the recipe)")
            run_translate(path, overrides=overrides, runs_root=runs_root, device=device, progress=progress)
            done.extend(find_runs(runs_root, recipe)[-1:])
            continue
        for seed in range(seeds):
            seed_overrides = (*overrides, f"train.seed={seed}")
            recipe = load_recipe(path, seed_overrides)
            if is_self_training_recipe(recipe):  # offline rounds (CBST): resumable on their own
                print(f"[sweep] {recipe.name} seed {seed}: self-training rounds")
                run_rounds(path, runs_root=runs_root, overrides=seed_overrides, device=device, progress=progress)
                done.append(selftrain_dir(runs_root, recipe))
                continue
            existing = find_runs(runs_root, recipe)
            latest = existing[-1] if existing else None
            status = run_status(latest) if latest else "empty"
            if status == "finished":
                print(f"[sweep] {recipe.name} seed {seed}: finished in {latest}, skipped")
            else:
                print(f"[sweep] {recipe.name} seed {seed}: " + ("resuming " + str(latest) if status == "resumable"
                                                                else "starting"))
                train(recipe, runs_root, resume=latest if status == "resumable" else None, device=device,
                      progress=progress)
                latest = find_runs(runs_root, recipe)[-1]
            done.append(latest)
    return done
