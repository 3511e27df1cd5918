"""Render the README's style-transfer panels: one row per source image,
``source label | source | CycleGAN-translated | FDA (beta ...) | a target image``.

    python docs/style_panels.py --source synth_streets_game --translated synth_streets_game_cyclegan \
        --target synth_streets_real --beta 0.04 --out docs/images/streets_style.png

Domains are looked up by name like everywhere else (``$DA_SEG_DATASETS``, ``./datasets``); the
translated domain is the one ``da-seg translate`` wrote. Rows pair each source image with its own
translation (same file name) and with a random target image of the same split; FDA uses that
target image's amplitude spectrum, as the ``fda`` component does online.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from da_seg.data.domains import load_domain
from da_seg.utils.visualize import colorize
from da_seg.methods.fda import fda_transfer
from da_seg.utils.visualize import to_uint8


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255


def to_hwc_uint8(image: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) float (FDA output is not clipped; to_uint8 clips to [0, 1]) -> (H, W, 3) uint8."""
    return to_uint8(image[0]).permute(1, 2, 0).numpy()


def panel_rows(source_name: str, target_name: str, translated_name: str | None, betas: list[float],
               split: str, count: int, seed: int) -> list[list[np.ndarray]]:
    source, target = load_domain(source_name), load_domain(target_name)
    translated = load_domain(translated_name) if translated_name else None
    rng = random.Random(seed)
    source_samples = rng.sample(source.samples(split, with_labels=True), count)
    target_samples = target.samples(split, with_labels=False)
    translated_by_name = {s.name: s for s in translated.samples(split, with_labels=False)} if translated else {}
    rows = []
    for sample in source_samples:
        image, label = source.read_pair(sample)
        target_image = target.read_image(rng.choice(target_samples).image)
        row = [colorize(label, source.colors).permute(1, 2, 0).numpy(), image]
        if translated is not None:
            if sample.name not in translated_by_name:
                raise SystemExit(f"{translated.name}: no translation of {sample.name!r} in split {split!r} "
                                 f"(run da-seg translate to the end)")
            row.append(translated.read_image(translated_by_name[sample.name].image))
        for beta in betas:
            row.append(to_hwc_uint8(fda_transfer(to_tensor(image), to_tensor(target_image), beta)))
        row.append(target_image)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--translated", help="the domain `da-seg translate` wrote (column left out if not given)")
    parser.add_argument("--beta", type=float, action="append", default=[], help="FDA band; repeat for several")
    parser.add_argument("--split", default="val")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling of the small frames")
    parser.add_argument("--gap", type=int, default=2, help="white pixels between tiles")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    rows = panel_rows(args.source, args.target, args.translated, args.beta, args.split, args.rows, args.seed)
    height, width = rows[0][0].shape[:2]
    cols, gap = len(rows[0]), args.gap
    canvas = np.full((len(rows) * (height + gap) - gap, cols * (width + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            if tile.shape[:2] != (height, width):
                tile = np.asarray(Image.fromarray(tile).resize((width, height), Image.BILINEAR))
            y, x = r * (height + gap), c * (width + gap)
            canvas[y:y + height, x:x + width] = tile
    picture = Image.fromarray(canvas)
    if args.scale > 1:
        picture = picture.resize((picture.width * args.scale, picture.height * args.scale), Image.NEAREST)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(args.out, optimize=True)
    header = ["label", "source"] + (["CycleGAN"] if args.translated else []) + [f"FDA b={b}" for b in args.beta] + ["target"]
    print(f"{args.out}: {len(rows)} rows x columns {' | '.join(header)}")


if __name__ == "__main__":
    main()
