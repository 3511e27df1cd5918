"""The ``dual_path`` stage: Dual Path Learning (DPL; Cheng et al., ICCV 2021; royee182/DPL).

A recipe with ``stage = "dual_path"`` describes one round's training of a path (source_ce +
pseudo_ce + an output-space discriminator); its ``[dual_path]`` table (:class:`DualPathOptions`)
names the sub-recipes and the rounds. Per seed, in order (each step is skipped when its result
is on disk, and an interrupted training run is resumed, so a killed sweep continues):

  1. ``translator_recipe``: a plain CycleGAN (the translate stage) trained once for every seed,
     its source -> target images written under ``<stage>/translator/``;
  2. warm-up: M_S^0 = ``source_warmup_recipe`` (source-only) and M_T^0 =
     ``target_warmup_recipe`` with ``data.source`` = the plain translated source (README, "Single
     path warm up"; the release's label-correction rounds of M_T's warm-up are not done);
  3. DPIT: the translator again with the dual-path semantic terms on frozen M_S^0 / M_T^0
     (``da_seg.methods.dual_path``), trained from scratch as the release (``dpit_from_plain =
     false``) or fine-tuned from step 1's weights; both directions are written as domains:
     source -> target (M_T's path) and the target's splits -> source style (M_S's path);
  4. rounds r = 1..R (README step 3): dual-path pseudo-labels of the target's adaptation split from
     M_T^{r-1}(x_t) and M_S^{r-1}(G_ts(x_t)) (``quantiles[r-1]``, the last repeating), then
     M_S^r = this recipe on source + pseudo-labelled target-in-source-style and M_T^r = this
     recipe on the DPIT source + pseudo-labelled target, each from its previous weights; then
     both paths fused (alpha = ``fusion_alpha``) and scored as one ``dual_path`` segmenter,
     saved as ``round_<r>/dual_path.pt`` (``da-seg eval`` / ``predict`` take it).

Everything lands in ``<runs>/<source>_to_<target>/<recipe>_dualpath/``: ``translator/`` (step 1,
shared by the seeds) and ``seed<N>/`` with ``dpit.toml``, ``translated/``, ``domains/``, ``runs/``
(warm-ups of step 2 are ordinary runs under ``<runs>`` itself, shared with sweeps of their
recipes), ``round_<r>/{thresholds.json, labels/, labels.done, runs/, dual_path.pt, done}`` and
``metrics.json``: the fused model's evaluations, one per round (what ``da-seg compare`` reads:
DPL-Dual); each round's ``done`` also holds M_T alone (DPL) and M_S.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np
import torch
from PIL import Image

from da_seg.config import ConfigError, Recipe, load_recipe, recipe_from_dict, to_toml
from da_seg.data.augment import to_float_images
from da_seg.data.datasets import SegmentationDataset
from da_seg.data.domains import load_domain
from da_seg.data.loaders import eval_loader
from da_seg.data.pseudo_labels import pseudo_domain_descriptor, write_label_png, write_marker
from da_seg.engine.checkpoint import load_segmenter_checkpoint, restore_model, save_atomic
from da_seg.engine.evaluate import evaluate
from da_seg.engine.trainer import pick_device
from da_seg.methods.base import OptionError
from da_seg.methods.cbst import DEFAULT_CAP, ClassConfidenceSample, PseudoLabelCE, predict_probabilities
from da_seg.methods.cyclegan import CycleGAN, CycleGANOptions
from da_seg.methods.dual_path import quantile_thresholds, select_labels
from da_seg.models import build_model
from da_seg.models.dual_path import IDENTITY_NORM, fuse_paths
from da_seg.runs import train_or_resume
from da_seg.stages.base import parse_stage_options
from da_seg.stages.self_train import check_same_model
from da_seg.stages.translate import generator_options, load_generator, run_translate
from da_seg.utils.files import write_json_atomic, write_text_atomic

DUAL_PATH_MODEL = "dual_path"
KEPT_BYTES = 2 ** 30  # pass-1 predictions kept in memory for pass 2 (beyond: predicted again)


@dataclass(frozen=True)
class DualPathOptions:
    """The recipe's ``[dual_path]`` table; defaults are the release's (README, DP_SSL.py, evaluation_DPL.py)."""

    translator_recipe: str = ""          # plain CycleGAN (stage = "translate"), relative to this recipe
    source_warmup_recipe: str = ""       # M_S^0: a source-only recipe
    target_warmup_recipe: str = ""       # M_T^0: trained with data.source = the plain translated source
    dpit_weight: float = 1.0             # lambda (--lambda_semantic 1)
    dpit_iters: int = 0                  # DPIT schedule; 0 = the translator recipe's
    dpit_from_plain: bool = False        # start DPIT from step 1's weights (the release: from scratch)
    rounds: int = 4                      # README: step 3 once, then "3 more rounds"
    quantiles: tuple[float, ...] = (0.3, 0.25)   # --threshlen per round, the last repeating
    confidence_cap: float = 0.9          # --thresh: no class threshold above this
    label_alpha: float = 0.5             # --alpha of DP_SSL.py (pseudo-labels)
    fusion_alpha: float = 0.55           # evaluation_DPL.py (DPL-Dual inference)
    confidence_sample: int = DEFAULT_CAP # per-class confidences kept for the quantiles (exact below)

    def __post_init__(self):
        object.__setattr__(self, "quantiles", tuple(float(q) for q in self.quantiles))
        for key in ("translator_recipe", "source_warmup_recipe", "target_warmup_recipe"):
            if not getattr(self, key):
                raise OptionError(key, "is required (a recipe file, relative to this recipe)")
        if not self.quantiles or not all(0.0 <= q < 1.0 for q in self.quantiles):
            raise OptionError("quantiles", f"= {list(self.quantiles)!r}; expected fractions in [0, 1), e.g. [0.3, 0.25]")
        for key in ("confidence_cap", "label_alpha", "fusion_alpha"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise OptionError(key, f"= {getattr(self, key)!r}; expected a value in [0, 1]")
        for key in ("rounds", "confidence_sample"):
            if getattr(self, key) < 1:
                raise OptionError(key, f"= {getattr(self, key)!r}; expected an integer >= 1")
        if self.dpit_weight < 0 or self.dpit_iters < 0:
            raise OptionError("dpit_weight" if self.dpit_weight < 0 else "dpit_iters", "must be >= 0")


def stage_root(runs_root: Path, recipe: Recipe) -> Path:
    return Path(runs_root).absolute() / recipe.pair / f"{recipe.name}_dualpath"


def _kept(overrides: Sequence[str], *, seed: bool) -> list[str]:
    """Overrides that reach the sub-recipes: not this recipe's components or table (and, for the
    seed-independent translator, not the seed)."""
    prefixes = ("components.", f"{DualPathStage.name}.", "stage", "name") + (() if seed else ("train.seed",))
    return [o for o in overrides if not o.strip().startswith(prefixes)]


def _write_recipe(raw: dict[str, Any], path: Path, source: str) -> Path:
    recipe_from_dict(raw, source=source)  # fails here, not halfway through a run
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(to_toml(raw), path)
    return path


def _miou(metrics: dict[str, Any], which: str = "last") -> float | None:
    record, primary = metrics.get(which) or {}, metrics.get("primary_domain")
    return (record.get("domains", {}).get(primary) or {}).get("miou")


# ---------------------------------------------------------------------------------------------
# Steps 1-3: translator, warm-up, DPIT

def plain_translation(recipe_path: Path, recipe: Recipe, options: DualPathOptions, overrides, runs_root: Path,
                      device: str, progress: bool) -> dict[str, Any]:
    """Step 1: the plain translator (once for every seed) and its translated source."""
    shared = stage_root(runs_root, recipe) / "translator"
    base = load_recipe((recipe_path.parent / options.translator_recipe).resolve(), _kept(overrides, seed=False))
    if CycleGAN.name not in base.components or base.stage != "translate":
        raise ConfigError(f"{recipe.name}: dual_path.translator_recipe = {options.translator_recipe!r} must be a "
                          f"translate recipe with [components.{CycleGAN.name}]")
    raw = base.to_dict()
    raw.setdefault("translate", {})["output_dir"] = str(shared / "images")
    path = _write_recipe(raw, shared / "translator.toml", f"{recipe.name} translator")
    return run_translate(path, runs_root=runs_root, descriptor_dir=shared / "domains", device=device,
                         progress=progress)


def warmup_models(recipe_path: Path, recipe: Recipe, options: DualPathOptions, translated_source: str,
                  overrides, runs_root: Path, device: str, progress: bool) -> tuple[Path, Path]:
    """Step 2: (M_S^0, M_T^0) last checkpoints, ordinary runs under ``runs_root``."""
    kept = (*_kept(overrides, seed=True), f"train.seed={recipe.train.seed}")
    checkpoints = []
    for key, source in (("source_warmup_recipe", None), ("target_warmup_recipe", translated_source)):
        warmup = load_recipe((recipe_path.parent / getattr(options, key)).resolve(), kept)
        if warmup.stage != "train":
            raise ConfigError(f"{recipe.name}: dual_path.{key} must be an ordinary training run (it has stage = "
                              f"{warmup.stage!r})")
        if source is not None:
            raw = warmup.to_dict()
            raw["data"]["source"] = source
            warmup = recipe_from_dict(raw, source=f"{warmup.name} on {source}")
        if progress:
            click.echo(f"[dual-path] warm-up {key.split('_')[0]} path: {warmup.name} seed {warmup.train.seed}")
        last = train_or_resume(warmup, runs_root, device=device, progress=progress) / "last.pt"
        check_same_model(recipe, last)
        checkpoints.append(last)
    return checkpoints[0], checkpoints[1]


def dual_path_translation(recipe_path: Path, recipe: Recipe, options: DualPathOptions, plain: dict[str, Any],
                          warmups: tuple[Path, Path], overrides, seed_dir: Path, device: str,
                          progress: bool) -> dict[str, Any]:
    """Step 3: the DPIT translator of this seed; both directions written under ``seed_dir``."""
    base = load_recipe((recipe_path.parent / options.translator_recipe).resolve(),
                       (*_kept(overrides, seed=True), f"train.seed={recipe.train.seed}"))
    raw = base.to_dict()
    raw["name"] = f"{recipe.name}_dpit"
    cyclegan = raw["components"][CycleGAN.name] = dict(raw["components"].get(CycleGAN.name) or {})
    cyclegan.update(dual_path_weight=options.dpit_weight, source_path_checkpoint=str(warmups[0]),
                    target_path_checkpoint=str(warmups[1]))
    if options.dpit_from_plain:
        cyclegan["init_checkpoint"] = str(Path(plain["run_dir"]) / "last.pt")
    if options.dpit_iters:
        raw["schedule"]["iters"] = options.dpit_iters
    source, target = load_domain(recipe.data.source), load_domain(recipe.data.target)
    raw["translate"] = {**raw.get("translate", {}), "output_domain": f"{source.name}_dpit",
                        "output_dir": str(seed_dir / "translated" / "source"),
                        "target_output_domain": f"{target.name}_dpit",
                        "target_output_dir": str(seed_dir / "translated" / "target"),
                        "target_splits": [recipe.data.target_split, recipe.data.val_split]}
    path = _write_recipe(raw, seed_dir / "dpit.toml", f"{recipe.name} DPIT")
    return run_translate(path, runs_root=seed_dir / "runs", descriptor_dir=seed_dir / "domains", device=device,
                         progress=progress)


# ---------------------------------------------------------------------------------------------
# Step 4: rounds

@torch.no_grad()
def label_round(checkpoints: tuple[Path, Path], recipe: Recipe, translated_target: str, round_dir: Path,
                quantile: float, options: DualPathOptions, *, device: str, progress: bool) -> dict[str, Any]:
    """Dual-path pseudo-labels of the target's adaptation split (two passes: quantile thresholds
    over the whole set, then labels); returns the ``labels.done`` record (skipped when it exists)."""
    done_file = round_dir / "labels.done"
    if done_file.exists():
        return json.loads(done_file.read_text())
    dev = pick_device(device)
    model_s, model_t = (restore_model(load_segmenter_checkpoint(c), dev).eval() for c in checkpoints)
    target, in_source_style = load_domain(recipe.data.target), load_domain(translated_target)
    split, size = recipe.data.target_split, recipe.data.target_size
    real = SegmentationDataset(target, split, with_labels=False, size=size)
    styled = SegmentationDataset(in_source_style, split, with_labels=False, size=size)
    if [s.name for s in real.samples] != [s.name for s in styled.samples]:
        raise ValueError(f"{in_source_style.descriptor}: its {split} images are not those of {target.name}")
    num_classes = model_t.num_classes

    def fused(index: int):
        """The sample and its fused probabilities (C, H, W) at the image's own size."""
        sample = real.samples[index]
        with Image.open(sample.image) as image:
            out_size = (image.height, image.width)
        p_t = predict_probabilities(model_t, _float_image(real[index], dev), out_size)[0]
        p_s = predict_probabilities(model_s, _float_image(styled[index], dev), out_size)[0]
        return sample, fuse_paths(p_t, p_s, options.label_alpha)

    # Pass 1 keeps each image's (confidence, label) for pass 2 while they fit in KEPT_BYTES
    # (5 bytes a pixel: the synthetic sets take 80 MB), so that each image is predicted once.
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    kept_bytes = 0
    thresholds_file = round_dir / "thresholds.json"
    if thresholds_file.exists():
        thresholds = torch.tensor(json.loads(thresholds_file.read_text())["thresholds"])
    else:
        confidences = ClassConfidenceSample(num_classes, cap=options.confidence_sample, seed=recipe.train.seed)
        for i in range(len(real)):
            probs = fused(i)[1]
            confidences.add(probs)  # per predicted class, its max fused probability
            confidence, label = probs.max(0)
            if kept_bytes + 5 * label.numel() <= KEPT_BYTES:
                kept[i] = (confidence.cpu(), label.to(torch.uint8).cpu())
                kept_bytes += 5 * label.numel()
        thresholds = quantile_thresholds([confidences.sample(c) for c in range(num_classes)], quantile,
                                         options.confidence_cap)
        write_json_atomic({"quantile": quantile, "cap": options.confidence_cap, "thresholds": thresholds.tolist(),
                           "predicted_pixels": confidences.counts.tolist(), "exact": confidences.exact,
                           "alpha": options.label_alpha, "checkpoints": [str(c) for c in checkpoints]},
                          thresholds_file)
    labels_dir = round_dir / "labels"
    counts = np.zeros(num_classes + 1, dtype=np.int64)
    for i, sample in enumerate(real.samples):
        path = labels_dir / (sample.name + ".png")
        if path.exists():  # written by an interrupted pass 2
            with Image.open(path) as image:
                selected = np.asarray(image)
        else:
            if i in kept:  # pass 1's prediction of this image
                confidence, label = kept.pop(i)
                label = label.long()
            else:
                confidence, label = fused(i)[1].max(0)
            selected = select_labels(label, confidence, thresholds).to(torch.uint8).cpu().numpy()
            write_label_png(selected, path)
        counts += np.bincount(np.minimum(selected, num_classes).ravel(), minlength=num_classes + 1)
    write_marker(labels_dir, {"quantile": quantile, "source_domain": target.name, "split": split,
                              "checkpoints": [str(c) for c in checkpoints], "thresholds": thresholds.tolist()})
    descriptors = {}
    for key, domain in (("target", target), ("target_in_source_style", in_source_style)):
        path = round_dir / "domains" / key / f"{domain.name}.toml"
        write_text_atomic(pseudo_domain_descriptor(domain.name, domain, split, labels_dir,
                                                   f"DPL dual-path pseudo-labels of {target.name} {split} "
                                                   f"(quantile {quantile}), on {domain.name}'s images"), path)
        descriptors[key] = str(path)
    total = max(int(counts.sum()), 1)
    record = {"quantile": quantile, "thresholds": thresholds.tolist(), "descriptors": descriptors,
              "labelled_share": float(counts[:num_classes].sum() / total),
              "class_share": (counts[:num_classes] / total).tolist()}
    write_json_atomic(record, done_file)
    return record


