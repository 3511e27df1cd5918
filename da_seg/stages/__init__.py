"""Stage registry: what runs a recipe, named by its top-level ``stage`` key (default ``train``).

``da-seg train``, ``da-seg sweep`` and ``da-seg check`` go through :func:`load` and ``STAGES``;
a new multi-step method is a new entry here (plus its components), with no edit to the runner.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from da_seg.config import Recipe, UnknownNameError, load_recipe
from da_seg.methods import validate
from da_seg.stages.base import parse_stage_options
from da_seg.stages.launch import LAUNCHERS, SlurmOptions, SweepJob, run_local_parallel, run_slurm
from da_seg.stages.self_train import SelfTrainStage
from da_seg.stages.train import TrainStage
from da_seg.stages.translate import TranslateStage
from da_seg.stages.warm_start import WarmStartStage
from da_seg.utils.progress import RunsClock, format_duration

STAGES = {
    TrainStage.name: TrainStage,
    TranslateStage.name: TranslateStage,
    SelfTrainStage.name: SelfTrainStage,
    WarmStartStage.name: WarmStartStage,
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
          device: str = "auto", progress: bool = True, launcher: str = "local", jobs: int = 1,
          slurm: SlurmOptions | None = None) -> list[Path]:
    """Every recipe over seeds 0..seeds-1, each by its stage; finished work is skipped and
    interrupted work resumed, so re-running a sweep after a crash completes it.
    Prints "run k of n" before each run, with the time left estimated from the runs that trained
    so far. Returns the result folders (``metrics.json``) for ``da-seg compare``.
    ``launcher``/``jobs``: one after another here (local, 1), ``jobs`` runs at once on this machine
    (local, N: a process and a GPU each), or a Slurm job each (slurm; ``slurm``: its resources);
    see :mod:`da_seg.stages.launch`."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher {launcher!r}; valid: {', '.join(LAUNCHERS)}")
    if jobs < 1:
        raise ValueError(f"jobs = {jobs}; expected 1 or more runs at once")
    jobs_at_once = jobs
    jobs = []  # (recipe file, stage, overrides, label): every recipe is checked before anything trains
    for path in recipe_paths:
        recipe = load(path, overrides)
        stage = stage_of(recipe)
        if not stage.per_seed:
            # Once, at the recipe's own seed (a translated domain serves every seed trained on it).
            jobs.append((path, stage, tuple(overrides), f"{recipe.name} (once, seed {recipe.train.seed})"))
        else:
            jobs += [(path, stage, (*overrides, f"train.seed={seed}"), f"{recipe.name} seed {seed}")
                     for seed in range(seeds)]
    if launcher == "slurm" or jobs_at_once > 1:
        return _launch(jobs, runs_root, launcher=launcher, workers=jobs_at_once, device=device,
                       slurm=slurm or SlurmOptions())
    clock = RunsClock(len(jobs))
    done = []
    for k, (path, stage, job_overrides, label) in enumerate(jobs, start=1):
        print(f"[sweep] run {k} of {len(jobs)}: {label} (elapsed {format_duration(clock.elapsed_s())}, "
              f"ETA {format_duration(clock.remaining_s())})", flush=True)
        started, wall = time.perf_counter(), time.time()
        folder = stage.run(path, overrides=job_overrides, runs_root=runs_root, device=device, progress=progress,
                           label=label)
        clock.finished(time.perf_counter() - started, did_work=_written_since(Path(folder) / "metrics.json", wall))
        done.append(folder)
    print(f"[sweep] {len(jobs)} runs in {format_duration(clock.elapsed_s())}", flush=True)
    return done


def _launch(jobs: list, runs_root: Path, *, launcher: str, workers: int, device: str,
            slurm: SlurmOptions) -> list[Path]:
    """The sweep's jobs through a launcher; finished runs are skipped before anything is started
    or submitted (the job that runs an interrupted one resumes it)."""
    folders: dict[int, Path] = {}
    todo: list[tuple[int, SweepJob]] = []
    for k, (path, stage, job_overrides, label) in enumerate(jobs):
        finished = getattr(stage, "finished", None)
        found = finished(path, overrides=job_overrides, runs_root=runs_root) if finished else None
        if found is not None:
            print(f"[sweep] {label}: finished in {found}; skipped", flush=True)
            folders[k] = found
        else:
            todo.append((k, SweepJob(Path(path), stage.name, tuple(job_overrides), label,
                                     alone=not getattr(stage, "runs_alongside", False))))
    print(f"[sweep] {len(todo)} of {len(jobs)} runs to do, launcher {launcher}"
          + (f", {workers} at once" if launcher == "local" else ""), flush=True)
    to_run = [job for _, job in todo]
    results = (run_slurm(to_run, runs_root, slurm) if launcher == "slurm"
               else run_local_parallel(to_run, runs_root, workers=workers, device=device))
    folders.update({k: Path(folder) for (k, _), folder in zip(todo, results)})
    return [folders[k] for k in sorted(folders)]


def _written_since(path: Path, wall_time: float) -> bool:
    # A stage that found its result already there returns it untouched; one that trained wrote it
    # (on a file system with 1-2 s timestamps, a run shorter than that may go uncounted: harmless).
    try:
        return path.stat().st_mtime >= wall_time
    except FileNotFoundError:
        return True
