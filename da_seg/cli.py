"""The `da-seg` command: train, sweep, check, eval, predict, export, compare, synth, prepare, list,
self-train, translate."""
from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from pathlib import Path

import click

import da_seg
from da_seg.config import MAX_IMAGE_SIDE, ConfigError


def check_device(ctx, param, value: str) -> str:
    """``--device`` checked as the command line is read (da_seg.stages.base.check_device),
    imported only by commands that have the option: the stages import torch."""
    from da_seg.stages.base import check_device as check

    return check(ctx, param, value)


class _LazyGroup(click.Group):
    """Commands defined next to their stage (which imports torch) are imported when one of them
    runs, so that ``da-seg --help`` and ``da-seg list ...`` start without torch. ``lazy``: name ->
    ("module:attribute", short help shown by --help; tests/test_cli.py checks it is the command's own)."""

    def __init__(self, *args, lazy: dict[str, tuple[str, str]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx, name: str):
        if name in self.lazy and name not in self.commands:
            module, attribute = self.lazy[name][0].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(name) for name in names)  # as click.Group lays it out
        rows = []
        for name in names:
            if name in self.lazy and name not in self.commands:
                rows.append((name, click.Command(name, help=self.lazy[name][1]).get_short_help_str(limit)))
                continue
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


LAZY_COMMANDS = {
    "self-train": ("da_seg.stages.self_train:self_train",
                   "Offline self-training (CBST): rounds of predict -> class-balanced thresholds -> retrain."),
    "translate": ("da_seg.stages.translate:translate_command",
                  "Train a CycleGAN translator (RECIPE with stage = \"translate\"), then write the translated "
                  "source as a new domain."),
}


def _size(ctx, param, text: str | None) -> tuple[int, int] | None:
    """Callback of the HxW options; the bound is the recipes' (a larger side cannot fit in memory)."""
    if not text:
        return None
    expected = f"{param.opts[0]} {text!r}; expected HxW (e.g. 512x1024) with both sides in 1..{MAX_IMAGE_SIDE} pixels"
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(expected) from None
    if not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE):
        raise ValueError(expected)
    return h, w


def _seeds(ctx, param, value: int) -> int:
    if value < 1:  # zero seeds trains nothing and prints an empty table, which reads as success
        raise ValueError(f"--seeds {value}; expected a positive number of seeds (seeds 0..N-1 are run)")
    return value


def _trackers(ctx, param, names: tuple[str, ...]) -> tuple[str, ...]:
    """``--tracker`` names as the one ``--set train.trackers=[...]`` they stand for (none: no override)."""
    return (f"train.trackers={json.dumps(list(names))}",) if names else ()