def _float_image(item: dict[str, Any], device) -> torch.Tensor:
    return to_float_images(item["image"][None].to(device))                         # (1, 3, H, W)


def path_recipe(recipe: Recipe, name: str, source: str, target: str, val_domains: Sequence[str],
                init_checkpoint: Path) -> Recipe:
    """One path's training in one round: an ordinary run of this recipe."""
    raw = recipe.to_dict()
    raw.pop(DualPathStage.name, None)
    raw.update(stage="train", name=name)
    raw["data"].update(source=source, target=target, val_domains=list(val_domains))
    raw["model"]["init_checkpoint"] = str(init_checkpoint)
    return recipe_from_dict(raw, source=name)


def dual_path_checkpoint(translator: Path, cyclegan: CycleGANOptions, paths: tuple[Path, Path], alpha: float,
                         out: Path) -> Path:
    """Save G_ts (of the ``translator`` checkpoint) + M_S + M_T (``paths``) as one ``dual_path``
    segmenter checkpoint, which ``da-seg eval`` and ``predict`` take like any other."""
    states = [load_segmenter_checkpoint(p) for p in paths]
    metas = [s["model_meta"] for s in states]
    options = {"alpha": alpha, "translator": {"ngf": cyclegan.ngf, "n_blocks": cyclegan.n_blocks},
               "source_model": {k: metas[0][k] for k in ("name", "options", "input_norm", "align_corners")},
               "target_model": {k: metas[1][k] for k in ("name", "options", "input_norm", "align_corners")}}
    model = build_model(DUAL_PATH_MODEL, metas[1]["num_classes"], **options)
    model.translator.load_state_dict(load_generator(translator, cyclegan, "cpu", "g_ts").state_dict())
    model.source_model.load_state_dict(states[0]["model"])
    model.target_model.load_state_dict(states[1]["model"])
    meta = {"name": DUAL_PATH_MODEL, "options": options, "num_classes": model.num_classes,
            "input_norm": dataclasses.asdict(IDENTITY_NORM), "align_corners": False,
            "class_names": metas[1]["class_names"], "colors": metas[1]["colors"]}
    save_atomic({"iteration": states[1]["iteration"], "model_meta": meta, "model": model.state_dict(),
                 "paths": [str(p) for p in paths], "translator": str(translator)}, out)
    return out


