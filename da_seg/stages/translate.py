"""The ``translate`` stage (``stage = "translate"``; also ``da-seg translate RECIPE``): train a
CycleGAN translator, then write the translated source as a new labelled domain that recipes train
on by name. Its settings are the recipe's ``[translate]`` table (:class:`TranslateOptions`).

1. Training: the recipe's ``[components.cyclegan]`` runs through the one loop (``da_seg.runs``:
   checkpoints, resume, AMP, torchrun, TensorBoard with the translation panels), scoring no
   segmenter. A finished run of the same recipe and seed is reused, an interrupted one resumed.
2. Writing: every image of the source's splits (``splits`` option; default all: train and val) goes
   through G_st at its full resolution (one fully-convolutional pass, or overlapping blended tiles
   for frames larger than ``tile``) and is saved as PNG under the output folder, same relative
   names as in the source. Images already written are skipped, so an interrupted write continues
   where it stopped; ``translation.json`` there records which checkpoint wrote them, and a
   different checkpoint refuses to mix its images in (``--overwrite`` starts the folder afresh).
3. With ``target_output_domain`` set, the same for the *target* through G_ts (target -> source
   style; DPL's second path): its splits (``target_splits``; default all) are written as the
   domain ``target_output_domain`` with the target's label files for every split except
   ``data.target_split`` (the adaptation split stays unlabelled, as the target it came from).
4. The descriptor ``<output_domain>.toml`` goes to the first ``$DA_SEG_DATASETS`` directory, else
   ``./datasets`` (where domain names are looked up, as ``da-seg prepare convert-labels``). Its
   images are the translated ones; its labels are the *source's label files*, referenced by path
   (relative to the new root when both lie under ``$DA_SEG_DATA``), never copied; classes and the
   ``[label]`` decoding are copied from the source descriptor.

Output folder: ``--out``, else ``translate.output_dir`` (absolute or under
``$DA_SEG_DATA``), else beside the source root: ``<source root>/../<output_domain>`` (for the synthetic
domains that keeps the translated images under the generator's stamp, which ``da-seg synth``
removes with the data they were made from).
"""
from __future__ import annotations

import json
import os
import shutil
import time
import tomllib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import click
import numpy as np
import torch
from PIL import Image

from da_seg.config import ConfigError, Recipe
from da_seg.data.domains import Domain, DomainError, load_domain, resolve_root
from da_seg.data.loaders import OwnErrors
from da_seg.engine.checkpoint import load_checkpoint
from da_seg.engine.trainer import amp_dtype_for, pick_device
from da_seg.methods.base import OptionError, parse_options
from da_seg.methods.common import check_nonnegative
from da_seg.methods.cyclegan import CycleGAN, CycleGANOptions
from da_seg.models.cyclegan import ResnetGenerator, translate
from da_seg.runs import train_or_resume
from da_seg.stages.base import check_device, parse_stage_options
from da_seg.utils import distributed as du
from da_seg.utils.files import save_image_atomic, write_json_atomic, write_text_atomic
from da_seg.utils.progress import Progress
from da_seg.utils.tomlio import dumps_toml

MARKER = "translation.json"


class TranslationExistsError(ValueError):
    """The output folder holds images another checkpoint (or something else) wrote."""


@dataclass(frozen=True)
class TranslateOptions:
    """The recipe's ``[translate]`` table: where and how the translated source is written."""

    output_domain: str = ""             # name of the translated domain; "" = <source>_cyclegan
    output_dir: str = ""                # its folder: absolute or under $DA_SEG_DATA; "" = beside the source root
    splits: tuple[str, ...] = ()        # source splits to translate; () = all of them
    tile: int = 2048                    # frames larger than this (either side) are translated in tiles ...
    tile_overlap: int = 256             # ... overlapping by this much, blended; 0 = always whole
    # The other direction (DPL): the target through G_ts, written as a domain too; "" = not written.
    target_output_domain: str = ""      # name of the target -> source domain
    target_output_dir: str = ""         # its folder, as output_dir; "" = beside the target root
    target_splits: tuple[str, ...] = () # target splits to translate; () = all of them

    def __post_init__(self):
        object.__setattr__(self, "splits", tuple(self.splits))
        object.__setattr__(self, "target_splits", tuple(self.target_splits))
        check_nonnegative(self, ("tile", "tile_overlap"))
        if self.tile and self.tile_overlap >= self.tile:
            raise OptionError("tile_overlap", f"= {self.tile_overlap} must be smaller than tile = {self.tile}")


