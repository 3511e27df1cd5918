"""The ``self_train`` stage: offline self-training rounds (CBST / CRST): predict -> class-balanced
thresholds -> write -> train.

A recipe with ``stage = "self_train"`` (``da-seg train RECIPE``, ``da-seg self-train RECIPE`` with
its command-line options, or a sweep) runs, for round r = 1..R with portion
p_r = min(start + (r - 1) step, max):
  1. predict every target train image with the previous model (round 1: the warm-up model), keep
     per-class confidences, and compute the class-balanced thresholds (pass 1, ``thresholds.json``);
  2. predict again and write the pseudo-labels as 8-bit PNGs plus a descriptor of a new labelled
     domain whose images stay in the original target root (pass 2; two passes instead of storing
     C x H x W probability maps for the whole set: 160 MB per Cityscapes image);
  3. train the recipe with ``data.target`` = that domain (``pseudo_ce`` reads its labels), starting
     from the previous model's weights (``model.init_checkpoint``), through ``da_seg.runs``.

What decides the labels is ``da_seg.methods.cbst``; this module only sequences the rounds. The
recipe describes one round's training (source_ce + pseudo_ce); its ``[self_train]`` table holds
the rounds schedule (:class:`SelfTrainOptions`), which the command-line options override.
Everything lands in
``<runs>/<source>_to_<target>/<recipe>_selftrain/seed<N>/``:

  round_<r>/thresholds.json   thresholds, per-class pixel counts, portion, the model that predicted
  round_<r>/labels/           pseudo-label PNGs + pseudo_labels.json (the marker pseudo_ce requires)
  round_<r>/<target>_cbst_round<r>.toml   the pseudo-labelled domain
  round_<r>/labels.done       written when every label is on disk (per-class labelled shares)
  round_<r>/recipe.toml       the round's resolved recipe;  round_<r>/runs/...  its training run
  round_<r>/done              the run folder, its checkpoint and mIoU
  rounds.json, events.*       a summary of every finished round (also as TensorBoard scalars)

Resumable between and within rounds: a finished step is skipped (its marker file exists), a
half-written label set continues where it stopped (thresholds are reused, PNGs already written are
kept), and an interrupted training run is resumed from its last checkpoint. Single process only
(no torchrun): prediction runs on one device.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import click
import torch

from da_seg.config import ConfigError, Recipe, load_recipe, recipe_from_dict, to_toml
from da_seg.data.datasets import SegmentationDataset
from da_seg.data.domains import load_domain
from da_seg.data.pseudo_labels import pseudo_domain_descriptor, write_marker
from da_seg.engine.checkpoint import load_segmenter_checkpoint, restore_model
from da_seg.engine.logging import RunLogger
from da_seg.engine.trainer import amp_dtype_for, pick_device
from da_seg.methods.base import OptionError
from da_seg.methods.cbst import DEFAULT_CAP, LabellingOptions, PseudoLabelCE, label_target_set
from da_seg.runs import train_or_resume
from da_seg.stages.base import check_device, parse_stage_options
from da_seg.utils.files import write_json_atomic, write_text_atomic


@dataclass(frozen=True)
class SelfTrainOptions:
    """The recipe's ``[self_train]`` table: the rounds schedule (CRST's GTA5 defaults) and how
    each round predicts its pseudo-labels."""

    rounds: int = 3
    portion_start: float = 0.2
    portion_step: float = 0.05
    portion_max: float = 0.5
    scales: tuple[float, ...] = (1.0,)     # prediction input scales (x data.target_size or the file's size)
    flip: bool = False                     # average with the flipped prediction
    confidence_cap: int = DEFAULT_CAP      # per-class confidences kept for the thresholds
    warmup_recipe: str = ""                # round 0 model: this recipe's run (same seed), relative to the recipe file
    init_checkpoint: str = ""              # or a checkpoint that predicts round 1

    def __post_init__(self):
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if not self.scales or min(self.scales) <= 0:
            raise OptionError("scales", f"= {list(self.scales)!r}; expected positive factors, e.g. [1.0]")
        for key in ("portion_start", "portion_max"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise OptionError(key, f"= {getattr(self, key)!r}; expected a portion in (0, 1]")
        if self.portion_step < 0:
            raise OptionError("portion_step", f"= {self.portion_step!r}; expected >= 0")
        for key in ("rounds", "confidence_cap"):
            if getattr(self, key) < 1:
                raise OptionError(key, f"= {getattr(self, key)!r}; expected an integer >= 1")


def schedule_options(recipe: Recipe, **overrides) -> SelfTrainOptions:
    """The recipe's ``[self_train]`` options with the non-None ``overrides`` applied."""
    if PseudoLabelCE.name not in recipe.components:
        raise ConfigError(f"recipe {recipe.name!r}: self-training needs [components.{PseudoLabelCE.name}] "
                          "(cross-entropy on the pseudo-labelled target)")
    options = parse_stage_options(SelfTrainStage, recipe)
    return replace(options, **{k: v for k, v in overrides.items() if v is not None})