def evaluate_checkpoint(checkpoint: Path, recipe: Recipe, device: str) -> dict[str, Any]:
    """{domain: metrics} of a segmenter checkpoint on the recipe's val domains."""
    dev = pick_device(device)
    model = restore_model(load_segmenter_checkpoint(checkpoint), dev).eval()
    domains = {}
    for name in recipe.val_domains:
        domain = load_domain(name)
        dataset = SegmentationDataset(domain, recipe.data.val_split, with_labels=True, size=recipe.data.val_size)
        result = evaluate(model, eval_loader(dataset, 1), num_classes=domain.num_classes, device=dev,
                          class_subsets=domain.class_subsets)
        domains[domain.name] = result.metrics.to_json()
    return domains


def run_dual_path(recipe_path: str | Path, *, overrides: Sequence[str] = (), runs_root: str | Path = "runs",
                  device: str = "auto", progress: bool = True) -> Path:
    """Run (or continue) the whole DPL pipeline of one seed; returns the seed's folder."""
    from da_seg.methods import validate

    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path, tuple(overrides))
    validate(recipe)
    options = parse_stage_options(DualPathStage, recipe)
    if PseudoLabelCE.name not in recipe.components:
        raise ConfigError(f"recipe {recipe.name!r}: a dual_path round trains on pseudo-labels; it needs "
                          f"[components.{PseudoLabelCE.name}]")
    runs_root = Path(runs_root).absolute()
    seed_dir = stage_root(runs_root, recipe) / f"seed{recipe.train.seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    plain = plain_translation(recipe_path, recipe, options, overrides, runs_root, device, progress)
    warm = warmup_models(recipe_path, recipe, options, plain["descriptor"], overrides, runs_root, device, progress)
    dpit = dual_path_translation(recipe_path, recipe, options, plain, warm, overrides, seed_dir, device, progress)
    translator = Path(dpit["run_dir"]) / "last.pt"
    styled_target = dpit["target_direction"]["descriptor"]
    model_s, model_t = warm
    rounds: list[dict[str, Any]] = []
    for index in range(1, options.rounds + 1):
        round_dir = seed_dir / f"round_{index}"
        done_file = round_dir / "done"
        if done_file.exists():
            done = json.loads(done_file.read_text())
        else:
            start = time.perf_counter()
            quantile = options.quantiles[min(index, len(options.quantiles)) - 1]
            labels = label_round((model_s, model_t), recipe, styled_target, round_dir, quantile, options,
                                 device=device, progress=progress)
            runs = {}
            for key, source, target, val in (
                    ("S", recipe.data.source, labels["descriptors"]["target_in_source_style"], [styled_target]),
                    ("T", dpit["descriptor"], labels["descriptors"]["target"], list(recipe.val_domains))):
                this = path_recipe(recipe, f"{recipe.name}_{key}_round{index}", source, target, val,
                                   model_s if key == "S" else model_t)
                write_text_atomic(to_toml(this.to_dict()), round_dir / f"recipe_{key}.toml")
                runs[key] = train_or_resume(this, round_dir / "runs", device=device, progress=progress)
            checkpoint = dual_path_checkpoint(translator, generator_options(load_recipe(seed_dir / "dpit.toml")),
                                              (runs["S"] / "last.pt", runs["T"] / "last.pt"), options.fusion_alpha,
                                              round_dir / "dual_path.pt")
            path_metrics = {k: json.loads((v / "metrics.json").read_text()) for k, v in runs.items()}
            done = {"round": index, "quantile": quantile, "labelled_share": labels["labelled_share"],
                    "thresholds": labels["thresholds"], "class_share": labels["class_share"],
                    "checkpoint": str(checkpoint), "runs": {k: str(v) for k, v in runs.items()},
                    "iterations": sum(m["iterations"] for m in path_metrics.values()),
                    "dual": evaluate_checkpoint(checkpoint, recipe, device),
                    "target_path": path_metrics["T"]["last"]["domains"],
                    "source_path": path_metrics["S"]["last"]["domains"],
                    "fusion_alpha": options.fusion_alpha, "seconds": round(time.perf_counter() - start, 1)}
            write_json_atomic(done, done_file)
        model_s, model_t = (Path(done["runs"][k]) / "last.pt" for k in ("S", "T"))
        rounds.append(done)
        write_metrics(seed_dir, recipe, rounds, finished=index == options.rounds)
        if progress:
            target = load_domain(recipe.data.target).name
            click.echo(f"[dual-path] round {index}: {100 * done['labelled_share']:.1f}% of target pixels labelled; "
                       f"DPL (M_T) {_fmt(done['target_path'].get(target))}, DPL-Dual "
                       f"{_fmt(done['dual'].get(target))}")
    return seed_dir


