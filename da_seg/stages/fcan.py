"""The ``fcan`` stage: Fully Convolutional Adaptation Networks (Zhang et al., CVPR 2018), end to end.

A recipe with ``stage = "fcan"`` describes the final (RAN) training run: its components are the
source cross-entropy and ``feature_adversarial``; its ``[fcan]`` table (:class:`FcanOptions`)
holds the rest. For the recipe's seed s, the stage
  1. trains (or reuses) the warm-up run: ``warmup_recipe``, a source-only recipe, at seed s (the
     paper pre-trains the FCN on the source with the segmentation loss alone, then fine-tunes);
  2. writes (or reuses) the appearance-adapted source, FCAN's AAN (``methods/appearance.py``):
     every source image optimised per image so that a fixed network's features keep its content
     while their Gram matrices match the target's mean Gram matrices, through the translate
     stage's domain writer (``stages.translate.write_domain``). The fixed network is the paper's
     ImageNet ResNet-50 when ``feature_weights`` names a torchvision file; otherwise the encoder
     of the warm-up run at ``appearance_seed`` (default 0). One adapted domain serves every seed:
     it depends on the feature network and the AAN settings only, as one translator serves every
     seed of the CycleGAN rows;
  3. trains the recipe (RAN) on the adapted source + the target, from the warm-up model of seed s
     (``model.init_checkpoint``), through ``da_seg.runs`` (resume, identities, metrics.json).

Why per-image optimisation and not a feed-forward network: it is what the paper does, and it has
no training of its own to get wrong; its cost (iterations x images forward+backward passes of the
fixed network) is the recipe's ``iterations`` knob. Why the warm-up encoder on the synthetic
benchmark: there is no ImageNet file offline, a randomly initialised network's Gram matrices
describe colour and texture only through random filters, and the source-only encoder is trained
on the very images it adapts (its filters respond to the classes' colours and textures).

Everything lands in ``<runs>/<source>_to_<target>/<recipe>_fcan/appearance-<identity>/``
(images, ``translation.json``, the descriptor) next to the ordinary run folders of the warm-up
and RAN runs. Resumable at every step; single process (the adaptation runs on one device).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import click
import torch

from da_seg.config import ConfigError, Recipe, load_recipe, recipe_from_dict
from da_seg.data.domains import load_domain
from da_seg.data.loaders import OwnErrors
from da_seg.engine.checkpoint import load_checkpoint, load_trained
from da_seg.engine.trainer import pick_device
from da_seg.methods.appearance import (IMAGENET_LAYERS, INITS, GramAverage, ImageNetResNet50, SegmenterFeatures,
                                       adapt_images)
from da_seg.methods.base import OptionError
from da_seg.methods.common import check_choice, check_nonnegative, check_positive_int
from da_seg.runs import train_or_resume
from da_seg.stages.base import parse_stage_options
from da_seg.stages.self_train import check_same_model, warmup_checkpoint
from da_seg.stages.translate import MARKER, _SourceImages, write_domain


@dataclass(frozen=True)
class FcanOptions:
    """The recipe's ``[fcan]`` table; defaults are the paper's AAN (Sec. 3.2 and 4.1)."""

    warmup_recipe: str = ""             # source-only recipe (relative to this one): pre-training and init
    feature_weights: str = ""           # ImageNet ResNet-50 (torchvision file) for AAN; "" = the warm-up encoder
    appearance_seed: int = 0            # warm-up seed whose encoder adapts the images when feature_weights = ""
    layers: tuple[str, ...] = IMAGENET_LAYERS   # conv1, res2c, res3d, res4f, res5c (paper)
    content_weights: tuple[float, ...] = ()     # w_s per layer; () = 1 each (not in the paper)
    style_weights: tuple[float, ...] = ()       # w_t per layer; () = 1 each (not in the paper)
    alpha: float = 1e-14                # style / content trade-off (paper, with raw sums: normalize = false)
    iterations: int = 1000              # I (paper)
    beta: float = 10.0                  # step size, 0..255 pixel units (paper)
    init: str = "noise"                 # "noise" (paper: white noise) | "source"
    normalize: bool = False             # means instead of the raw sums (size-independent alpha)
    style_images: int = 0               # target train images averaged into the style; 0 = all
    batch_size: int = 1                 # images optimised together (one size per batch)
    splits: tuple[str, ...] = ()        # source splits to adapt; () = all
    output_domain: str = ""             # name of the adapted domain; "" = <source>_aan

    def __post_init__(self):
        for key in ("layers", "content_weights", "style_weights", "splits"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        check_nonnegative(self, ("alpha", "beta", "style_images", "appearance_seed"))
        check_positive_int(self, ("iterations", "batch_size"))
        check_choice(self, "init", INITS)
        if not self.layers:
            raise OptionError("layers", "= []; expected the feature maps AAN compares, e.g. [\"layer1\", \"layer4\"]")
        for key in ("content_weights", "style_weights"):
            if getattr(self, key) and len(getattr(self, key)) != len(self.layers):
                raise OptionError(key, f"= {list(getattr(self, key))}; expected one weight per layer "
                                       f"({len(self.layers)}: {', '.join(self.layers)}) or []")

    def weights(self, key: str) -> dict[str, float]:
        values = getattr(self, key) or (1.0,) * len(self.layers)
        return dict(zip(self.layers, (float(v) for v in values)))


def stage_dir(runs_root: Path, recipe: Recipe) -> Path:
    return Path(runs_root).absolute() / recipe.pair / f"{recipe.name}_fcan"


def warmup_run(recipe: Recipe, recipe_path: Path, options: FcanOptions, seed: int, overrides: Sequence[str],
               runs_root: Path, device: str, progress: bool) -> Path:
    """The warm-up's ``last.pt`` at ``seed``: an ordinary run of its own recipe (shared with sweeps of
    it); only overrides outside [components] and [fcan] apply to it."""
    checkpoint = warmup_checkpoint(recipe, recipe_path, options.warmup_recipe, seed, overrides, runs_root,
                                   device, progress)
    check_same_model(recipe, checkpoint)
    return checkpoint


def target_style(network, recipe: Recipe, options: FcanOptions, device: torch.device) -> dict[str, torch.Tensor]:
    """Mean Gram matrices of the target's train images (all, or ``style_images`` of a seeded draw)."""
    target = load_domain(recipe.data.target)
    samples = target.samples(recipe.data.target_split, with_labels=False)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
    chosen = sorted(order[:options.style_images]) if options.style_images else list(range(len(samples)))
    dataset = torch.utils.data.Subset(_SourceImages(target, samples), chosen)
    loader = OwnErrors(torch.utils.data.DataLoader(dataset, batch_size=options.batch_size,
                                                   num_workers=recipe.data.num_workers))
    average = GramAverage(options.normalize)
    with torch.no_grad():
        for item in loader:
            average.add(network(item["image"].to(device).float() / 255))
    return average.mean()