def _toml_value(value) -> str:
    """How a default is written in a recipe: true, 0.001, "bce", [1, 2]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    return repr(value) if value is not None else "(unset)"


def _data_root() -> Path:
    return Path(os.environ.get("DA_SEG_DATA", "data"))


class _ConsoleHandler(logging.Handler):
    """da_seg's log records on stderr, through click (which finds the current stderr at each
    record, as a test runner or a redirect leaves it)."""

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        click.echo(text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}", err=True)


def _show_logs_on_console() -> None:
    """INFO and up of the ``da_seg`` loggers on the console (the pretrained-weights report: tensors
    loaded, skipped, kept random), once per process; under torchrun on rank 0 only."""
    logger = logging.getLogger("da_seg")
    if os.environ.get("RANK", "0") != "0" or any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        return
    logger.addHandler(_ConsoleHandler(logging.INFO))
    if not logger.level or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)


@click.group(cls=_LazyGroup, lazy=LAZY_COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(da_seg.__version__, "--version", prog_name="da-seg")
def main() -> None:
    """Domain adaptation and generalization for semantic segmentation."""
    _show_logs_on_console()


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. optim.lr=1e-3.")
@click.option("--seed", type=int, default=None, help="Shortcut for --set train.seed=N.")
@click.option("--resume", default=None, metavar="RUN_DIR|auto",
              help="Continue a run folder (its last.pt), or 'auto' for this recipe and seed's latest run.")
@click.option("--allow-change", "allow_changes", multiple=True, metavar="KEY",
              help="With --resume: a recipe key the resumed run may change (e.g. optim.lr after a divergence); "
                   "recorded in its metrics.json.")
@click.option("--runs", "runs_root", default="runs", show_default=True, type=click.Path(file_okay=False))
@click.option("--device", default="auto", show_default=True, callback=check_device, help="auto | cpu | cuda | cuda:N")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--tracker", "trackers", multiple=True, callback=_trackers, metavar="NAME",
              help="Shortcut for --set train.trackers=[...]: tensorboard, mlflow, wandb (repeatable).")
def train(recipe, overrides, seed, resume, allow_changes, runs_root, device, no_progress, trackers):
    """Train RECIPE (a TOML file) by its stage: one run, or a translate / self-training stage.
    Multi-GPU: torchrun --nproc_per_node=N -m da_seg train ..."""
    overrides = (*overrides, *trackers)
    from da_seg.runs import train as train_run
    from da_seg.stages import load, stage_of
    from da_seg.utils.resources import find_recipe

    recipe = str(find_recipe(recipe))  # a shipped recipes/... path works from any directory
    if seed is not None:
        overrides = (*overrides, f"train.seed={seed}")
    loaded = load(recipe, overrides)
    stage = stage_of(loaded)
    if stage.name != "train":  # a stage of several steps resumes by itself: run it again to continue
        if resume:
            raise click.UsageError(f"--resume applies to one run; {recipe} is a {stage.name} stage, which "
                                   "continues where it stopped when run again")
        out = stage.run(Path(recipe), overrides=overrides, runs_root=Path(runs_root), device=device,
                        progress=not no_progress)
        click.echo(f"{stage.name} stage done: {out}")
        return
    if allow_changes and not resume:
        raise click.UsageError("--allow-change applies to --resume RUN_DIR")
    metrics = train_run(loaded, Path(runs_root), resume=resume, device=device, progress=not no_progress,
                        allow_changes=allow_changes)
    last = metrics.get("last") or {}
    primary = metrics.get("primary_domain")
    if primary and last and os.environ.get("RANK", "0") == "0":
        click.echo(f"final {primary} mIoU: {last['domains'][primary]['miou']:.2f}")


@main.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--seeds", default=3, show_default=True, callback=_seeds, help="Run seeds 0..N-1.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@click.option("--runs", "runs_root", default="runs", show_default=True, type=click.Path(file_okay=False))
@click.option("--device", default="auto", show_default=True, callback=check_device)
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv"]), default="table")
@click.option("--no-progress", is_flag=True)
@click.option("--launcher", type=click.Choice(["local", "slurm"]), default="local", show_default=True,
              help="local: on this machine; slurm: every recipe x seed a Slurm job (submitit, extra [slurm]).")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(min=1),
              help="local: runs at once, each in its own process on its own GPU (GPU k mod count).")
@click.option("--gpus-per-job", default=1, show_default=True, type=click.IntRange(min=0),
              help="slurm: GPUs (= tasks) per node of each job; more than 1 makes it a multi-GPU run.")
@click.option("--nodes", default=1, show_default=True, type=click.IntRange(min=1), help="slurm: nodes per job.")
@click.option("--partition", default="", help="slurm: the partition.")
@click.option("--timeout-min", default=24 * 60, show_default=True, type=click.IntRange(min=1),
              help="slurm: time limit of each job, minutes.")
@click.option("--slurm-option", "slurm_extra", multiple=True, metavar="KEY=VALUE",
              help="slurm: another submitit parameter, e.g. slurm_account=abc, mem_gb=64.")
@click.option("--tracker", "trackers", multiple=True, callback=_trackers, metavar="NAME",
              help="Shortcut for --set train.trackers=[...]: tensorboard, mlflow, wandb (repeatable).")
def sweep(recipes, seeds, overrides, runs_root, device, fmt, no_progress, launcher, jobs, gpus_per_job, nodes,
          partition, timeout_min, slurm_extra, trackers):
    """Run RECIPES over seeds (skipping finished runs, resuming interrupted ones), then compare them:
    one after another here, several at once (--jobs N), or as Slurm jobs (--launcher slurm)."""
    from da_seg.config import parse_value
    from da_seg.engine.compare import collect_runs, compare_table
    from da_seg.stages import sweep as run_sweep
    from da_seg.stages.launch import SlurmOptions
    from da_seg.utils.resources import find_recipe

    extra = {}
    for item in slurm_extra:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--slurm-option")
        extra[key.strip()] = parse_value(value.strip())
    slurm = SlurmOptions(partition=partition, timeout_min=timeout_min, gpus_per_job=gpus_per_job, nodes=nodes,
                         extra=extra)
    run_dirs = run_sweep([find_recipe(r) for r in recipes], seeds, Path(runs_root), overrides=(*overrides, *trackers),
                         device=device, progress=not no_progress, launcher=launcher, jobs=jobs, slurm=slurm)
    click.echo(compare_table(collect_runs(run_dirs), fmt=fmt))


@main.command("eval")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--domain", required=True, help="Domain name or descriptor path.")
@click.option("--split", default="val", show_default=True)
@click.option("--mode", type=click.Choice(["whole", "slide"]), default="whole", show_default=True)
@click.option("--input-size", default=None, callback=_size,
              help="Resize the network input, HxW (labels stay full size).")
@click.option("--crop", default=None, callback=_size, help="Sliding-window size HxW.")
@click.option("--stride", default=None, callback=_size, help="Sliding-window stride HxW.")
@click.option("--flip", is_flag=True, help="Average with the horizontally flipped prediction.")
@click.option("--adabn", "adabn_domain", default=None, help="Recompute BatchNorm statistics on this domain's train images first.")
@click.option("--device", default="auto", show_default=True, callback=check_device)
@click.option("--per-class", is_flag=True)
@click.option("--json-out", type=click.Path(dir_okay=False), default=None)
def eval_cmd(checkpoints, domain, split, mode, input_size, crop, stride, flip, adabn_domain, device, per_class, json_out):
    """Evaluate a checkpoint (last.pt / best.pt) on a domain's labelled split.

    Several checkpoints are evaluated as one ensemble: their softmaxes at label resolution are
    averaged (FDA's multi-band ensemble of the beta = 0.01, 0.05, 0.09 models)."""
    from da_seg.data.augment import to_float_images
    from da_seg.data.datasets import SegmentationDataset
    from da_seg.data.domains import load_domain
    from da_seg.data.loaders import eval_loader, infinite_loader
    from da_seg.engine.checkpoint import load_segmenter_checkpoint
    from da_seg.engine.evaluate import SoftmaxEnsemble, evaluate, recompute_batchnorm
    from da_seg.utils.progress import Progress
    from da_seg.engine.checkpoint import restore_model
    from da_seg.engine.trainer import pick_device

    dev = pick_device(device)
    dom = load_domain(domain)
    adabn_dom = load_domain(adabn_domain) if adabn_domain else None
    models, iterations = [], []
    for checkpoint in checkpoints:
        state = load_segmenter_checkpoint(checkpoint)
        model = restore_model(state, dev)
        if dom.num_classes != model.num_classes:
            raise click.ClickException(f"{checkpoint} predicts {model.num_classes} classes but domain {dom.name!r} "
                                       f"has {dom.num_classes}")
        if adabn_dom is not None:
            loader = infinite_loader(SegmentationDataset(adabn_dom, "train", with_labels=False), 4, seed=0)
            model = recompute_batchnorm(model, (to_float_images(next(loader)["image"]).to(dev) for _ in range(50)), 50)
        models.append(model)
        iterations.append(state["iteration"])
    model = models[0] if len(models) == 1 else SoftmaxEnsemble(models)
    dataset = SegmentationDataset(dom, split, with_labels=True)
    loader = eval_loader(dataset, 1)
    bar = Progress(len(loader), f"eval {dom.name}")
    result = evaluate(model, loader, num_classes=dom.num_classes, device=dev, class_subsets=dom.class_subsets,
                      mode=mode, input_size=input_size, crop=crop, stride=stride, flip=flip,
                      progress=lambda done, total: bar.update(done))
    bar.close()
    m = result.metrics
    at = f"iteration {iterations[0]}" if len(iterations) == 1 else f"ensemble of {len(iterations)}, iterations {iterations}"
    click.echo(f"{dom.name} {split}: mIoU {m.miou:.2f}  pixel acc {m.pixel_accuracy:.2f}  ({at})")
    for name, value in m.subsets.items():
        click.echo(f"  mIoU over subset {name}: {value:.2f}")
    if per_class:
        for name, iou in zip(dom.class_names, m.iou):
            click.echo(f"  {name:>16s} {iou:6.2f}")
    if json_out:
        Path(json_out).write_text(json.dumps({"domain": dom.name, "split": split, "checkpoints": list(checkpoints),
                                              **m.to_json()}, indent=1))


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-c", "--checkpoint", "checkpoints", multiple=True, required=True,
              type=click.Path(exists=True, dir_okay=False),
              help="A trained checkpoint (last.pt / best.pt); repeat it for an ensemble.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the index/, color/ and overlay/ trees.")