def portions(rounds: int, start: float, step: float, maximum: float) -> list[float]:
    """CRST's schedule: p_r = min(start + r * step, max), r = 0 .. rounds - 1."""
    return [round(min(start + r * step, maximum), 10) for r in range(rounds)]


def selftrain_dir(runs_root: Path, recipe: Recipe) -> Path:
    return Path(runs_root) / recipe.pair / f"{recipe.name}_selftrain" / f"seed{recipe.train.seed}"


def _miou(run_dir: Path, which: str) -> float | None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    record, primary = metrics.get(which), metrics.get("primary_domain")
    if not record or not primary:
        return None
    return record["domains"].get(primary, {}).get("miou")


def round_recipe(recipe: Recipe, round_index: int, descriptor: Path, init_checkpoint: Path) -> Recipe:
    """The recipe of one round, an ordinary training run: target = the pseudo-labelled domain,
    evaluation on the original target (or the recipe's val_domains), weights from the previous model."""
    raw = recipe.to_dict()
    raw.pop(SelfTrainStage.name, None)
    raw["stage"] = "train"
    raw["name"] = f"{recipe.name}_round{round_index}"
    raw["data"]["val_domains"] = list(recipe.val_domains)
    raw["data"]["target"] = str(descriptor)
    raw["model"]["init_checkpoint"] = str(init_checkpoint)
    return recipe_from_dict(raw, source=f"{recipe.name} round {round_index}")


# ---------------------------------------------------------------------------------------------
# Pseudo-labels