def _fmt(entry: dict | None) -> str:
    return "n/a" if not entry or entry.get("miou") is None else f"{entry['miou']:.2f}"


def write_metrics(seed_dir: Path, recipe: Recipe, rounds: list[dict[str, Any]], finished: bool) -> dict:
    """``metrics.json`` in the trainer's format: one evaluation of the fused model per round."""
    template = json.loads((Path(rounds[-1]["runs"]["T"]) / "metrics.json").read_text())
    evaluations, offset = [], 0
    for done in rounds:
        offset += done["iterations"]
        evaluations.append({"iteration": offset, "round": done["round"], "domains": done["dual"],
                            "target_path": done["target_path"]})
    primary = template["primary_domain"]
    metrics = {**{k: template[k] for k in ("primary_domain", "val_domains", "class_names", "model")},
               "source": load_domain(recipe.data.source).name, "recipe": recipe.name,
               "target": load_domain(recipe.data.target).name, "seed": recipe.train.seed,
               "iterations": offset, "iteration": offset, "finished": finished,
               "status": "finished" if finished else "running", "components": list(recipe.components),
               "inference": f"{DUAL_PATH_MODEL}: both paths fused, alpha {rounds[-1]['fusion_alpha']}",
               "rounds": rounds, "evaluations": evaluations, "last": evaluations[-1],
               "best": max(evaluations, key=lambda e: (e["domains"].get(primary) or {}).get("miou") or -1.0)}
    write_json_atomic(metrics, seed_dir / "metrics.json")
    return metrics


class DualPathStage:
    """DPL: warm-up, dual-path translation, rounds of dual-path pseudo-labels and two segmenters."""

    name = "dual_path"
    Options = DualPathOptions
    per_seed = True

    @staticmethod
    def run(recipe_path: Path, *, overrides: Sequence[str] = (), runs_root: Path, device: str = "auto",
            progress: bool = True, label: str = "") -> Path:
        """Returns the seed's folder, whose ``metrics.json`` holds the fused model's rounds."""
        if label:
            print(f"[sweep] {label}: dual-path learning")
        return run_dual_path(recipe_path, overrides=overrides, runs_root=runs_root, device=device, progress=progress)