@click.option("--mode", type=click.Choice(["whole", "slide"]), default="whole", show_default=True)
@click.option("--input-size", default=None, callback=_size,
              help="Resize each image to HxW for the network; the prediction is upsampled back to the image's size.")
@click.option("--crop", default=None, callback=_size, help="Sliding-window size HxW (--mode slide).")
@click.option("--stride", default=None, callback=_size, help="Sliding-window stride HxW (default: the crop).")
@click.option("--flip", is_flag=True, help="Average with the horizontally flipped prediction.")
@click.option("--alpha", default=0.5, show_default=True, help="Opacity of the colours in the overlay.")
@click.option("--device", default="auto", show_default=True, callback=check_device)
@click.option("--no-progress", is_flag=True)
def predict(inputs, checkpoints, out_dir, mode, input_size, crop, stride, flip, alpha, device, no_progress):
    """Segment images: INPUTS are image files, folders (searched recursively) or glob patterns
    (quote them; ** for any depth). Checkpoints are named with -c, so that no input is mistaken
    for one; several -c average their softmaxes (an ensemble, as in eval).

    Each image is predicted at its own size and written, with its path relative to the folder
    (or glob prefix) it was found under, as OUT/index/<path>.png (train ids, 8-bit),
    OUT/color/<path>.png (the checkpoint's class colours) and OUT/overlay/<path>.png. A file
    that cannot be read is skipped and named at the end; the exit code is 0 when at least one
    image was written, 2 when none could be."""
    from da_seg.engine.inference import load_models, palette_of, predict_files
    from da_seg.engine.trainer import pick_device
    from da_seg.utils.progress import Progress

    looks_like_checkpoint = [i for i in inputs if i.endswith(".pt")]
    if looks_like_checkpoint:
        raise click.UsageError(f"{looks_like_checkpoint[0]} looks like a checkpoint: name checkpoints with "
                               "-c/--checkpoint (inputs are images, folders or globs)")
    model, meta = load_models(checkpoints, pick_device(device))
    bar = Progress(0, "predict", enabled=not no_progress)

    def show(done: int, total: int) -> None:
        bar.total = total  # known once the inputs are expanded
        bar.update(done)

    report = predict_files(model, inputs, out_dir, colors=palette_of(meta, model.num_classes), mode=mode,
                           input_size=input_size, crop=crop, stride=stride, flip=flip, alpha=alpha, progress=show)
    bar.close()
    tried = len(report.written) + len(report.skipped)
    if report.skipped:
        click.echo(f"warning: skipped {len(report.skipped)} of {tried} inputs that could not be read: "
                   + ", ".join(name for name, _ in report.skipped), err=True)
        for name, reason in report.skipped:
            click.echo(f"  {name}: {reason}", err=True)
    if not report.written:
        click.echo(f"error: no image could be read from {', '.join(inputs)}" if tried else
                   f"error: no image found in {', '.join(inputs)}", err=True)
        sys.exit(2)
    click.echo(f"wrote {len(report.written)} predictions to {out_dir}/{{index,color,overlay}}/")


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript", "exported-program"]), required=True,
              help="onnx (dynamo exporter; needs pip install 'da-seg[export]'), torchscript (torch.jit.trace; "
                   "deprecated by PyTorch, still widely loaded) or exported-program (torch.export, a .pt2 file).")
