"""The ``warm_start`` stage: one training run that starts from another run's model.

Methods that adapt a trained model online (SAC starts from its ABN baseline) need the baseline
first; a recipe with ``stage = "warm_start"`` and a ``[warm_start]`` table names it, so that
``da-seg train`` and ``da-seg sweep`` run both without manual steps:
  1. the start checkpoint: ``warm_start.init_checkpoint``, else the ``last.pt`` of the
     ``warm_start.warmup_recipe`` run of the same seed under the same runs folder, trained first
     when it is missing and reused when it is finished (the self_train stage's warm-up, the same
     function: :func:`da_seg.stages.self_train.start_checkpoint`);
  2. with ``warm_start.importance_sampling``: that model's predicted class pixel counts on every
     target train image (``<start run>/target_class_counts.json``, reused when it exists for that
     checkpoint), which make the target sampler draw images holding rare classes more often
     (``da_seg.data.importance``; SAC's ``SAMPLE_WEIGHTS`` with ``SAMPLE_UNIFORM_PRIOR``);
  3. the recipe itself as an ordinary run with ``model.init_checkpoint`` = that checkpoint
     (loaded before any component copies the weights, so an EMA teacher starts from it too).
The run is filed under the recipe's own name and compared like any other; resuming a sweep
finds the finished warm-up and resumes or skips the run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from da_seg.config import Recipe, load_recipe, recipe_from_dict
from da_seg.data.augment import to_float_images
from da_seg.data.datasets import SegmentationDataset
from da_seg.data.domains import load_domain
from da_seg.data.importance import write_counts
from da_seg.engine.checkpoint import load_segmenter_checkpoint, restore_model
from da_seg.engine.evaluate import predict
from da_seg.engine.trainer import pick_device
from da_seg.methods.base import OptionError
from da_seg.runs import train_or_resume
from da_seg.stages.base import parse_stage_options
from da_seg.stages.self_train import start_checkpoint


@dataclass(frozen=True)
class WarmStartOptions:
    warmup_recipe: str = ""                # the start model: this recipe's run (same seed), relative to the recipe file
    init_checkpoint: str = ""              # or a checkpoint to start from
    importance_sampling: bool = False      # sample target images by the start model's predicted classes (SAC)
    uniform_prior: float = 0.25            # SAMPLE_UNIFORM_PRIOR: share of uniform sampling mixed in

    def __post_init__(self):
        if not 0.0 <= self.uniform_prior <= 1.0:
            raise OptionError("uniform_prior", f"= {self.uniform_prior!r}; expected a share in [0, 1] (SAC 0.25)")


def warm_started(recipe: Recipe, checkpoint: Path, sample_weights: Path | None = None,
                 uniform_prior: float = 0.25) -> Recipe:
    """``recipe`` as an ordinary training run that starts from ``checkpoint`` (and samples its
    target by ``sample_weights`` when given)."""
    raw = recipe.to_dict()
    raw.pop(WarmStartStage.name, None)
    raw["stage"] = "train"
    raw["model"]["init_checkpoint"] = str(checkpoint)
    if sample_weights is not None:
        raw["data"]["target_sample_weights"] = str(sample_weights)
        raw["data"]["target_uniform_prior"] = uniform_prior
    return recipe_from_dict(raw, source=f"{recipe.name} (warm start)")


@torch.no_grad()
def predicted_class_counts(recipe: Recipe, checkpoint: Path, device: str = "auto") -> Path:
    """``target_class_counts.json`` beside ``checkpoint``: per target train image (N, C) pixel
    counts of the start model's argmax at the loaded size (reused when written from this checkpoint)."""
    out = Path(checkpoint).parent / "target_class_counts.json"
    if out.is_file() and json.loads(out.read_text()).get("checkpoint") == str(checkpoint):
        return out
    dev = pick_device(device)
    model = restore_model(load_segmenter_checkpoint(checkpoint), dev).eval()
    dataset = SegmentationDataset(load_domain(recipe.data.target), recipe.data.target_split, with_labels=False,
                                  size=recipe.data.target_size)
    counts = []
    for batch in DataLoader(dataset, batch_size=1, num_workers=recipe.data.num_workers):
        predicted = predict(model, to_float_images(batch["image"].to(dev))).argmax(1)   # (1, H, W)
        counts.append(torch.bincount(predicted.flatten(), minlength=model.num_classes).cpu().numpy())
    write_counts(out, [s.name for s in dataset.samples], np.stack(counts), str(checkpoint))
    return out


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
        weights = predicted_class_counts(recipe, checkpoint, device) if options.importance_sampling else None
        return train_or_resume(warm_started(recipe, checkpoint, weights, options.uniform_prior), runs_root,
                               device=device, progress=progress, label=label)