def generate_pseudo_labels(checkpoint: Path, recipe: Recipe, round_dir: Path, round_index: int, portion: float,
                           options: SelfTrainOptions, *, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """A round's pseudo-labelled domain; returns the ``labels.done`` record (skipped when it exists)."""
    done_file = round_dir / "labels.done"
    if done_file.exists():
        return json.loads(done_file.read_text())
    dev = pick_device(device)
    model = restore_model(load_segmenter_checkpoint(checkpoint), dev).eval()
    amp = amp_dtype_for(recipe.train.amp, dev)
    autocast = (lambda: torch.autocast(dev.type, dtype=amp)) if amp is not None else None
    target = load_domain(recipe.data.target)
    split = recipe.data.target_split
    dataset = SegmentationDataset(target, split, with_labels=False, size=recipe.data.target_size)
    labels_dir = round_dir / "labels"
    labelling = LabellingOptions(scales=options.scales, flip=options.flip, confidence_cap=options.confidence_cap,
                                 num_workers=recipe.data.num_workers, seed=recipe.train.seed)
    labels = label_target_set(model, dataset, labels_dir, portion, labelling, thresholds_file=round_dir / "thresholds.json",
                              device=dev, autocast=autocast, progress=progress, desc=f"round {round_index}")

    # The pseudo-labelled domain keeps the target's name, so each round's run is filed and compared
    # under the real <source>_to_<target> pair; its description and marker say what it is.
    descriptor = round_dir / "domain" / f"{target.name}.toml"
    description = (f"CBST pseudo-labels of {target.name} {split}, round {round_index}, portion {portion} "
                   f"(written by the self_train stage from {checkpoint})")
    write_marker(labels_dir, {"round": round_index, "portion": portion, "source_domain": target.name,
                              "split": split, "checkpoint": str(checkpoint), "thresholds": labels["thresholds"]})
    write_text_atomic(pseudo_domain_descriptor(target.name, target, split, labels_dir, description), descriptor)
    record = {"round": round_index, "portion": portion, "descriptor": str(descriptor), **labels}
    write_json_atomic(record, done_file)
    return record


# ---------------------------------------------------------------------------------------------
# The rounds

def run_rounds(recipe_path: str | Path, rounds: int | None = None, portion_start: float | None = None,
               portion_step: float | None = None, portion_max: float | None = None, *,
               runs_root: str | Path = "runs", init_checkpoint: str | Path | None = None,
               overrides: Sequence[str] = (), device: str = "auto", progress: bool = True) -> list[dict[str, Any]]:
    """Run (or continue) the self-training rounds of a recipe; returns one summary per round.

    Arguments left as None come from the recipe's ``[self_train]`` table (whose defaults are
    CRST's GTA5 schedule: portion 0.2, +0.05 a round, at most 0.5). The round-1 model is
    ``init_checkpoint``, else the recipe's ``self_train.init_checkpoint``, else the last
    checkpoint of its ``warmup_recipe`` trained (or reused when finished) under ``runs_root``.
    """
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path, tuple(overrides))
    from da_seg.methods import validate

    validate(recipe)
    options = schedule_options(recipe, rounds=rounds, portion_start=portion_start, portion_step=portion_step,
                               portion_max=portion_max)
    runs_root = Path(runs_root).absolute()  # the pseudo-label descriptors name their folders: not relative to $DA_SEG_DATA
    out = selftrain_dir(runs_root, recipe)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = start_checkpoint(recipe, recipe_path, options, init_checkpoint, overrides, runs_root,
                                  device, progress)

    summaries: list[dict[str, Any]] = []
    logger = RunLogger(out)
    try:
        for index, portion in enumerate(portions(options.rounds, options.portion_start, options.portion_step,
                                                 options.portion_max), start=1):
            round_dir = out / f"round_{index}"
            start = time.perf_counter()
            labels = generate_pseudo_labels(checkpoint, recipe, round_dir, index, portion, options,
                                            device=device, progress=progress)
            done_file = round_dir / "done"
            if done_file.exists():
                done = json.loads(done_file.read_text())
            else:
                this = round_recipe(recipe, index, Path(labels["descriptor"]), checkpoint)
                write_text_atomic(to_toml(this.to_dict()), round_dir / "recipe.toml")
                run_dir = train_or_resume(this, round_dir / "runs", device=device, progress=progress)
                done = {"round": index, "portion": portion, "run_dir": str(run_dir),
                        "checkpoint": str(run_dir / "last.pt"), "last_miou": _miou(run_dir, "last"),
                        "best_miou": _miou(run_dir, "best"), "seconds": time.perf_counter() - start}
                write_json_atomic(done, done_file)
            checkpoint = Path(done["checkpoint"])
            summary = {**done, "labelled_share": labels["labelled_share"], "thresholds": labels["thresholds"],
                       "class_share": labels["class_share"]}
            summaries.append(summary)
            write_json_atomic(summaries, out / "rounds.json")
            write_summary_metrics(out, recipe, summaries, finished=index == options.rounds)
            _log_round(logger, summary, recipe_classes(labels["descriptor"]))
            if progress:
                click.echo(f"[self-train] round {index}: portion {portion:.2f}, {100 * labels['labelled_share']:.1f}% "
                           f"of target pixels labelled, mIoU last {_fmt(done['last_miou'])} / best "
                           f"{_fmt(done['best_miou'])} ({done['run_dir']})")
    finally:
        logger.close()
    return summaries