@click.option("--size", required=True, callback=_size,
              help="HxW of the images the exported model takes (the batch size is free).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="File to write; a .json beside it "
                                                                              "describes inputs, outputs and classes.")
@click.option("--raw-input", is_flag=True,
              help="The model takes uint8 RGB pixels 0..255 instead of float RGB in [0, 1].")
@click.option("--no-check", is_flag=True, help="Do not load the export back to compare it with PyTorch.")
def export(checkpoint, fmt, size, out, raw_input, no_check):
    """Export a trained segmenter: images (N, 3, H, W), RGB float in [0, 1] (uint8 0..255 with
    --raw-input), in; logits (N, C, H/s, W/s) at the network's output stride s, out. The model
    normalizes its input itself (the checkpoint's ImageNet or Caffe convention): feed plain RGB.
    Upsample the logits bilinearly (align_corners as recorded in the .json) and take the argmax
    for the train ids that da-seg predict writes."""
    from da_seg.engine.checkpoint import load_checkpoint, restore_model
    from da_seg.engine.export import describe, export_segmenter

    state = load_checkpoint(Path(checkpoint))
    report = export_segmenter(restore_model(state, "cpu").eval(), fmt, size, out, raw_input=raw_input,
                              meta=state.get("model_meta"), check=not no_check)
    click.echo(describe(report))
    if not report.matches:
        click.echo(f"error: the exported model differs from PyTorch by {report.max_abs_diff:.3g} (tolerance "
                   f"{report.tolerance:.3g}); do not deploy {out}", err=True)
        sys.exit(2)


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--per-class", is_flag=True, help="Add per-class IoU columns (mean over seeds).")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv"]), default="table")
@click.option("--domain", default=None, help="Report this evaluated domain instead of each run's primary one.")
@click.option("--all", "include_unfinished", is_flag=True, help="Include unfinished runs.")
def compare(runs, per_class, fmt, domain, include_unfinished):
    """Table of last and best target mIoU per recipe, mean ± std over seeds."""
    from da_seg.engine.compare import collect_runs, compare_table

    found = collect_runs([Path(r) for r in runs], include_unfinished=include_unfinished)
    if not found:
        raise click.ClickException(f"no finished runs (metrics.json) below {', '.join(runs)}")
    click.echo(compare_table(found, per_class=per_class, fmt=fmt, domain=domain))


