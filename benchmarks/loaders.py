"""Can the loaders keep the GPU busy? Loader images/s against the segmenter's training step rate.

    python benchmarks/loaders.py --domain synth_streets_game --size 64x128 --model deeplab_small --batch 8
    python benchmarks/loaders.py --domain gta5 --size 720x1280 --crop 512x512 --model deeplabv2_r101 \
        --batch 2 --workers 8 --device cuda

Loader: decoding + resizing in ``--workers`` CPU processes, the batches moved to the device and
put through the GPU augmentation (scale jitter, crop, flip, colour jitter, blur), as in training.
Model: forward + backward of the segmenter on batches of the crop size (median of timed steps).
The loader keeps up when its images/s exceed the model's; the ratio is printed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from da_seg.config import AugmentConfig  # noqa: E402
from da_seg.data.augment import BatchAugment  # noqa: E402
from da_seg.data.datasets import SegmentationDataset  # noqa: E402
from da_seg.data.domains import load_domain  # noqa: E402
from da_seg.data.loaders import infinite_loader  # noqa: E402
from da_seg.models import build_model  # noqa: E402
from benchmarks.common import parse_size, sync  # noqa: E402


def size(text: str | None):
    return parse_size(text) if text else None


def loader_rate(args, device) -> float:
    domain = load_domain(args.domain)
    dataset = SegmentationDataset(domain, args.split, with_labels=True, size=size(args.size))
    augment = BatchAugment(AugmentConfig(crop=size(args.crop), scale=(0.5, 2.0), flip=True, brightness=0.25,
                                         contrast=0.25, saturation=0.25, hue=0.05, blur_p=0.5)).to(device)
    batches = infinite_loader(dataset, args.batch, seed=0, num_workers=args.workers,
                              pin_memory=device.type == "cuda")
    for _ in range(args.warmup):  # worker start-up is not throughput
        next(batches)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.iters):
        raw = next(batches)
        images, labels = augment(raw["image"].to(device, non_blocking=True), raw["label"].to(device, non_blocking=True))
    sync(device)
    return args.batch * args.iters / (time.perf_counter() - start), tuple(images.shape[-2:])


def model_rate(args, device, num_classes: int, crop: tuple[int, int]) -> float:
    model = build_model(args.model, num_classes).to(device).train()
    images = torch.rand(args.batch, 3, *crop, device=device)
    times = []
    for i in range(args.warmup + args.iters):
        sync(device)
        start = time.perf_counter()
        out = model(images)
        out.logits.float().mean().backward()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return args.batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", default="synth_streets_game")
    parser.add_argument("--split", default="train")
    parser.add_argument("--size", default=None, help="resize on load, HxW")
    parser.add_argument("--crop", default=None, help="GPU crop, HxW")
    parser.add_argument("--model", default="deeplab_small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    num_classes = load_domain(args.domain).num_classes
    loader, crop = loader_rate(args, device)
    model = model_rate(args, device, num_classes, crop)
    print(f"| domain | size | crop | workers | batch | loader img/s | model ({args.model}) img/s | loader / model |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.domain} | {args.size or 'file'} | {args.crop or '-'} | {args.workers} | {args.batch} | "
          f"{loader:.1f} | {model:.1f} | {loader / model:.2f} |")


if __name__ == "__main__":
    main()
