"""Training-step throughput of each method recipe against the bare cost of the same work.

    python benchmarks/throughput.py recipes/synthetic/streets/*.toml --device cpu
    python benchmarks/throughput.py recipes/gta5_to_cityscapes/advent.toml \
        recipes/gta5_to_cityscapes/daformer_mitb5.toml --device cuda --amp bf16 --channels-last

For every recipe, in a fresh process:
1. The recipe's own Trainer runs ``--warmup`` then ``--steps`` iterations of its step, with the
   loss logging of ``fit()`` (device-side sums, one host copy every ``train.log_every`` steps),
   the recipe's loaders (``data.num_workers`` processes) and its GPU augmentation. Evaluation and
   checkpoints are periodic and left out; the eval benchmark below times evaluation.
2. The first step records every network call it makes: the segmenter (source, target, mixed
   images), the methods' own networks (discriminators, EMA teacher) with their input shapes,
   grad mode and autocast state. The *bare work* replays exactly those calls on tensors already
   on the device, one backward over everything that had a gradient, and the optimizers' steps.
   No data loading, augmentation, loss functions, logging or bookkeeping.
3. Both are timed in interleaved blocks of up to 5 steps, and the medians compared, so that a
   shared or throttled machine slows both sides alike: overhead ratio = step time / bare time.
   Everything above 1 is the loop's cost: loader waits, augmentation, the loss terms themselves
   (upsampling logits to the label size, softmax, CE), EMA updates, logging and host-device
   synchronization. *wait* is the part of a timed step spent blocked on the loaders (starvation).
A last pass times the data path alone, back to back (``next_batches``: loader + transfer +
augmentation), i.e. the loaders' own throughput.

Data: ``--data random`` (default) writes a temporary domain of random smooth images with the
recipe's classes at ``--source-size`` / ``--target-size`` (PNG, like GTA5 and Cityscapes), so no
dataset is needed; ``--data recipe`` uses the recipe's own domains.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed steps; on CPU the process's
peak RSS (``ru_maxrss``, includes the Python runtime and the loader's shared memory).

Evaluation: ``--eval-size 1024x2048`` also times full-resolution prediction (whole image and
sliding window, ``--eval-crop``) of the recipe's segmenter, in images/s.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import in_fresh_process, parse_size, sync  # noqa: E402
from da_seg.config import load_recipe  # noqa: E402
from da_seg.data.domains import load_domain  # noqa: E402
from da_seg.engine.evaluate import predict  # noqa: E402
from da_seg.engine.trainer import Trainer  # noqa: E402


# ------------------------------------------------------------------ recording the step's work
@dataclass
class Call:
    """One network call made by a training step, enough to replay it."""

    module: str                          # "segmenter" or "<component>.<network>"
    inputs: list[tuple[tuple[int, ...], torch.dtype, bool]]  # shape, dtype, requires_grad per tensor
    grad: bool                           # torch.is_grad_enabled() at the call
    autocast: torch.dtype | None         # autocast dtype when enabled


class CallRecorder:
    """Forward pre-hooks on the top-level networks; ``calls`` lists what one step ran."""

    def __init__(self, modules: dict[str, nn.Module], device: torch.device):
        self.modules, self.device = modules, device
        self.calls: list[Call] = []
        self.recording = False
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if not self.recording:
                return
            tensors = [(tuple(a.shape), a.dtype, a.requires_grad) for a in args if isinstance(a, Tensor)]
            kind = self.device.type
            dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
            self.calls.append(Call(name, tensors, torch.is_grad_enabled(), dtype))
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _output_tensors(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _output_tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _output_tensors(o)]
    if hasattr(out, "logits"):  # SegmenterOutput: what the losses read
        return [t for t in (out.logits, getattr(out, "aux_logits", None)) if t is not None]
    return []


class BareWork:
    """Replays recorded calls on fixed device tensors: forwards, one backward, optimizer steps."""

    def __init__(self, calls: list[Call], modules: dict[str, nn.Module], optimizers: list, device):
        self.calls, self.modules, self.optimizers = calls, modules, optimizers
        self.inputs = [[(torch.rand(shape, device=device, dtype=dtype) if dtype.is_floating_point
                         else torch.zeros(shape, device=device, dtype=dtype)).requires_grad_(rg)
                        for shape, dtype, rg in call.inputs] for call in calls]

    def __call__(self) -> None:
        scalars = []
        for call, inputs in zip(self.calls, self.inputs):
            kind = inputs[0].device.type if inputs else "cpu"
            amp = torch.autocast(kind, dtype=call.autocast) if call.autocast is not None else nullcontext()
            with torch.set_grad_enabled(call.grad), amp:
                out = self.modules[call.module](*inputs)
            if call.grad:
                scalars += [t.float().mean() for t in _output_tensors(out) if t.requires_grad]
        if scalars:
            torch.stack(scalars).sum().backward()
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)


class LoaderWait:
    """Time the trainer's steps spend blocked on its loaders (``next()`` on their iterators):
    starvation shows here, while work the workers do during the step's compute does not."""

    def __init__(self, trainer: Trainer):
        self.seconds, self.calls = 0.0, 0
        for stream in (trainer.source_stream, trainer.target_stream):
            if stream is not None and stream._iterator is not None:
                stream._iterator = self._timed(stream._iterator)

    def _timed(self, iterator):
        while True:
            start = time.perf_counter()
            batch = next(iterator)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            yield batch