@main.command()
@click.argument("out", required=False, type=click.Path(file_okay=False))
@click.option("--benchmark", "benchmarks", multiple=True, type=click.Choice(["streets", "aerial", "streets_hr"]),
              help="Which benchmark(s); default streets and aerial (streets_hr, 256x512, only when named).")
@click.option("--seed", default=0, show_default=True)
@click.option("--workers", default=2, show_default=True)
@click.option("--force", is_flag=True, help="Regenerate even when up-to-date files are there.")
def synth(out, benchmarks, seed, workers, force):
    """Generate the synthetic domains into OUT (default: $DA_SEG_DATA/synth).

    Deterministic: the same seed gives byte-identical files. Files already generated with the
    same version and parameters are kept.
    """
    from da_seg.data.synthetic import generate

    out_dir = Path(out) if out else _data_root() / "synth"
    generate(out_dir, benchmarks=tuple(benchmarks) or ("streets", "aerial"), seed=seed, workers=workers,
             force=force)


@main.command("list")
@click.argument("kind", type=click.Choice(["models", "methods", "domains", "recipes"]))
def list_cmd(kind):
    """List models (with parameter counts), methods, domains or recipes."""
    if kind == "models":
        from da_seg.models import MODELS

        try:
            from da_seg.models import describe_models
            rows = describe_models()
        except ImportError:
            rows = [(name, float("nan"), "") for name in MODELS]
        for name, params, description in rows:
            click.echo(f"{name:24s} {params:8.2f}M  {description}")
    elif kind == "methods":
        import inspect

        from da_seg.methods import METHODS, method_options

        for name, cls in METHODS.items():
            click.echo(name + (f"  (stage {cls.stage} only)" if cls.stage else ""))
            for line in (inspect.getdoc(cls) or "").splitlines():
                click.echo(f"    {line}".rstrip())
            options = method_options(cls)
            click.echo(f"    [components.{name}] options:" if options else "    no options")
            width = max((len(f"{o.name} = {_toml_value(o.default)}") for o in options), default=0)
            for o in options:
                assignment = f"{o.name} = {_toml_value(o.default)}"
                click.echo(f"      {assignment:{width}s}  # {o.type}" + (f"; {o.comment}" if o.comment else ""))
            click.echo("")
    elif kind == "domains":
        from da_seg.data.domains import available_domains

        for name, path in sorted(available_domains().items()):
            click.echo(f"{name:24s} {path}")
    else:
        from da_seg.utils.resources import shipped_recipes

        # ./recipes first (yours, or the checkout's), then the shipped ones it does not shadow:
        # every printed path is one `da-seg train` accepts from this directory.
        local = Path("recipes")
        names = {p.as_posix() for p in local.rglob("*.toml")} if local.is_dir() else set()
        for name in sorted(names | set(shipped_recipes())):
            click.echo(name)