def write_summary_metrics(out: Path, recipe: Recipe, summaries: list[dict[str, Any]], finished: bool) -> dict:
    """``out/metrics.json`` in the trainer's format for the rounds as one run (``da-seg compare``
    then lists the recipe next to the others): every round's evaluations, with iterations counted
    from the start of round 1; ``last`` = the last round's; ``best`` = the best of all rounds."""
    evaluations, offset, last_metrics = [], 0, None
    for summary in summaries:
        last_metrics = json.loads((Path(summary["run_dir"]) / "metrics.json").read_text())
        evaluations += [{**e, "iteration": e["iteration"] + offset, "round": summary["round"]}
                        for e in last_metrics["evaluations"]]
        offset += last_metrics["iterations"]
    primary = last_metrics["primary_domain"]

    def score(record):
        value = record["domains"].get(primary, {}).get("miou")
        return -1.0 if value is None else value

    metrics = {**{k: last_metrics[k] for k in ("source", "primary_domain", "val_domains", "class_names", "model")},
               "recipe": recipe.name, "target": Path(recipe.data.target).stem if recipe.data.target.endswith(".toml")
               else recipe.data.target, "seed": recipe.train.seed, "iterations": offset, "iteration": offset,
               "finished": finished, "status": "finished" if finished else "running",
               "components": list(recipe.components), "rounds": summaries, "evaluations": evaluations,
               "last": evaluations[-1] if evaluations else None,
               "best": max(evaluations, key=score) if evaluations else None}
    write_json_atomic(metrics, out / "metrics.json")
    return metrics


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def recipe_classes(descriptor: str) -> tuple[str, ...]:
    return load_domain(descriptor).class_names


def _log_round(logger, summary: dict[str, Any], class_names: Sequence[str]) -> None:
    step = summary["round"]
    values = {"selftrain/portion": summary["portion"], "selftrain/labelled_share": summary["labelled_share"]}
    for key in ("last_miou", "best_miou"):
        if summary.get(key) is not None:
            values[f"selftrain/{key}"] = summary[key]
    for name, k, share in zip(class_names, summary["thresholds"], summary["class_share"]):
        values[f"selftrain/threshold/{name}"] = k
        values[f"selftrain/class_share/{name}"] = share
    logger.scalars(values, step)
    logger.flush()


def warmup_checkpoint(recipe: Recipe, recipe_path: Path, warmup_recipe: str, seed: int, overrides,
                      runs_root: Path, device: str, progress: bool) -> Path:
    """``last.pt`` of the warm-up recipe (a path relative to ``recipe_path``) trained, or reused when
    finished, under ``runs_root`` at ``seed``. The warm-up is an ordinary run of its own recipe (shared
    with sweeps of that recipe): only overrides outside [components], the stage's table and the seed
    apply to it."""
    warmup_path = (recipe_path.parent / warmup_recipe).resolve()
    kept = [o for o in overrides if not o.strip().startswith(("components.", f"{recipe.stage}.", "train.seed"))]
    warmup = load_recipe(warmup_path, (*kept, f"train.seed={seed}"))
    if warmup.stage != "train":
        raise ConfigError(f"{warmup_path}: a warm-up recipe must be an ordinary training run (it has "
                          f"stage = {warmup.stage!r})")
    if progress:
        click.echo(f"[{recipe.stage}] warm-up model: {warmup.name} seed {seed} under {runs_root}")
    return train_or_resume(warmup, runs_root, device=device, progress=progress) / "last.pt"