def appearance_domain(recipe: Recipe, recipe_path: Path, options: FcanOptions, overrides: Sequence[str],
                      runs_root: Path, device: str, progress: bool) -> Path:
    """Write (or reuse) the AAN-adapted source; returns its descriptor."""
    dev = pick_device(device)
    if options.feature_weights:
        network = ImageNetResNet50.from_file(options.feature_weights, options.layers)
        identity = {"checkpoint": str(Path(options.feature_weights).expanduser().absolute()), "iteration": 0}
    else:
        checkpoint = warmup_run(recipe, recipe_path, options, options.appearance_seed, overrides, runs_root,
                                device, progress)
        network = SegmenterFeatures(load_trained(checkpoint, dev), options.layers).freeze()
        identity = {"checkpoint": str(checkpoint), "iteration": int(load_checkpoint(checkpoint)["iteration"])}
    network = network.to(dev)
    source = load_domain(recipe.data.source)
    settings = {k: v for k, v in asdict(options).items() if k not in ("warmup_recipe", "splits", "output_domain")}
    identity = {**identity, "source_domain": source.name, "target_domain": load_domain(recipe.data.target).name,
                "aan": json.loads(json.dumps(settings))}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    name = options.output_domain or f"{source.name}_aan"
    base = stage_dir(runs_root, recipe) / f"appearance-{digest}"
    folder, descriptor = base / name, base / f"{name}.toml"
    marker = folder / MARKER
    if descriptor.is_file() and marker.is_file() and json.loads(marker.read_text()).get("complete"):
        return descriptor
    if progress:
        click.echo(f"[fcan] appearance adaptation of {source.name} ({options.iterations} iterations per image) "
                   f"-> {folder}")
    grams = target_style(network, recipe, options, dev)
    generator = torch.Generator().manual_seed(recipe.train.seed)
    content, style = options.weights("content_weights"), options.weights("style_weights")

    def transform(images: torch.Tensor) -> torch.Tensor:
        return adapt_images(network, images, grams, content_weights=content, style_weights=style,
                            alpha=options.alpha, iterations=options.iterations, beta=options.beta,
                            init=options.init, normalize=options.normalize, generator=generator)

    splits = list(options.splits) or list(source.splits)
    write_domain(source, splits, folder, name, identity, transform, descriptor_dir=base, device=dev,
                 description=f"{source.name} adapted to the style of {identity['target_domain']} by FCAN's AAN "
                             f"(feature network {identity['checkpoint']}); labels: {source.name}'s",
                 header=f"# Written by the fcan stage ({recipe.name}); labels are read from {source.name}'s folders.\n",
                 batch_size=options.batch_size, num_workers=recipe.data.num_workers, progress=progress, what="adapt",
                 done_key="adapted_now", generator_stamp=False)  # under the runs folder, away from the generator's stamp
    return descriptor


