"""Parameters, forward FLOPs, forward+backward time and peak memory of the segmentation models.

    python benchmarks/models.py --models deeplabv2_r101,segformer_b5 --sizes 512x1024 --device cuda --amp both
    python benchmarks/models.py --models segformer_b0,deeplabv2_r50 --sizes 256x512 --device cpu

Time: median of ``--iters`` train-mode forward+backward steps after ``--warmup`` steps
(``torch.cuda.synchronize`` around each on CUDA). FLOPs: one forward under
``torch.utils.flop_counter.FlopCounterMode`` (multiply-add = 2 FLOPs). Memory: on CUDA
``torch.cuda.max_memory_allocated`` over the timed steps (weights, gradients and activations);
on CPU each row runs in a fresh process and reports the peak RSS (``resource.getrusage``
``ru_maxrss``) minus the RSS measured after building the model and its input, i.e. activations,
gradients and allocator overhead of the FLOP-counting forward and the train steps.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import in_fresh_process, parse_size, sync  # noqa: E402
from da_seg.models import MODELS, build_model  # noqa: E402


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(name: str, size: tuple[int, int], device: str, amp: bool, batch: int, classes: int,
            warmup: int, iters: int, channels_last: bool, threads: int) -> dict:
    """One row: build ``name`` (random init), count, time and measure a train step at ``size``."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(name, classes).to(dev)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    images = torch.rand(batch, 3, *size, device=dev).contiguous(memory_format=memory_format)
    amp_dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
    params = sum(p.numel() for p in model.parameters())
    rss_before = _rss_bytes()

    model.eval()
    with torch.no_grad(), torch.autocast(dev.type, dtype=amp_dtype, enabled=amp):
        counter = FlopCounterMode(display=False)
        with counter:
            model(images)
    flops = counter.get_total_flops()

    model.train()
    scaler = torch.amp.GradScaler(dev.type, enabled=amp and dev.type == "cuda")

    def step() -> None:
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp):
            out = model(images)
            loss = out.logits.float().logsumexp(1).mean()
            if out.aux_logits is not None:
                loss = loss + 0.1 * out.aux_logits.float().logsumexp(1).mean()
        scaler.scale(loss).backward()
        model.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(iters):
        sync(dev)
        start = time.perf_counter()
        step()
        sync(dev)
        times.append(time.perf_counter() - start)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev)
    else:  # ru_maxrss is in KiB on Linux
        peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before)
    return {"model": name, "size": f"{size[0]}x{size[1]}", "amp": amp, "params": params, "gflops": flops / 1e9,
            "ms": statistics.median(times) * 1e3, "peak_mib": peak / 2**20, "out_stride": model.output_stride}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="segformer_b0,deeplabv2_r50,deeplabv3plus_r50",
                        help=f"comma-separated names from: {', '.join(MODELS)}")
    parser.add_argument("--sizes", default="256x512", help="comma-separated HxW input sizes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=("off", "on", "both"), default="off",
                        help="autocast: float16 on CUDA, bfloat16 on CPU")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="intra-op CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; valid: {', '.join(MODELS)}")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    amps = {"off": [False], "on": [True], "both": [False, True]}[args.amp]
    jobs = [(n, s, args.device, amp, args.batch, args.classes, args.warmup, args.iters, args.channels_last,
             args.threads) for n in names for s in sizes for amp in amps]

    memory_label = "peak alloc MiB" if args.device.startswith("cuda") else "peak RSS delta MiB"
    header = f"| model | input | AMP | params (M) | fwd GFLOPs | fwd+bwd ms (median) | {memory_label} | logits stride |"
    print(f"device: {args.device}, batch {args.batch}, {args.classes} classes, "
          f"{args.warmup} warm-up + {args.iters} timed steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    # CPU rows run in their own process, so that the peak RSS belongs to that row alone.
    cpu = not args.device.startswith("cuda")
    for r in (in_fresh_process(measure, *job) if cpu else measure(*job) for job in jobs):
        print(f"| {r['model']} | {r['size']} | {'on' if r['amp'] else 'off'} | {r['params'] / 1e6:.2f} | "
              f"{r['gflops']:.1f} | {r['ms']:.0f} | {r['peak_mib']:.0f} | {r['out_stride']} |", flush=True)


if __name__ == "__main__":
    main()