def generator_options(recipe: Recipe) -> CycleGANOptions:
    if CycleGAN.name not in recipe.components:
        raise ConfigError(f"recipe {recipe.name!r}: the translate stage needs [components.{CycleGAN.name}]")
    return parse_options(CycleGAN, dict(recipe.components[CycleGAN.name] or {}), recipe.name)


DIRECTIONS = {"source": "g_st", "target": "g_ts"}  # the domain translated -> its generator


def output_location(options: TranslateOptions, source: Domain,
                    out: str | Path | None = None, direction: str = "source") -> tuple[str, Path]:
    """(name of the translated domain, its folder); ``source``: the domain that is translated."""
    if direction == "source":
        name, output_dir = options.output_domain or f"{source.name}_{CycleGAN.name}", options.output_dir
    else:
        name, output_dir = options.target_output_domain, options.target_output_dir
    if out is not None:
        folder = Path(out).expanduser().absolute()
    elif output_dir:
        folder = resolve_root(output_dir)
    else:
        folder = source.root.parent / name
    return name, folder


def default_descriptor_dir() -> Path:
    env = [p for p in os.environ.get("DA_SEG_DATASETS", "").split(os.pathsep) if p]
    return Path(env[0]).expanduser() if env else Path.cwd() / "datasets"


def load_generator(checkpoint: Path, options: CycleGANOptions, device: torch.device,
                   key: str = "g_st") -> ResnetGenerator:
    """G_st (or ``key`` = "g_ts") of a translate run's checkpoint, in eval mode."""
    state = load_checkpoint(checkpoint)
    saved = state.get("components", {}).get(CycleGAN.name)
    if saved is None:
        raise ValueError(f"{checkpoint} has no {CycleGAN.name} component (components: "
                         f"{', '.join(state.get('components', {})) or 'none'})")
    generator = ResnetGenerator(options.ngf, options.n_blocks)
    generator.load_state_dict(saved["networks"][key])
    return generator.to(device).eval()


# ---------------------------------------------------------------------------------------------
# The descriptor

def _data_relative(path: Path) -> str | None:
    """``path`` relative to $DA_SEG_DATA (default ./data), or None when it is not below it."""
    base = Path(os.environ.get("DA_SEG_DATA", "data")).expanduser().absolute()
    try:
        return str(path.absolute().relative_to(base))
    except ValueError:
        return None


def translated_descriptor(name: str, source: Domain, splits: Sequence[str], folder: Path,
                          description: str, label_splits: Sequence[str] | None = None,
                          generator_stamp: bool = True) -> dict[str, Any]:
    """A descriptor (as a dict) for the translated images in ``folder/<split>/images`` with the
    source's classes, label decoding and label files (of ``label_splits`` only, when given).
    ``generator_stamp``: carry the source's ``generator`` entry where its check can find the
    generator's stamp (a folder beside the source, as the translate stage writes)."""
    raw = tomllib.loads(source.descriptor.read_text())
    root_entry = _data_relative(folder)
    tables: dict[str, Any] = {}
    for split in splits:
        spec = source.split_spec(split)
        table: dict[str, Any] = {"images": f"{split}/images", "image_suffix": ".png"}
        if spec.labels is not None and (label_splits is None or split in label_splits):
            labels_dir = source.root / spec.labels
            # Relative when both trees live under $DA_SEG_DATA, so moving that folder keeps it valid.
            both_under_data = root_entry is not None and _data_relative(labels_dir) is not None
            table["labels"] = os.path.relpath(labels_dir, folder) if both_under_data else str(labels_dir.absolute())
            table["label_suffix"] = spec.label_suffix
            if spec.missing_label != "error":
                table["missing_label"] = spec.missing_label
        tables[split] = table
    descriptor: dict[str, Any] = {
        "name": name, "description": description,
        "root": root_entry if root_entry is not None else str(folder.absolute()),
        "layout": f"{{{','.join(splits)}}}/images/<sample name>.png, translated from {source.name}; "
                  f"labels: {source.name}'s ({source.layout or source.root})",
        "classes": raw["classes"],
    }
    if "label" in raw:
        descriptor["label"] = raw["label"]
    if source.generator and generator_stamp and _stamp_reaches(source.generator, folder):
        # Made from generated files: checked against their generator like them. A folder outside
        # the generator's tree (a stage's run folder) cannot be: its source was checked when the
        # translator trained on it.
        descriptor["generator"] = source.generator
    descriptor["splits"] = tables
    return descriptor


