"""da_seg's training step against the official implementation's, at equal work.

    python benchmarks/vs_official.py advent --official-src ~/src/ADVENT --device cpu \
        --source-size 180x320 --target-size 128x256
    python benchmarks/vs_official.py adaptsegnet --official-src ~/src/AdaptSegNet --device cuda

``--official-src`` is a checkout the user gives (valeoai/ADVENT, wasidennis/AdaptSegNet); this
project contains none of its code. Its modules are imported from there and its own training
function runs unchanged; the few calls that no longer run on today's PyTorch or on a CPU are
patched at run time from here (``_shims``), never in its files.

Equal work, both sides: DeepLabV2-R101 multi-level (ASPP with the official branch count), random
init, batch 1 source + 1 target at ``--source-size`` / ``--target-size`` (default the protocol's
720x1280 / 512x1024), full precision, the same losses and weights, SGD for the segmenter and Adam
for the two discriminators, one image pair per step. Tensors are already in memory on both
sides: no data loading, no file decoding (``--loaders`` gives da_seg its real loaders on random
PNGs, to show what they add).

What is timed:
- official: its training function itself (ADVENT ``train_UDA.train_advent``; AdaptSegNet's
  ``pytorch_0.4/train_gta2cityscapes_multi.main``) on in-memory batches. One step = the time
  between two fetches of the source batch, i.e. the whole loop body: zero_grad, poly LR, source
  forward + CE + backward, target forward + adversarial loss + backward, both discriminators'
  updates, the optimizer steps and its per-step loss printing (to /dev/null), and the batch's
  copy to the device.
- da_seg: ``Trainer.step()`` plus the loss logging of ``fit()`` (a host read every
  ``train.log_every`` steps), its batch streams replaced by the same in-memory uint8 batches that
  go through the recipe's GPU augmentation (none here but the conversion to float).
Each step is synchronized on CUDA at its boundary on both sides. Each side runs in its own fresh
process, ``--rounds`` times, alternating (official, da_seg, official, da_seg ...), so that a
shared machine slows both alike; the medians over all timed steps are compared. Memory: on CUDA
``torch.cuda.max_memory_allocated`` over the timed steps; on CPU the process's peak RSS
(``ru_maxrss``: Python, libraries, weights and the step's activations).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import in_fresh_process, parse_size, sync  # noqa: E402

NUM_CLASSES = 19
RECIPES = {
    "advent": "recipes/gta5_to_cityscapes/advent_deeplabv2_r101.toml",
    "adaptsegnet": "recipes/gta5_to_cityscapes/adaptsegnet_deeplabv2_r101.toml",
}
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ shared by both sides
def _inputs(args, labels_dtype=torch.int64):
    """The in-memory batches: uint8 images (1, 3, H, W) and labels (1, H, W), fixed seed."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for role, (h, w) in (("source", args.source_size), ("target", args.target_size)):
        out[role] = (torch.randint(0, 256, (1, 3, h, w), generator=g, dtype=torch.uint8),
                     torch.randint(0, NUM_CLASSES, (1, h, w), generator=g).to(labels_dtype))
    return out