# ------------------------------------------------------------------ a temporary random domain
def write_random_domain(root: Path, name: str, class_names, colors, size: tuple[int, int], count: int,
                        seed: int) -> Path:
    """``count`` smooth random RGB PNGs and blob labels at ``size`` (H, W); returns the descriptor."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "labels").mkdir(parents=True, exist_ok=True)
        for i in range(count if split == "train" else 2):
            coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
            noise = rng.integers(-12, 13, (h, w, 3))
            image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
            image.save(root / split / "images" / f"{i:05d}.png")
            blobs = rng.integers(0, len(class_names), (h // 32 + 1, w // 32 + 1), dtype=np.uint8)
            Image.fromarray(blobs).resize((w, h), Image.NEAREST).save(root / split / "labels" / f"{i:05d}.png")
    names = ", ".join(f'"{n}"' for n in class_names)
    cols = ", ".join(f"[{r}, {g}, {b}]" for r, g, b in colors)
    descriptor = root / f"{name}.toml"
    descriptor.write_text(
        f'name = "{name}"\nroot = "{root}"\n\n[classes]\nnames = [{names}]\ncolors = [{cols}]\n\n'
        + "".join(f'[splits.{s}]\nimages = "{s}/images"\nimage_suffix = ".png"\nlabels = "{s}/labels"\n'
                  f'label_suffix = ".png"\n\n' for s in ("train", "val")))
    return descriptor


# ------------------------------------------------------------------ one recipe
def _timed(fn, steps: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls, synchronized once at each end."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def benchmark_recipe(recipe_path: str, overrides: list[str], args: argparse.Namespace, tmp: str):
    """The recipe as benchmarked: random PNG domains in ``tmp`` at ``args.source_size`` /
    ``args.target_size`` (``--data random``), no weight files (``--random-init``), a schedule
    just long enough, the AMP and memory-format flags."""
    overrides = list(overrides)
    recipe = load_recipe(recipe_path, tuple(overrides))
    if args.data == "random":
        classes = load_domain(recipe.data.source)
        domains = {}
        for role, size in (("source", args.source_size), ("target", args.target_size)):
            domains[role] = write_random_domain(Path(tmp) / role, f"bench_{role}", classes.class_names,
                                                classes.colors, size, args.images, seed=len(role))
        overrides += [f'data.source="{domains["source"]}"', 'data.val_domains=[]',
                      f"data.source_size={list(args.source_size)}", f"data.target_size={list(args.target_size)}"]
        if recipe.data.target:
            overrides += [f'data.target="{domains["target"]}"']
    if args.random_init:  # no weight file is read: timings do not depend on the weights
        overrides += ['model.pretrained=""'] + [
            f'components.{name}.{key}=""' for name, options in recipe.components.items()
            for key, value in (options or {}).items() if key.endswith("_weights") and isinstance(value, str)]
    overrides += [f"schedule.iters={args.warmup + 3 * args.steps + 10}", f"train.amp=\"{args.amp}\"",
                  f"model.channels_last={'true' if args.channels_last else 'false'}"]
    return load_recipe(recipe_path, tuple(overrides))


def measure(recipe_path: str, overrides: list[str], args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="da_seg_throughput_") as tmp:
        recipe = benchmark_recipe(recipe_path, overrides, args, tmp)
        trainer = Trainer(recipe, run_dir=None, device=args.device, progress=False)
        device = trainer.device

        modules = {"segmenter": trainer.model}
        for component in trainer.components:
            for name, net in component.networks.items():
                modules[f"{component.name}.{name}"] = net
        recorder = CallRecorder(modules, device)
        recorder.recording = True
        trainer.step()                          # also builds the loaders and warms the allocator
        waits = LoaderWait(trainer)
        recorder.recording = False
        recorder.remove()
        if args.compile:
            trainer.net = torch.compile(trainer.net)
            modules["segmenter"] = trainer.net

        log_every = recipe.train.log_every

        def loop_step() -> None:
            trainer.step()
            if trainer.iteration % log_every == 0:
                trainer.flush_logs()

        for _ in range(args.warmup):
            loop_step()
        waits.seconds = waits.calls = 0
        optimizers = [trainer.optimizer] + [o for c in trainer.components for o in c.optimizers.values()]
        bare = BareWork(recorder.calls, modules, optimizers, device)
        for _ in range(max(1, args.warmup // 2)):
            bare()
        # Interleaved blocks, medians: a shared or throttled machine slows both sides alike.
        block = max(1, min(5, args.steps // 4))
        step_times, bare_times, peaks = [], [], {"step": 0, "bare": 0}
        for start in range(0, args.steps, block):
            n = min(block, args.steps - start)
            for side, fn, times in (("step", loop_step, step_times), ("bare", bare, bare_times)):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times.append(_timed(fn, n, device))
                if device.type == "cuda":
                    peaks[side] = max(peaks[side], torch.cuda.max_memory_allocated(device))
        step_s, bare_s = statistics.median(step_times), statistics.median(bare_times)
        wait_s = waits.seconds / args.steps
        peak_step = peaks["step"] if device.type == "cuda" else None
        peak_bare = peaks["bare"] if device.type == "cuda" else None

        data_s = _timed(trainer.next_batches, args.steps, device)

        eval_rows = []
        if args.eval_size:
            model = trainer.model.eval()
            images = torch.rand(1, 3, *args.eval_size, device=device)
            with torch.no_grad():
                for mode in ("whole", "slide"):
                    kwargs = {"crop": args.eval_crop, "stride": (args.eval_crop[0] * 2 // 3,
                                                                args.eval_crop[1] * 2 // 3)} if mode == "slide" else {}
                    run = lambda: predict(model, images, mode=mode, amp_dtype=trainer.amp_dtype, **kwargs)  # noqa: E731
                    run()
                    eval_rows.append((mode, 1.0 / _timed(run, args.eval_iters, device)))

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        images = recipe.data.batch_size * (int(trainer.uses_source) + int(trainer.uses_target))
        counts: dict[str, int] = {}
        for call in recorder.calls:
            key = call.module + ("" if call.grad else " (no grad)")
            counts[key] = counts.get(key, 0) + 1
        return {
            "recipe": recipe_path, "model": recipe.model.name, "methods": "+".join(recipe.components),
            "batch": f"{recipe.data.batch_size}+{recipe.data.batch_size if trainer.uses_target else 0}",
            "step_ms": step_s * 1e3, "bare_ms": bare_s * 1e3, "ratio": step_s / bare_s,
            "data_ms": data_s * 1e3, "wait_ms": wait_s * 1e3, "images_per_s": images / step_s,
            "peak_mib": (peak_step / 2**20) if peak_step is not None else rss / 2**20,
            "bare_peak_mib": (peak_bare / 2**20) if peak_bare is not None else None,
            "calls": ", ".join(f"{k} x{v}" for k, v in counts.items()), "eval": eval_rows,
            "amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "off",
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override applied to every recipe (e.g. model.name=\"deeplabv2_r101\")")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"), help="train.amp (CUDA only)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the segmenter (both passes)")
    parser.add_argument("--random-init", action="store_true",
                        help="ignore the recipe's weight files (model.pretrained, components' *_weights)")
    parser.add_argument("--data", choices=("random", "recipe"), default="random")
    parser.add_argument("--source-size", type=parse_size, default=(64, 128))
    parser.add_argument("--target-size", type=parse_size, default=(64, 128))
    parser.add_argument("--images", type=int, default=16, help="images per random domain")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="intra-op CPU threads (0: torch's default)")
    parser.add_argument("--eval-size", type=parse_size, default=None)
    parser.add_argument("--eval-crop", type=parse_size, default=(512, 1024))
    parser.add_argument("--eval-iters", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--same-process", action="store_true",
                        help="measure in this process, not a fresh one per recipe (quick checks; peaks then add up)")
    args = parser.parse_args(argv)

    memory = "peak alloc MiB" if str(args.device).startswith("cuda") else "peak RSS MiB"
    print(f"device {args.device}, AMP {args.amp}, channels_last {args.channels_last}, compile {args.compile}, "
          f"data {args.data} ({args.source_size[0]}x{args.source_size[1]} source, "
          f"{args.target_size[0]}x{args.target_size[1]} target), {args.warmup} warm-up + {args.steps} timed "
          f"steps, torch {torch.__version__}")
    header = (f"| recipe | model | batch | step ms | bare ms | overhead | wait ms | data ms | images/s | {memory} | "
              f"network calls per step |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    evals, evaluated_models, rows = [], set(), []
    for path in args.recipes:
        model_name = load_recipe(path, tuple(args.overrides)).model.name
        # Evaluation cost depends on the model only: time it once per model.
        job_args = argparse.Namespace(**{**vars(args), "eval_size": None}) if model_name in evaluated_models else args
        evaluated_models.add(model_name)
        if args.same_process:
            r = measure(path, args.overrides, job_args)
        else:
            r = in_fresh_process(measure, path, args.overrides, job_args)  # clean allocator, loaders, peaks
        print(f"| {Path(r['recipe']).stem} | {r['model']} | {r['batch']} | {r['step_ms']:.1f} | {r['bare_ms']:.1f} | "
              f"{r['ratio']:.3f} | {r['wait_ms']:.1f} | {r['data_ms']:.1f} | {r['images_per_s']:.1f} | {r['peak_mib']:.0f} | "
              f"{r['calls']} |", flush=True)
        evals += [(r["model"], mode, ips) for mode, ips in r["eval"]]
        rows.append(r)
    if evals:
        size = f"{args.eval_size[0]}x{args.eval_size[1]}"
        print(f"\nevaluation at {size} (slide: {args.eval_crop[0]}x{args.eval_crop[1]} crops, 2/3 stride)")
        print("| model | mode | images/s |\n|---|---|---|")
        for model, mode, ips in evals:
            print(f"| {model} | {mode} | {ips:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"memory": memory, "rows": rows}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    main()