def _stamp_reaches(generator: str, folder: Path) -> bool:
    """Whether ``folder`` lies where the generator's check finds its stamp."""
    from da_seg.data.generated import GENERATORS
    from da_seg.data.synthetic import SyntheticDataError

    try:
        GENERATORS[generator](folder)
    except (DomainError, SyntheticDataError):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Writing the translated images

class _SourceImages(torch.utils.data.Dataset):
    """uint8 (3, H, W) images of a list of samples (decoded in loader workers)."""

    def __init__(self, domain: Domain, samples):
        self.domain, self.samples = domain, samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.domain.read_image(self.samples[index].image)              # (H, W, 3) uint8
        return {"image": torch.from_numpy(image).permute(2, 0, 1), "index": index}


def _save_png(image: np.ndarray, path: Path) -> None:
    """(H, W, 3) uint8 -> PNG, atomically (never half a file)."""
    save_image_atomic(Image.fromarray(image), path)


def _check_marker(folder: Path, identity: dict[str, Any], overwrite: bool, splits: Sequence[str]) -> None:
    """Refuse to mix images of two generators in one folder (unless ``overwrite``: start afresh)."""
    marker = folder / MARKER
    if marker.exists():
        previous = json.loads(marker.read_text())
        same = all(previous.get(k) == v for k, v in identity.items())
    else:
        same = not any((folder / split).exists() for split in splits)
    if same:
        return
    if not overwrite:
        what = (f"was written from {json.loads(marker.read_text()).get('checkpoint')}" if marker.exists()
                else "holds files that da-seg translate did not write")
        raise TranslationExistsError(f"{folder} {what}, not from {identity['checkpoint']} (iteration "
                              f"{identity['iteration']}); pass --overwrite to replace it, or choose another --out")
    for split in splits:
        if (folder / split).exists():
            shutil.rmtree(folder / split)
    marker.unlink(missing_ok=True)