def ran_recipe(recipe: Recipe, descriptor: Path, init_checkpoint: Path) -> Recipe:
    """The RAN run: an ordinary training run on the adapted source, from the warm-up model."""
    raw = recipe.to_dict()
    raw.pop(FcanStage.name, None)
    raw["stage"] = "train"
    raw["data"]["val_domains"] = list(recipe.val_domains)
    raw["data"]["source"] = str(descriptor)
    raw["model"]["init_checkpoint"] = str(init_checkpoint)
    return recipe_from_dict(raw, source=f"{recipe.name} (RAN)")


def run_fcan(recipe_path: str | Path, *, overrides: Sequence[str] = (), runs_root: str | Path = "runs",
             device: str = "auto", progress: bool = True) -> Path:
    """Warm-up, appearance adaptation and RAN for the recipe's seed; returns the RAN run folder."""
    from da_seg.methods import validate

    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path, tuple(overrides))
    validate(recipe)
    options: FcanOptions = parse_stage_options(FcanStage, recipe)
    if not options.warmup_recipe:
        raise ConfigError(f"{recipe_path}: fcan.warmup_recipe = ''; expected a source-only recipe (the model "
                          "RAN starts from, and the synthetic benchmark's feature network)")
    runs_root = Path(runs_root).absolute()  # descriptors name their folders: not relative to $DA_SEG_DATA
    init = warmup_run(recipe, recipe_path, options, recipe.train.seed, overrides, runs_root, device, progress)
    descriptor = appearance_domain(recipe, recipe_path, options, overrides, runs_root, device, progress)
    return train_or_resume(ran_recipe(recipe, descriptor, init), runs_root, device=device, progress=progress)


class FcanStage:
    """Warm-up (per seed), AAN (once), RAN (per seed)."""

    name = "fcan"
    Options = FcanOptions
    per_seed = True

    @staticmethod
    def run(recipe_path: Path, *, overrides: Sequence[str] = (), runs_root: Path, device: str = "auto",
            progress: bool = True, label: str = "", **options: Any) -> Path:
        """Returns the RAN run folder (its ``metrics.json`` is the stage's result)."""
        if label:
            print(f"[sweep] {label}: fcan stage (warm-up, appearance adaptation, RAN)")
        return run_fcan(recipe_path, overrides=overrides, runs_root=runs_root, device=device, progress=progress)