@main.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def check(recipes, overrides):
    """Check RECIPES without data or training: keys and values, stage, components and their
    options, and that the model and components build (random init, CPU). One line per recipe."""
    from da_seg.check import check_recipe
    from da_seg.utils.resources import find_recipe

    failed = 0
    for path in recipes:
        problem, note = check_recipe(find_recipe(path), tuple(overrides))
        failed += problem is not None
        if problem and problem.startswith(f"{path}: "):  # the line already names the file
            problem = problem[len(path) + 2:]
        click.echo(f"{path}: " + (f"error: {problem}" if problem else "OK" + (f" ({note})" if note else "")))
    if failed:
        click.echo(f"{failed} of {len(recipes)} recipes failed", err=True)
        sys.exit(2)


from da_seg.data.prepare import prepare as _prepare_group  # noqa: E402

main.add_command(_prepare_group, "prepare")


def _one_line_errors() -> tuple[type[BaseException], ...]:
    """The errors shown as one line. Imported once one was raised: the training loop's error
    comes with torch, which ``da-seg list`` and ``--help`` do not import."""
    from da_seg.data.domains import DomainError
    from da_seg.data.synthetic import SyntheticDataError
    from da_seg.engine.logging import NonFiniteLossError
    from da_seg.utils.files import StorageError

    return (ConfigError, DomainError, KeyError, FileNotFoundError, ValueError, NonFiniteLossError,
            SyntheticDataError, StorageError)


def run() -> None:
    """Entry point that turns configuration and data errors into one clear line, not a traceback."""
    if os.environ.get("DA_SEG_DEBUG"):  # full tracebacks for developers
        main()
        return
    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except Exception as err:
        if not isinstance(err, _one_line_errors()):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        click.echo(f"error: {message}", err=True)
        sys.exit(2)