def start_checkpoint(recipe: Recipe, recipe_path: Path, options, init_checkpoint, overrides, runs_root: Path,
                     device: str, progress: bool) -> Path:
    """The checkpoint a stage starts from: ``init_checkpoint`` (the command line), else
    ``options.init_checkpoint``, else the last checkpoint of ``options.warmup_recipe`` trained (or
    reused when finished) under ``runs_root`` with the recipe's seed. ``options``: any stage table
    with those two fields (``self_train``, ``warm_start``)."""
    if init_checkpoint:
        path = Path(init_checkpoint)
    elif options.init_checkpoint:
        path = Path(options.init_checkpoint)
    elif options.warmup_recipe:
        path = warmup_checkpoint(recipe, recipe_path, options.warmup_recipe, recipe.train.seed, overrides,
                                 runs_root, device, progress)
    else:
        raise ConfigError(f"recipe {recipe.name!r}: the {recipe.stage} stage needs a model to start from: pass "
                          f"--init CHECKPOINT, or set {recipe.stage}.warmup_recipe (a source-only recipe)")
    if not path.is_file():
        raise FileNotFoundError(f"{recipe.stage} start checkpoint not found: {path}")
    check_same_model(recipe, path)
    return path


def check_same_model(recipe: Recipe, checkpoint: Path) -> None:
    """The rounds load the start checkpoint into the recipe's model: both must be the same network
    (options such as caffe_style change the network without changing its parameter names)."""
    meta = load_segmenter_checkpoint(checkpoint)["model_meta"]
    ours = {"name": recipe.model.name, "options": json.loads(json.dumps(dict(recipe.model.options)))}
    theirs = {"name": meta.get("name"), "options": json.loads(json.dumps(meta.get("options", {})))}
    if ours != theirs:
        raise ConfigError(f"recipe {recipe.name!r} trains model {ours['name']!r} with options {ours['options']}, "
                          f"but the start checkpoint {checkpoint} is {theirs['name']!r} with options "
                          f"{theirs['options']}; make [model] match the checkpoint")


# ---------------------------------------------------------------------------------------------
# The stage

class SelfTrainStage:
    """Rounds of pseudo-labels and training, one set per seed (the warm-up model has the seed)."""

    name = "self_train"
    Options = SelfTrainOptions
    per_seed = True

    @staticmethod
    def run(recipe_path: Path, *, overrides: Sequence[str] = (), runs_root: Path, device: str = "auto",
            progress: bool = True, label: str = "", **options) -> Path:
        """Returns the stage folder, whose ``metrics.json`` holds the rounds as one run."""
        if label:
            print(f"[sweep] {label}: self-training rounds")
        run_rounds(recipe_path, runs_root=runs_root, overrides=overrides, device=device, progress=progress, **options)
        return selftrain_dir(Path(runs_root).absolute(), load_recipe(recipe_path, tuple(overrides)))


# ---------------------------------------------------------------------------------------------
# Command line (attached to the CLI as `da-seg self-train`)

@click.command("self-train")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--rounds", type=int, default=None, help="Rounds to run (default: self_train.rounds).")
@click.option("--portion-start", type=float, default=None, help="Portion p of round 1 (CRST GTA5: 0.2).")
@click.option("--portion-step", type=float, default=None, help="Added to p each round (0.05).")
@click.option("--portion-max", type=float, default=None, help="Upper bound of p (0.5).")
@click.option("--init", "init_checkpoint", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Checkpoint that predicts round 1 (default: the recipe's warmup_recipe run).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key.")
@click.option("--seed", type=int, default=None, help="Shortcut for --set train.seed=N.")
@click.option("--runs", "runs_root", default="runs", show_default=True, type=click.Path(file_okay=False))
@click.option("--device", default="auto", show_default=True, callback=check_device)
@click.option("--no-progress", is_flag=True)
def self_train(recipe, rounds, portion_start, portion_step, portion_max, init_checkpoint, overrides, seed,
               runs_root, device, no_progress):
    """Offline self-training (CBST): rounds of predict -> class-balanced thresholds -> retrain.
    Resumable: run the same command again to continue."""
    if seed is not None:
        overrides = (*overrides, f"train.seed={seed}")
    summaries = run_rounds(recipe, rounds, portion_start, portion_step, portion_max, runs_root=runs_root,
                           init_checkpoint=init_checkpoint, overrides=overrides, device=device,
                           progress=not no_progress)
    if summaries:
        last = summaries[-1]
        click.echo(f"final mIoU after round {last['round']}: last {_fmt(last['last_miou'])}, "
                   f"best {_fmt(last['best_miou'])}")