class StepClock:
    """Times between successive ``tick()`` calls (synchronized), skipping the first ``warmup``;
    resets the CUDA peak when the timed steps start."""

    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup = device, warmup
        self.stamps: list[float] = []

    def tick(self) -> None:
        sync(self.device)
        if len(self.stamps) == self.warmup and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.stamps.append(time.perf_counter())

    def steps(self) -> list[float]:
        s = self.stamps[self.warmup:]
        return [b - a for a, b in zip(s, s[1:])]


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def _children_private_mib() -> float:
    """Private memory (USS: private clean + dirty pages) of this process's live children (loader
    workers), in MiB: what they add to this process's RSS. Their shared pages (libraries, the
    parent's forked heap) are already counted in the parent's RSS; PSS would count them again."""
    total_kib = 0
    for children in Path("/proc/self/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith(("Private_Clean:", "Private_Dirty:")):
                        total_kib += int(line.split()[1])
            except OSError:
                continue
    return total_kib / 1024


def _trainable(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)


# ------------------------------------------------------------------ run-time shims for the official code
@contextlib.contextmanager
def _shims(device: torch.device):
    """What the official code needs to run here, applied only around its call.

    - ``Tensor.cuda(dev)`` (its batches' transfer) goes to ``device``: a no-op on CPU.
    - ``Tensor.get_device()`` is -1 on CPU, which ADVENT's ``bce_loss`` passes to ``.to()``:
      it returns the tensor's device there instead.
    - stdout / stderr (its per-step loss print and tqdm bar) go to a buffer.
    - ``tensorboardX`` (imported, used only when a log dir exists) is stubbed when not installed.
    """
    original_cuda, original_get_device = torch.Tensor.cuda, torch.Tensor.get_device
    torch.Tensor.cuda = lambda self, *a, **k: self.to(device, non_blocking=k.get("non_blocking", False))
    if device.type == "cpu":
        torch.Tensor.get_device = lambda self: self.device if self.device.type == "cpu" else original_get_device(self)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        torch.Tensor.cuda, torch.Tensor.get_device = original_cuda, original_get_device


def _stub_missing(*names: str) -> None:
    """Empty modules for imports the timed code never uses (tensorboardX's SummaryWriter, the
    plotting its dataset files import), where they are not installed."""
    for name in names:
        try:
            __import__(name)
        except ImportError:
            parent = None
            for depth, part in enumerate(name.split(".")):
                full = ".".join(name.split(".")[:depth + 1])
                module = sys.modules.get(full) or types.ModuleType(full)
                module.SummaryWriter = None
                sys.modules[full] = module
                if parent is not None:
                    setattr(parent, part, module)
                parent = module


class _Batches:
    """An endless in-memory loader: yields ``batch`` and ticks ``clock`` at each fetch."""

    def __init__(self, batch: tuple, clock: StepClock | None = None):
        self.batch, self.clock = batch, clock

    def __iter__(self):
        while True:
            if self.clock is not None:
                self.clock.tick()
            yield self.batch


def official_advent(src: str, args) -> dict:
    """valeoai/ADVENT ``train_UDA.train_advent`` on in-memory batches, config as its config.py."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(src).resolve()))
    _stub_missing("tensorboardX")
    from advent.domain_adaptation import train_UDA
    from advent.model.deeplabv2 import get_deeplab_v2

    device = torch.device(args.device)
    data = _inputs(args)
    steps = args.warmup + args.steps + 1   # n + 1 fetches bound n steps
    with tempfile.TemporaryDirectory() as tmp:
        # advent/domain_adaptation/config.py values (AdvEnt, multi-level), sizes as (W, H).
        train = types.SimpleNamespace(
            INPUT_SIZE_SOURCE=args.source_size[::-1], INPUT_SIZE_TARGET=args.target_size[::-1],
            MULTI_LEVEL=True, LEARNING_RATE=2.5e-4, MOMENTUM=0.9, WEIGHT_DECAY=0.0005, POWER=0.9,
            LAMBDA_SEG_MAIN=1.0, LAMBDA_SEG_AUX=0.1, LEARNING_RATE_D=1e-4, LAMBDA_ADV_MAIN=0.001,
            LAMBDA_ADV_AUX=0.0002, MAX_ITERS=250000, EARLY_STOP=steps - 1, SAVE_PRED_EVERY=10**9,
            SNAPSHOT_DIR=tmp, TENSORBOARD_LOGDIR=str(Path(tmp) / "no_tensorboard"), TENSORBOARD_VIZRATE=100)
        cfg = types.SimpleNamespace(TRAIN=train, GPU_ID=device, NUM_CLASSES=NUM_CLASSES)
        model = get_deeplab_v2(num_classes=NUM_CLASSES, multi_level=True)
        # Its loaders yield mean-subtracted float images: the same cast here, outside the loop.
        images_s, labels_s = data["source"]
        images_t, _ = data["target"]
        clock = StepClock(device, args.warmup)
        source = _Batches((images_s.float(), labels_s, None, None), clock)
        target = _Batches((images_t.float(), None, None, None))
        with _shims(device):
            train_UDA.train_advent(model, source, target, cfg)
    discriminators = [train_UDA.get_fc_discriminator(NUM_CLASSES) for _ in range(2)]
    return {"steps": clock.steps(), "peak_mib": _peak_mib(device), "params": _trainable(model, *discriminators)}


def official_adaptsegnet(src: str, args) -> dict:
    """wasidennis/AdaptSegNet ``pytorch_0.4/train_gta2cityscapes_multi.main`` (the release's
    port to PyTorch >= 0.4) on in-memory batches, its argparse defaults but the sizes."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(src).resolve()
    sys.path.insert(0, str(root))
    _stub_missing("tensorboardX", "matplotlib.pyplot")
    device = torch.device(args.device)
    data = _inputs(args)
    steps = args.warmup + args.steps + 1
    with tempfile.TemporaryDirectory() as tmp:
        (h_s, w_s), (h_t, w_t) = args.source_size, args.target_size
        argv = sys.argv
        sys.argv = ["train", f"--input-size={w_s},{h_s}", f"--input-size-target={w_t},{h_t}",
                    f"--num-steps-stop={steps}", "--save-pred-every=1000000000", f"--snapshot-dir={tmp}"] + (
                        ["--cpu"] if device.type == "cpu" else [])
        try:  # it parses sys.argv at import
            import importlib.util
            spec = importlib.util.spec_from_file_location("adaptsegnet_train",
                                                          root / "pytorch_0.4" / "train_gta2cityscapes_multi.py")
            script = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(script)
        finally:
            sys.argv = argv
        clock = StepClock(device, args.warmup)
        images_s, labels_s = data["source"]
        images_t, _ = data["target"]
        loaders = iter([_Batches((images_s.float(), labels_s, None, None), clock),
                        _Batches((images_t.float(), None, None))])
        built = {}
        # Run-time replacements in its module namespace: in-memory loaders instead of its file
        # datasets, and no ImageNet download (random init, as da_seg's side).
        script.GTA5DataSet = script.cityscapesDataSet = lambda *a, **k: None
        script.data = types.SimpleNamespace(DataLoader=lambda *a, **k: next(loaders))
        script.model_zoo = types.SimpleNamespace(load_url=lambda *a, **k: {})
        original_model = script.DeeplabMulti
        script.DeeplabMulti = lambda **k: built.setdefault("model", original_model(**k))
        with _shims(device):
            script.main()
    discriminators = [script.FCDiscriminator(num_classes=NUM_CLASSES) for _ in range(2)]
    return {"steps": clock.steps(), "peak_mib": _peak_mib(device),
            "params": _trainable(built["model"], *discriminators)}


OFFICIAL = {"advent": official_advent, "adaptsegnet": official_adaptsegnet}


# ------------------------------------------------------------------ da_seg's side
class InMemoryStream:
    """Stands for a trainer's AugmentedStream: the same uint8 batch each step, through the
    recipe's augmentation (on the device), ticking ``clock`` at each fetch."""

    def __init__(self, images, labels, augment, device, clock: StepClock | None = None):
        from da_seg.methods.base import DomainBatch
        self.make = DomainBatch
        self.images, self.labels = images.to(device), (labels.to(device) if labels is not None else None)
        self.augment, self.clock = augment, clock

    def next(self):
        if self.clock is not None:
            self.clock.tick()
        images, labels = self.augment(self.images, self.labels)
        return self.make(images, labels, None)

    def close(self) -> None:
        pass


def da_seg_step(method: str, args) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    from benchmarks.throughput import benchmark_recipe
    from da_seg.engine.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="da_seg_vs_official_") as tmp:
        bench = argparse.Namespace(data="random", source_size=args.source_size, target_size=args.target_size,
                                   images=4, random_init=True, warmup=args.warmup, steps=args.steps, amp="off",
                                   channels_last=False)
        recipe = benchmark_recipe(str(ROOT / RECIPES[method]), args.overrides, bench, tmp)
        trainer = Trainer(recipe, run_dir=None, device=args.device, progress=False)
        device = trainer.device
        clock = StepClock(device, args.warmup)
        if not args.loaders:
            data = _inputs(args)
            trainer.source_stream = InMemoryStream(*data["source"], trainer.source_augment, device, clock)
            trainer.target_stream = InMemoryStream(data["target"][0], None, trainer.target_augment, device)
        for _ in range(args.warmup + args.steps):
            if args.loaders:
                clock.tick()
            trainer.step()
            if trainer.iteration % recipe.train.log_every == 0:
                trainer.flush_logs()
        if args.loaders:
            clock.tick()
        else:
            trainer.next_batches()  # the last step's end, as the official side's next fetch
        loaders_mib = _children_private_mib()
        trainer.close_loaders()
        networks = [n for c in trainer.components for n in c.networks.values()]
        return {"steps": clock.steps(), "peak_mib": _peak_mib(device), "loaders_mib": loaders_mib,
                "params": _trainable(trainer.model, *networks)}