def write_domain(source: Domain, splits: Sequence[str], folder: Path, name: str, identity: dict[str, Any],
                 transform: Callable[[torch.Tensor], torch.Tensor], *, description: str, header: str,
                 descriptor_dir: str | Path | None = None, device: torch.device, batch_size: int = 1,
                 num_workers: int = 0, overwrite: bool = False, progress: bool = True, what: str = "translate",
                 done_key: str = "translated_now", extra: dict[str, Any] | None = None,
                 generator_stamp: bool = True, label_splits: Sequence[str] | None = None) -> dict[str, Any]:
    """Write every image of ``source``'s ``splits`` through ``transform`` as a new labelled domain.

    ``transform``: (N, 3, H, W) float images in [0, 1] on ``device`` -> the same shape (a batch of
    ``batch_size`` images of one size; 1 for domains whose frames differ in size). Images are PNGs
    under ``folder/<split>/images`` with the source's relative names; those already written are
    skipped (resume); ``identity`` (with ``checkpoint`` and ``iteration``) is recorded in the
    folder's marker and another identity's images are refused unless ``overwrite``. The descriptor
    ``<name>.toml`` (source classes, label decoding and the label files of ``label_splits``, all
    when None; ``generator_stamp``: see
    :func:`translated_descriptor`) goes to ``descriptor_dir``, else the default (:func:`default_descriptor_dir`). Under torchrun every rank writes its share;
    rank 0 writes the marker and the descriptor. Returns the summary stored in the marker.
    """
    for split in splits:
        source.split_spec(split)  # unknown split: fail before any work
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
        if torch.distributed.is_available() and torch.distributed.is_initialized() else (0, 1)
    if rank == 0:
        _check_marker(folder, identity, overwrite, splits)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic({**identity, "complete": False}, folder / MARKER)
    du.barrier()

    start = time.perf_counter()
    counts: dict[str, dict[str, int]] = {}
    with ThreadPoolExecutor(max_workers=2) as saver:
        for split in splits:
            spec = source.split_spec(split)
            labelled = spec.labels is not None and (label_splits is None or split in label_splits)
            samples = source.samples(split, with_labels=labelled)
            destinations = [folder / split / "images" / (s.name + ".png") for s in samples]
            todo = [i for i, path in enumerate(destinations) if i % world == rank and not path.exists()]
            counts[split] = {"images": len(samples), done_key: len(todo)}
            if not todo:
                continue
            dataset = torch.utils.data.Subset(_SourceImages(source, samples), todo)
            loader = OwnErrors(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                                           num_workers=num_workers))
            bar = Progress(len(todo), f"{what} {source.name} {split}", enabled=progress and rank == 0, every_s=30)
            pending: list[Future] = []
            done = 0
            for item in loader:
                images = item["image"].to(device, non_blocking=True).float() / 255       # (N, 3, H, W)
                styled = transform(images)
                pixels = (styled.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
                for k, index in enumerate(item["index"].tolist()):
                    pending.append(saver.submit(_save_png, pixels[k], destinations[index]))
                while len(pending) > 8 * batch_size:  # bounded: never hold more than a few decoded frames
                    pending.pop(0).result()
                done += len(pixels)
                bar.update(done)
            for future in pending:
                future.result()
            bar.close()
    du.barrier()

    summary = {**identity, "complete": True, "domain": name, "folder": str(folder), "splits": list(splits),
               "counts": counts, **(extra or {}), "seconds_this_pass": round(time.perf_counter() - start, 1)}
    if rank == 0:
        descriptor_dir = Path(descriptor_dir) if descriptor_dir is not None else default_descriptor_dir()
        descriptor_dir.mkdir(parents=True, exist_ok=True)
        descriptor = translated_descriptor(name, source, splits, folder, description, label_splits, generator_stamp)
        path = descriptor_dir / f"{name}.toml"
        write_text_atomic(header + dumps_toml(descriptor), path)
        summary["descriptor"] = str(path)
        write_json_atomic(summary, folder / MARKER)
    return summary

def write_translated_domain(checkpoint: str | Path, recipe: Recipe, options: TranslateOptions, *,
                            out: str | Path | None = None,
                            descriptor_dir: str | Path | None = None, device: str = "auto",
                            overwrite: bool = False, progress: bool = True,
                            direction: str = "source") -> dict[str, Any]:
    """Translate the source's splits with the checkpoint's G_st and write the new domain
    (``direction = "target"``: the target's splits with G_ts, see ``target_output_domain``), through
    :func:`write_domain`. Returns the summary stored in ``translation.json``."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction = {direction!r}; valid: {', '.join(DIRECTIONS)}")
    checkpoint = Path(checkpoint).absolute()
    from_source = direction == "source"
    source = load_domain(recipe.data.source if from_source else recipe.data.target)  # the domain translated
    name, folder = output_location(options, source, out, direction)
    splits = list(options.splits if from_source else options.target_splits) or list(source.splits)
    # The target's adaptation split stays unlabelled in its translated copy.
    label_splits = None if from_source else [s for s in splits if s != recipe.data.target_split]
    for split in splits:
        source.split_spec(split)  # unknown split: fail before any work
    dev = pick_device(device)
    if dev.type == "cuda" and torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    iteration = int(load_checkpoint(checkpoint)["iteration"])
    identity = {"checkpoint": str(checkpoint), "iteration": iteration, "source_domain": source.name}

    generator = load_generator(checkpoint, generator_options(recipe), dev, DIRECTIONS[direction])
    amp = amp_dtype_for(recipe.train.amp, dev)
    autocast = (lambda: torch.autocast(dev.type, dtype=amp)) if amp is not None else nullcontext

    def transform(image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast():
            return translate(generator, image, options.tile, options.tile_overlap)

    target = load_domain(recipe.data.target if from_source else recipe.data.source).name  # the style
    gen = generator_options(recipe)
    extra = {"direction": direction, "recipe": recipe.name, "target_domain": target,
             "generator": {"ngf": gen.ngf, "n_blocks": gen.n_blocks},
             "tile": options.tile, "tile_overlap": options.tile_overlap}
    labels = f"{source.name}'s" if label_splits is None else f"{source.name}'s for {', '.join(label_splits) or 'none'}"
    description = (f"{source.name} translated to the style of {target} by CycleGAN "
                   f"({recipe.name}, iteration {iteration}); labels: {labels}")
    header = f"# Written by `da-seg translate` from {checkpoint}; labels are read from {source.name}'s folders.\n"
    return write_domain(source, splits, folder, name, identity, transform, description=description, header=header,
                        descriptor_dir=descriptor_dir, device=dev, batch_size=1, num_workers=recipe.data.num_workers,
                        overwrite=overwrite, progress=progress, extra=extra, label_splits=label_splits)


# ---------------------------------------------------------------------------------------------
# The stage

def run_translate(recipe_path: str | Path, *, overrides: Sequence[str] = (), runs_root: str | Path = "runs",
                  checkpoint: str | Path | None = None, out: str | Path | None = None,
                  descriptor_dir: str | Path | None = None, overwrite: bool = False, device: str = "auto",
                  progress: bool = True) -> dict[str, Any]:
    """Train (or reuse / resume) the recipe's translator, then write the translated domain;
    returns the summary stored in ``translation.json`` (with ``run_dir``)."""
    from da_seg.config import load_recipe
    from da_seg.methods import validate

    recipe = load_recipe(recipe_path, tuple(overrides))
    validate(recipe)
    options = parse_stage_options(TranslateStage, recipe)
    generator_options(recipe)
    run_dir = None
    if checkpoint is None:
        # The translator scores no segmenter: nothing to evaluate but its panels.
        run_dir = train_or_resume(recipe, Path(runs_root), device=device, progress=progress, val_domains=())
        checkpoint = run_dir / "last.pt"
    summary = write_translated_domain(checkpoint, recipe, options, out=out, descriptor_dir=descriptor_dir,
                                      device=device, overwrite=overwrite, progress=progress)
    if options.target_output_domain:
        summary["target_direction"] = write_translated_domain(
            checkpoint, recipe, options, descriptor_dir=descriptor_dir, device=device, overwrite=overwrite,
            progress=progress, direction="target")
    for written in (summary, summary.get("target_direction", {})):
        if progress and "descriptor" in written:
            total = sum(c["images"] for c in written["counts"].values())
            click.echo(f"domain {written['domain']!r}: {total} images in {written['folder']}; "
                       f"descriptor {written['descriptor']}")
    return {**summary, "run_dir": str(run_dir if run_dir is not None else Path(checkpoint).parent)}


class TranslateStage:
    """Train the translator (once: it does not depend on the downstream seed), write the domain."""

    name = "translate"
    Options = TranslateOptions
    per_seed = False

    @staticmethod
    def run(recipe_path: Path, *, overrides: Sequence[str] = (), runs_root: Path, device: str = "auto",
            progress: bool = True, label: str = "", **options) -> Path:
        """Returns the translator's run folder."""
        if label:
            print(f"[sweep] {label}: translate stage")
        summary = run_translate(recipe_path, overrides=overrides, runs_root=runs_root, device=device,
                                progress=progress, **options)
        return Path(summary["run_dir"])


@click.command("translate")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key.")
@click.option("--seed", type=int, default=None, help="Shortcut for --set train.seed=N.")
@click.option("--runs", "runs_root", default="runs", show_default=True, type=click.Path(file_okay=False))
@click.option("--checkpoint", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Translate with this translate-run checkpoint instead of training (or reusing) one.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Folder for the translated images (default: translate.output_dir, else beside "
                   "the source's root).")
@click.option("--descriptor-dir", default=None, type=click.Path(file_okay=False),
              help="Where the new domain's descriptor goes (default: the first $DA_SEG_DATASETS dir, else ./datasets).")
@click.option("--overwrite", is_flag=True, help="Replace images another checkpoint wrote in the output folder.")
@click.option("--device", default="auto", show_default=True, callback=check_device)
@click.option("--no-progress", is_flag=True)
def translate_command(recipe, overrides, seed, runs_root, checkpoint, out, descriptor_dir, overwrite, device,
                      no_progress):
    """Train a CycleGAN translator (RECIPE with stage = "translate"), then write the translated
    source as a new domain. Resumable: run the same command again to continue."""
    if seed is not None:
        overrides = (*overrides, f"train.seed={seed}")
    summary = run_translate(recipe, overrides=overrides, runs_root=runs_root, checkpoint=checkpoint, out=out,
                            descriptor_dir=descriptor_dir, overwrite=overwrite, device=device,
                            progress=not no_progress)
    if no_progress and "descriptor" in summary:
        total = sum(c["images"] for c in summary["counts"].values())
        click.echo(f"domain {summary['domain']!r}: {total} images in {summary['folder']}; "
                   f"descriptor {summary['descriptor']}")