# ------------------------------------------------------------------ the comparison
def compare(args) -> dict:
    official, ours = {"steps": [], "peak": []}, {"steps": [], "peak": []}
    params = {}
    for _ in range(args.rounds):
        for side, fn, arg in (("official", OFFICIAL[args.method], args.official_src),
                              ("da_seg", da_seg_step, args.method)):
            r = in_fresh_process(fn, arg, args)
            bucket = official if side == "official" else ours
            bucket["steps"].append(statistics.median(r["steps"]))
            bucket["peak"].append(r["peak_mib"])
            params[side] = r["params"]
            loaders = f" + loader processes {r['loaders_mib']:.0f} MiB (private)" if r.get("loaders_mib") else ""
            print(f"  {side:8s} median {bucket['steps'][-1] * 1e3:9.1f} ms/step over {len(r['steps'])} steps, "
                  f"min {min(r['steps']) * 1e3:.1f}, peak {r['peak_mib']:.0f} MiB{loaders}", flush=True)
    result = {
        "official_ms": statistics.median(official["steps"]) * 1e3, "da_seg_ms": statistics.median(ours["steps"]) * 1e3,
        "official_peak_mib": max(official["peak"]), "da_seg_peak_mib": max(ours["peak"]), "params": params,
    }
    result["ratio"] = result["da_seg_ms"] / result["official_ms"]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=sorted(OFFICIAL))
    parser.add_argument("--official-src", required=True, help="a checkout of the official repository")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--source-size", type=parse_size, default=(720, 1280))
    parser.add_argument("--target-size", type=parse_size, default=(512, 1024))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per side, alternated")
    parser.add_argument("--threads", type=int, default=0, help="intra-op CPU threads (0: torch's default)")
    parser.add_argument("--loaders", action="store_true",
                        help="da_seg with its real loaders on random PNGs (data.num_workers processes)")
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="da_seg recipe override")
    args = parser.parse_args(argv)
    if not (Path(args.official_src) / ("advent" if args.method == "advent" else "pytorch_0.4")).is_dir():
        parser.error(f"--official-src {args.official_src}: not a checkout of the official {args.method} "
                     f"code (expected {'advent/' if args.method == 'advent' else 'pytorch_0.4/'} inside)")
    memory = "peak alloc MiB" if args.device.startswith("cuda") else "peak RSS MiB"
    print(f"{args.method}: official ({args.official_src}) vs da_seg ({RECIPES[args.method]}), device "
          f"{args.device}, source {args.source_size[0]}x{args.source_size[1]}, target "
          f"{args.target_size[0]}x{args.target_size[1]}, batch 1+1, full precision, random init, "
          f"{'da_seg with its loaders' if args.loaders else 'in-memory batches on both sides'}, "
          f"{args.warmup} warm-up + {args.steps} timed steps x {args.rounds} alternated fresh processes, "
          f"torch {torch.__version__}")
    r = compare(args)
    print(f"| side | median ms/step | {memory} | trainable parameters |\n|---|---:|---:|---:|")
    print(f"| official {args.method} | {r['official_ms']:.1f} | {r['official_peak_mib']:.0f} | "
          f"{r['params']['official']:,} |")
    print(f"| da_seg | {r['da_seg_ms']:.1f} | {r['da_seg_peak_mib']:.0f} | {r['params']['da_seg']:,} |")
    print(f"da_seg / official step time: {r['ratio']:.3f}; memory: "
          f"{r['da_seg_peak_mib'] / r['official_peak_mib']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"method": args.method, "device": args.device, **r}, indent=1))
    return r


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    main()
