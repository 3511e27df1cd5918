"""Procedural synthetic domain-shift benchmarks, written to disk like real datasets.

Two benchmarks, each a set of on-disk domains read through the ordinary descriptors in
``datasets/synth_*.toml``:

``streets`` (64x128 street scenes, Cityscapes train ids on disk)
    ``game`` (source), ``real`` (target), ``dusk`` and ``fog`` (unseen, val only). Every style
    draws the same label structure: sky, a skyline with window grids, road and sidewalk
    trapezoids to a vanishing point, lane marks, and perspective-scaled poles, people and cars
    drawn far to near. The shift between ``game`` and ``real`` is what makes real shifts hard
    for a network: each class's colour is moved part of the way (``palette_move``) towards
    another class's colour, textures change per class, details (windows, lane marks, car
    glass) are drawn differently, and each image gets its own lighting gradient, exposure,
    white balance, blur and sensor noise; the layout shifts too (horizon height, car density).
    Per-image normalization cannot undo it, because the colour relationships between classes
    change, not only the global colour statistics.

``streets_hr`` (256x512 street scenes, the same classes, styles and shift)
    The ``game`` and ``real`` streets drawn at four times the resolution (train and val):
    every length of the scene is scaled by ``width / 128``, so the scenes look like ``streets``
    seen closer, while the camera's blur and the finest texture grain stay in full-resolution
    pixels, so the detail is really there at full resolution. Poles are 3 to 9 px wide (1.5 to
    4.5 px at the half resolution a DAFormer-style baseline trains at, below one cell of its
    stride-8 logits); distant people are a few pixels tall. It is the pair for multi-resolution
    methods (HRDA): at 64x128 the logits are 8x16 and there is no detail to recover.

``aerial`` (64x64 top-down tiles, LoveDA's raw mask values on disk)
    ``urban`` (road grids and building blocks) and ``rural`` (fields, forest, water, villages):
    different class frequencies, a moved palette (another season), different textures,
    shadows and illumination.

Every image's random generator derives from ``(seed, benchmark, domain, split, index)``,
so files are byte-identical for a seed whatever the number of worker processes, and any
single file can be re-rendered alone (:func:`render_sample`). ``VERSION.json`` at the output
root records :data:`SYNTHETIC_VERSION` and the parameters; :func:`check_synthetic` is the
loader-side check that the files on disk were made by this generator version.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import struct
import time
import zlib
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

# Bump only together with re-measuring every method on the benchmark (see docs/synthetic.md).
SYNTHETIC_VERSION = 1
STAMP_FILE = "VERSION.json"
_GENERATOR = "da_seg.data.synthetic"

BENCHMARKS = ("streets", "aerial", "streets_hr")
DEFAULT_BENCHMARKS = ("streets", "aerial")   # what `da-seg synth` makes unless asked for more
HR_STREET_STYLES = ("game", "real")
STREET_STYLES = ("game", "real", "dusk", "fog")
STREET_VAL_ONLY = ("dusk", "fog")
AERIAL_DOMAINS = ("urban", "rural")
SPLITS = ("train", "val")

# The difficulty knobs: how far each class's colour moves towards its partner class's colour
# in the target world. Chosen by calibration (docs/synthetic.md).
STREETS_PALETTE_MOVE = 0.45
AERIAL_PALETTE_MOVE = 0.45

DEFAULTS = {
    "streets": {"size": (64, 128), "n_train": 2000, "n_val": 300, "palette_move": STREETS_PALETTE_MOVE},
    "aerial": {"size": (64, 64), "n_train": 1500, "n_val": 300, "palette_move": AERIAL_PALETTE_MOVE},
    # fewer images than streets: 16x the pixels each, and generation must stay within minutes on 2 cores
    "streets_hr": {"size": (256, 512), "n_train": 1000, "n_val": 200, "palette_move": STREETS_PALETTE_MOVE},
}
# The width at which the street scene's lengths are given; other widths scale them (streets_hr).
STREET_BASE_WIDTH = 128

# Cityscapes train ids, as written in the street label PNGs.
ROAD, SIDEWALK, BUILDING, POLE, VEGETATION, SKY, PERSON, CAR = 0, 1, 2, 5, 8, 10, 11, 13
STREET_CLASS_IDS = (ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, POLE, PERSON, CAR)  # synth_streets8 order

# LoveDA raw mask values, as written in the aerial label PNGs (0 = no-data, ignored).
NO_DATA, BACKGROUND, A_BUILDING, A_ROAD, WATER, BARREN, FOREST, AGRICULTURE = range(8)
AERIAL_CLASS_IDS = (BACKGROUND, A_BUILDING, A_ROAD, WATER, BARREN, FOREST, AGRICULTURE)  # loveda7 order


class SyntheticDataError(RuntimeError):
    """The synthetic files on disk are missing or were made by another generator version."""


# --------------------------------------------------------------------------------------------
# Shared drawing machinery
# --------------------------------------------------------------------------------------------

def sample_rng(seed: int, benchmark: str, domain: str, split: str, index: int) -> np.random.Generator:
    """The random generator of one image; a pure function of its arguments."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    words = [seed, *(zlib.crc32(s.encode()) for s in (benchmark, domain, split)), index]
    return np.random.default_rng(np.random.SeedSequence(words))


def _clip(x, lo: float, hi: float) -> np.ndarray:
    """np.clip without its dispatch overhead, for the many 3-vectors of colours."""
    return np.minimum(np.maximum(x, lo), hi)


def _palette(base: dict[int, tuple], partner: dict[int, int], move: float) -> dict[int, np.ndarray]:
    """Each class's colour moved ``move`` of the way towards its partner class's colour."""
    return {c: (1 - move) * np.asarray(base[c], np.float32) + move * np.asarray(base[partner[c]], np.float32)
            for c in base}


@lru_cache(maxsize=16)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, (h, 1) rows and (1, w) columns."""
    return (np.arange(h, dtype=np.float32)[:, None] + 0.5, np.arange(w, dtype=np.float32)[None, :] + 0.5)


def _value_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """(h, w) smooth noise with features ``cell`` pixels wide, about unit variance."""
    if cell <= 1:
        return rng.standard_normal((h, w), dtype=np.float32)
    grid = rng.standard_normal((h // cell + 2, w // cell + 2), dtype=np.float32)
    big = Image.fromarray(grid, "F").resize(((w // cell + 2) * cell, (h // cell + 2) * cell), Image.BILINEAR)
    # interpolating between unit-variance samples shrinks the variance; 1.5 brings the std back near 1
    return np.asarray(big, np.float32)[cell // 2:cell // 2 + h, cell // 2:cell // 2 + w] * 1.5


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, C) float image, edge padding."""
    if sigma <= 0.05:
        return img
    radius = max(1, int(math.ceil(2.5 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    h, w = img.shape[:2]
    rows = np.concatenate([img[:1].repeat(radius, 0), img, img[-1:].repeat(radius, 0)], 0)
    out = rows[radius:radius + h] * taps[radius]
    for i, k in enumerate(taps):
        if i != radius:
            out += k * rows[i:i + h]
    cols = np.concatenate([out[:, :1].repeat(radius, 1), out, out[:, -1:].repeat(radius, 1)], 1)
    out = cols[:, radius:radius + w] * taps[radius]
    for i, k in enumerate(taps):
        if i != radius:
            out += k * cols[:, i:i + w]
    return out


@dataclass(frozen=True)
class _Camera:
    """Per-image photometric conditions of a style: the parts of the shift no label sees."""

    light: float                          # amplitude of a linear lighting gradient, random direction
    exposure: tuple[float, float]         # per-image exposure range (multiplicative)
    white_balance: float                  # std of per-channel log gains
    blur: float                           # Gaussian sigma in pixels
    noise: float                          # sensor noise std (on [0, 1] intensities)
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    gain: float = 1.0                     # global brightness (dusk)


def _develop(rgb: np.ndarray, rng: np.random.Generator, cam: _Camera,
             emissive: np.ndarray | None = None) -> np.ndarray:
    """Scene radiance (H, W, 3) float -> uint8 photo: lighting, exposure, white balance, blur, noise."""
    h, w = rgb.shape[:2]
    ys, xs = _grid(h, w)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (xs / w - 0.5) * np.float32(math.cos(angle)) + (ys / h - 0.5) * np.float32(math.sin(angle))
    light = 1 + np.float32(2 * cam.light) * ramp                  # (h, w)
    exposure = math.exp(rng.uniform(math.log(cam.exposure[0]), math.log(cam.exposure[1])))
    balance = np.exp(rng.normal(0, cam.white_balance, 3)).astype(np.float32) * np.asarray(cam.tint, np.float32)
    img = rgb * (light * np.float32(exposure * cam.gain))[..., None]
    img *= balance
    if emissive is not None:
        img += emissive
    img = _blur(np.minimum(np.maximum(img, 0, out=img), 1.5, out=img), cam.blur)
    img += cam.noise * rng.standard_normal(img.shape, dtype=np.float32)
    img = np.minimum(np.maximum(img, 0, out=img), 1, out=img)
    return (img * 255 + 0.5).astype(np.uint8)


class _Canvas:
    """A label map, a colour image and a depth map painted together, shape by shape."""

    def __init__(self, h: int, w: int, label: int):
        self.h, self.w = h, w
        self.label = np.full((h, w), label, np.uint8)
        self.rgb = np.zeros((h, w, 3), np.float32)
        self.depth = np.ones((h, w), np.float32)

    def box(self, y0: float, y1: float, x0: float, x1: float) -> tuple[slice, slice] | None:
        ya, yb = max(0, int(math.floor(y0))), min(self.h, int(math.ceil(y1)))
        xa, xb = max(0, int(math.floor(x0))), min(self.w, int(math.ceil(x1)))
        if ya >= yb or xa >= xb:
            return None
        return slice(ya, yb), slice(xa, xb)

    def paint(self, mask: np.ndarray, label: int | None, colour, depth: float | None = None, box=None):
        """Set label/colour/depth where ``mask`` (full image, or the size of ``box``) is true."""
        ys, xs = box if box is not None else (slice(None), slice(None))
        if label is not None:
            self.label[ys, xs][mask] = label
        self.rgb[ys, xs][mask] = colour
        if depth is not None:
            self.depth[ys, xs][mask] = depth

    def rect(self, y0, y1, x0, x1, label, colour, depth=None):
        box = self.box(y0, y1, x0, x1)
        if box is not None:
            if label is not None:
                self.label[box] = label
            self.rgb[box] = colour
            if depth is not None:
                self.depth[box] = depth
        return box

    def ellipse(self, cy, cx, ry, rx, label, colour, depth=None):
        box = self.box(cy - ry, cy + ry, cx - rx, cx + rx)
        if box is None:
            return
        ys = np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None] + 0.5
        xs = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :] + 0.5
        mask = ((ys - cy) / max(ry, 0.5)) ** 2 + ((xs - cx) / max(rx, 0.5)) ** 2 <= 1
        self.paint(mask, label, colour, depth, box)


def _texture(rng: np.random.Generator, label: np.ndarray, amplitudes: np.ndarray, cells: tuple[int, ...],
             extra: list[np.ndarray]) -> np.ndarray:
    """Class-dependent luminance texture: sum_k amplitudes[label, k] * field_k -> (H, W).

    ``cells`` name noise fields drawn here (feature sizes in px); ``extra`` are given fields
    (stripes), broadcastable to (H, W). Fields no class uses are not drawn.
    """
    h, w = label.shape
    total = np.zeros((h, w), np.float32)
    for k, cell in enumerate([*cells, *[None] * len(extra)]):
        if not amplitudes[:, k].any():
            continue
        field = _value_noise(rng, h, w, cell) if cell is not None else extra[k - len(cells)]
        total += amplitudes[label, k] * field
    return total


def _amplitude_table(texture: dict[int, tuple[float, ...]]) -> np.ndarray:
    k = len(next(iter(texture.values())))
    table = np.zeros((256, k), np.float32)
    for cls, amps in texture.items():
        table[cls] = amps
    return table


# --------------------------------------------------------------------------------------------
# Streets
# --------------------------------------------------------------------------------------------

_STREET_BASE = {
    ROAD: (0.42, 0.42, 0.45),
    SIDEWALK: (0.72, 0.66, 0.58),
    BUILDING: (0.62, 0.42, 0.33),
    VEGETATION: (0.22, 0.50, 0.17),
    SKY: (0.52, 0.72, 0.95),
    POLE: (0.30, 0.30, 0.34),
    PERSON: (0.75, 0.32, 0.36),
    CAR: (0.22, 0.32, 0.68),
}
# Where each class's colour moves in the target world: every class moves, along cycles of odd
# length, so that no two classes can meet (a swap would merge a pair at a move of 0.5).
_STREET_PARTNER = {ROAD: BUILDING, BUILDING: VEGETATION, VEGETATION: SIDEWALK, SIDEWALK: SKY, SKY: ROAD,
                   POLE: PERSON, PERSON: CAR, CAR: POLE}
# Per-instance colour jitter (std per channel): large for things, small for road and sky.
_STREET_JITTER = {ROAD: 0.02, SIDEWALK: 0.03, BUILDING: 0.07, VEGETATION: 0.05, SKY: 0.025,
                  POLE: 0.04, PERSON: 0.14, CAR: 0.16}
# Texture fields: noise with cells 1, 3 and 8 px, then vertical and horizontal stripes.
_STREET_CELLS = (1, 3, 8)


@dataclass(frozen=True)
class _StreetStyle:
    moved: bool                           # target-world palette (moved towards partners)
    horizon: tuple[float, float]          # mean and std, fraction of the height
    cars: float                           # expected numbers of objects per image
    people: float
    poles: float
    trees: float
    park_side: float                      # chance a side of the street is greenery, not facades
    windows: tuple[int, int, int, int, float]   # period x, period y, size x, size y, brightness change
    lane: tuple[float, float, tuple]      # half width at the bottom (px), dash duty, colour
    texture: dict[int, tuple[float, float, float, float, float]]
    sky_gradient: float                   # sky brightening (+) or darkening (-) towards the horizon
    camera: _Camera
    car_glass: tuple[float, float, float] = (0.12, 0.13, 0.16)
    car_lights: tuple[float, float, float] = (0.75, 0.12, 0.10)
    lit_windows: float = 0.0              # chance a window is lit (dusk)
    fog: float = 0.0                      # fog density; thickens with distance, so towards the horizon
    fog_colour: tuple[float, float, float] = (0.78, 0.79, 0.80)


_GAME_TEXTURE = {
    ROAD: (0.01, 0.02, 0.0, 0.0, 0.0),
    SIDEWALK: (0.02, 0.0, 0.0, 0.0, 0.07),
    BUILDING: (0.01, 0.03, 0.0, 0.0, 0.0),
    VEGETATION: (0.05, 0.14, 0.0, 0.0, 0.0),
    SKY: (0.0, 0.0, 0.0, 0.0, 0.0),
    POLE: (0.0, 0.0, 0.0, 0.0, 0.0),
    PERSON: (0.02, 0.0, 0.0, 0.0, 0.0),
    CAR: (0.02, 0.0, 0.0, 0.0, 0.0),
}
_REAL_TEXTURE = {
    ROAD: (0.08, 0.04, 0.07, 0.0, 0.0),
    SIDEWALK: (0.05, 0.05, 0.02, 0.0, 0.0),
    BUILDING: (0.03, 0.02, 0.06, 0.07, 0.0),
    VEGETATION: (0.16, 0.06, 0.05, 0.0, 0.0),
    SKY: (0.0, 0.0, 0.09, 0.0, 0.0),
    POLE: (0.03, 0.0, 0.0, 0.0, 0.0),
    PERSON: (0.05, 0.0, 0.0, 0.0, 0.0),
    CAR: (0.04, 0.0, 0.02, 0.0, 0.0),
}
_REAL = _StreetStyle(
    moved=True, horizon=(0.40, 0.05), cars=3.5, people=1.2, poles=2.5, trees=2.5, park_side=0.3,
    windows=(3, 5, 1, 3, -0.3), lane=(0.8, 0.3, (0.80, 0.77, 0.58)), texture=_REAL_TEXTURE,
    sky_gradient=-0.12,
    camera=_Camera(light=0.25, exposure=(0.7, 1.3), white_balance=0.07, blur=0.8, noise=0.03),
)
STREET_LOOKS: dict[str, _StreetStyle] = {
    "game": _StreetStyle(
        moved=False, horizon=(0.45, 0.04), cars=2.0, people=1.5, poles=2.5, trees=2.0, park_side=0.3,
        windows=(4, 4, 2, 2, 0.35), lane=(1.3, 0.5, (0.95, 0.95, 0.92)), texture=_GAME_TEXTURE,
        sky_gradient=0.15, car_glass=(0.55, 0.70, 0.85), car_lights=(0.95, 0.85, 0.30),
        camera=_Camera(light=0.08, exposure=(0.92, 1.08), white_balance=0.02, blur=0.3, noise=0.008),
    ),
    "real": _REAL,
    "dusk": replace(
        _REAL, lit_windows=0.45, sky_gradient=0.3,
        camera=replace(_REAL.camera, gain=0.42, tint=(1.3, 0.85, 0.55), exposure=(0.8, 1.2), noise=0.045),
    ),
    "fog": replace(
        _REAL, fog=2.2,
        camera=replace(_REAL.camera, blur=1.0, exposure=(0.9, 1.15), tint=(0.97, 1.0, 1.04)),
    ),
}


@lru_cache(maxsize=8)
def _street_tables(style: str, move: float):
    look = STREET_LOOKS[style]
    palette = _palette(_STREET_BASE, _STREET_PARTNER, move if look.moved else 0.0)
    return palette, _amplitude_table(look.texture)


def render_street(style: str, rng: np.random.Generator, size: tuple[int, int] = (64, 128),
                  palette_move: float = STREETS_PALETTE_MOVE, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One street scene -> (image (H, W, 3) uint8 RGB, label (H, W) uint8 Cityscapes train ids).

    ``scale`` multiplies every length given in pixels (building widths, windows, poles, lane
    marks, texture features, thresholds); ``streets_hr`` draws with ``scale = W / 128``. The
    camera blur, sensor noise and the 1-px grain are not scaled. ``scale = 1`` draws exactly
    the ``streets`` files (the same random draws in the same order).
    """
    if style not in STREET_LOOKS:
        raise ValueError(f"unknown street style {style!r}; valid styles: {', '.join(STREET_LOOKS)}")
    look = STREET_LOOKS[style]
    palette, amplitudes = _street_tables(style, float(palette_move))
    h, w = size
    k = float(scale)
    ys, xs = _grid(h, w)

    def colour(cls: int, spread: float = 1.0) -> np.ndarray:
        return _clip(palette[cls] + rng.normal(0, _STREET_JITTER[cls] * spread, 3), 0.02, 1.0).astype(np.float32)

    horizon = float(np.clip(rng.normal(*look.horizon), 0.28, 0.56)) * h
    vanish_x = w / 2 + rng.normal(0, 0.12 * w)
    bottom_x = w / 2 + rng.normal(0, 0.10 * w)
    road_half = rng.uniform(0.30, 0.45) * w                       # road half width at the bottom row
    walk_width = rng.uniform(0.35, 0.60) * road_half

    canvas = _Canvas(h, w, SKY)
    emissive = np.zeros((h, w, 3), np.float32)
    # sky: one colour per image, brighter (or darker) towards the horizon
    sky = colour(SKY)
    rows = np.clip(ys / max(horizon, 1.0), 0, 1)                  # (h, 1)
    canvas.rgb[:] = sky * (1 + look.sky_gradient * (rows[..., None] - 0.5))
    # distance for fog: 1 at and above the horizon, falling towards the camera
    depth_t = np.clip((ys - horizon) / (h - horizon), 1e-3, 1.0)  # perspective scale of each row
    canvas.depth[:] = np.where(ys <= horizon, 1.0, np.clip(0.12 / depth_t, 0, 1))

    # skyline: buildings from the horizon down to the bottom (the street covers their feet)
    px, py, sx, sy, window_change = look.windows
    px, py, sx, sy = px * k, py * k, sx * k, sy * k
    x = -rng.uniform(0, 10) * k
    while x < w:
        width = rng.uniform(10, 30) * k
        if rng.random() < 0.2:                                    # a gap shows the sky
            x += width * 0.6
            continue
        top = horizon - rng.uniform(0.15, 0.8) * horizon
        body = colour(BUILDING)
        box = canvas.rect(top, h, x, x + width, BUILDING, body)
        if box is not None:
            canvas.depth[box][ys[box[0]][:, 0] <= horizon] = 0.85
            # window grid, drawn differently per style; the label stays building
            wy, wx = ys[box[0]] - top, xs[:, box[1]] - x
            grid = ((wx % px) < sx) & ((wy % py) < sy) & (wx > k) & (wx < width - k) & (wy > k)
            grid &= ys[box[0]] < horizon + 0.15 * (h - horizon)
            canvas.rgb[box][grid] = _clip(body * (1 + window_change), 0, 1)
            if look.lit_windows > 0:
                lit = grid & (_value_noise(rng, *grid.shape, round(2 * k)) > 1.2 - 2 * look.lit_windows)
                emissive[box][lit] = (0.55, 0.42, 0.16)
        x += width

    # trees on the skyline
    for _ in range(rng.poisson(look.trees)):
        ry, rx = rng.uniform(3, 11) * k, rng.uniform(3, 9) * k
        canvas.ellipse(horizon - rng.uniform(0, 0.2) * h, rng.uniform(0, w), ry, rx, VEGETATION,
                       colour(VEGETATION), 0.85)

    # the street: road and sidewalk trapezoids towards the vanishing point
    below = ys > horizon
    centre = vanish_x + depth_t * (bottom_x - vanish_x)           # (h, 1)
    half = depth_t * road_half
    walk = depth_t * walk_width
    offset = np.abs(xs - centre)                                  # (h, w)
    for side in (-1, 1):                                          # greenery instead of facades
        if rng.random() < look.park_side:
            mask = below & (offset >= half + walk) & (np.sign(xs - centre) == side)
            canvas.paint(mask, VEGETATION, colour(VEGETATION))
    road = below & (offset < half)
    canvas.paint(road, ROAD, colour(ROAD))
    canvas.paint(below & (offset >= half) & (offset < half + walk), SIDEWALK, colour(SIDEWALK))

    # lane marks: dashes on the centre line, spaced in depth; label stays road
    mark_half, duty, mark_colour = look.lane
    phase = rng.uniform(0, 1)
    dashes = ((1.6 / depth_t + phase) % 1.0) < duty
    marks = road & (offset < np.maximum(depth_t * (mark_half * k), 0.35 * k)) & dashes & (depth_t > 0.08)
    canvas.rgb[marks] = mark_colour

    # things, sorted far to near so the nearer ones occlude
    things = [("pole", t) for t in rng.uniform(0.08, 1.0, rng.poisson(look.poles))]
    things += [("person", t) for t in rng.uniform(0.08, 1.0, rng.poisson(look.people))]
    things += [("car", t) for t in rng.uniform(0.06, 1.0, rng.poisson(look.cars))]
    things.sort(key=lambda item: item[1])
    pole_colour = colour(POLE)
    for kind, t in things:
        base = horizon + t * (h - horizon)
        mid = vanish_x + t * (bottom_x - vanish_x)
        side = 1 if rng.random() < 0.5 else -1
        dist = min(0.12 / t, 1.0)
        if kind == "pole":
            x = mid + side * t * (road_half + walk_width * rng.uniform(0.3, 0.8))
            height = t * rng.uniform(1.0, 1.3) * h
            width = max(0.8, 2.2 * t) * k
            colour_p = _clip(pole_colour + rng.normal(0, 0.02, 3), 0, 1)
            canvas.rect(base - height, base, x - width / 2, x + width / 2, POLE, colour_p, dist)
            arm = t * rng.uniform(6, 12) * k
            canvas.rect(base - height, base - height + max(0.8, 1.3 * t) * k, min(x, x - side * arm),
                        max(x, x - side * arm), POLE, colour_p, dist)
        elif kind == "person":
            x = mid + side * t * (road_half + walk_width * rng.uniform(0.2, 0.8))
            height = t * rng.uniform(0.38, 0.48) * h
            if height < 2.5 * k:
                continue
            torso, legs = colour(PERSON), colour(PERSON, 0.7) * 0.6
            skin = _clip(np.asarray((0.85, 0.65, 0.52)) + rng.normal(0, 0.08, 3), 0, 1)
            canvas.rect(base - 0.45 * height, base, x - 0.13 * height, x + 0.13 * height, PERSON, legs, dist)
            canvas.ellipse(base - 0.6 * height, x, 0.22 * height, 0.17 * height, PERSON, torso, dist)
            canvas.ellipse(base - 0.89 * height, x, 0.11 * height, 0.09 * height, PERSON, skin, dist)
        else:
            x = mid + side * t * road_half * rng.uniform(0.15, 0.65)
            width = t * rng.uniform(0.28, 0.38) * w
            height = width * rng.uniform(0.5, 0.65)
            if height < 2 * k:
                continue
            body = colour(CAR)
            left, right = x - width / 2, x + width / 2
            canvas.rect(base - 0.6 * height, base - 0.1 * height, left, right, CAR, body, dist)
            inset = width * rng.uniform(0.14, 0.22)
            canvas.rect(base - height, base - 0.6 * height, left + inset, right - inset, CAR, body, dist)
            # glass and wheels, drawn differently per style; label stays car
            canvas.rect(base - 0.92 * height, base - 0.62 * height, left + inset + 0.6 * k, right - inset - 0.6 * k,
                        CAR, look.car_glass, dist)
            wheel = 0.14 * width
            for wx in (left + 0.22 * width, right - 0.22 * width):
                canvas.ellipse(base - 0.12 * height, wx, 0.14 * height, wheel, CAR, (0.05, 0.05, 0.05), dist)
            for lx in (left + 0.5 * k, right - 1.5 * k):
                canvas.rect(base - 0.5 * height, base - 0.38 * height, lx, lx + max(1.0 * k, 0.08 * width),
                            CAR, look.car_lights, dist)
                if look.lit_windows > 0:                          # tail lights glow at dusk
                    glow_y, glow_x = min(max(int(base - 0.45 * height), 0), h - 1), min(max(int(lx), 0), w - 1)
                    emissive[glow_y, glow_x] = (0.6, 0.1, 0.05)

    # class-dependent texture, then the camera
    stripes = [np.sin(xs * np.float32(2 * math.pi / (rng.uniform(3, 5) * k))),
               np.sin(ys * np.float32(2 * math.pi / (rng.uniform(2.5, 4) * k)))]
    cells = tuple(c if c == 1 else round(c * k) for c in _STREET_CELLS)   # the 1-px grain stays 1 px
    rgb = canvas.rgb * (1 + _texture(rng, canvas.label, amplitudes, cells, stripes))[..., None]
    if look.fog > 0:
        fog = 1 - np.exp(-look.fog * canvas.depth)                # thickest towards the horizon
        rgb = rgb * (1 - fog[..., None]) + fog[..., None] * np.asarray(look.fog_colour, np.float32)
    image = _develop(rgb, rng, look.camera, emissive if look.lit_windows > 0 else None)
    return image, canvas.label


# --------------------------------------------------------------------------------------------
# Aerial
# --------------------------------------------------------------------------------------------

_AERIAL_BASE = {
    BACKGROUND: (0.52, 0.50, 0.45),
    A_BUILDING: (0.72, 0.70, 0.68),
    A_ROAD: (0.40, 0.40, 0.43),
    WATER: (0.14, 0.27, 0.34),
    BARREN: (0.72, 0.63, 0.48),
    FOREST: (0.16, 0.33, 0.16),
    AGRICULTURE: (0.46, 0.62, 0.30),
}
# One 7-cycle (odd, see _STREET_PARTNER): another season and another region's materials.
_AERIAL_PARTNER = {BACKGROUND: AGRICULTURE, AGRICULTURE: BARREN, BARREN: A_BUILDING, A_BUILDING: A_ROAD,
                   A_ROAD: WATER, WATER: FOREST, FOREST: BACKGROUND}
_AERIAL_JITTER = {BACKGROUND: 0.05, A_BUILDING: 0.12, A_ROAD: 0.025, WATER: 0.03, BARREN: 0.05,
                  FOREST: 0.03, AGRICULTURE: 0.08}
_AERIAL_CELLS = (1, 2, 6)


@dataclass(frozen=True)
class _AerialStyle:
    moved: bool
    texture: dict[int, tuple[float, float, float, float]]   # noise 1, 2, 6 px, field stripes
    roof_ridge: float                     # brightness difference between the two roof halves
    shadow: tuple[float, float]           # shadow length range in px
    shadow_strength: float
    camera: _Camera


AERIAL_LOOKS: dict[str, _AerialStyle] = {
    "urban": _AerialStyle(
        moved=False,
        texture={BACKGROUND: (0.05, 0.05, 0.03, 0.0), A_BUILDING: (0.02, 0.0, 0.0, 0.0),
                 A_ROAD: (0.02, 0.02, 0.0, 0.0), WATER: (0.01, 0.02, 0.0, 0.0),
                 BARREN: (0.08, 0.03, 0.0, 0.0), FOREST: (0.08, 0.12, 0.0, 0.0),
                 AGRICULTURE: (0.02, 0.03, 0.0, 0.05)},
        roof_ridge=0.12, shadow=(1.5, 3.0), shadow_strength=0.5,
        camera=_Camera(light=0.1, exposure=(0.85, 1.15), white_balance=0.04, blur=0.5, noise=0.015),
    ),
    "rural": _AerialStyle(
        moved=True,
        texture={BACKGROUND: (0.06, 0.08, 0.06, 0.0), A_BUILDING: (0.04, 0.0, 0.0, 0.0),
                 A_ROAD: (0.05, 0.03, 0.0, 0.0), WATER: (0.02, 0.05, 0.04, 0.0),
                 BARREN: (0.10, 0.05, 0.0, 0.0), FOREST: (0.15, 0.10, 0.05, 0.0),
                 AGRICULTURE: (0.03, 0.05, 0.04, 0.15)},
        roof_ridge=0.05, shadow=(0.5, 1.2), shadow_strength=0.7,
        camera=_Camera(light=0.25, exposure=(0.7, 1.3), white_balance=0.08, blur=0.9, noise=0.03,
                       tint=(1.05, 1.0, 0.9)),
    ),
}

# block/field classes and their chances per domain (class-frequency shift)
_URBAN_BLOCKS = ((A_BUILDING, 0.64), (BACKGROUND, 0.12), (FOREST, 0.10), (BARREN, 0.06),
                 (WATER, 0.03), (AGRICULTURE, 0.05))
_RURAL_FIELDS = ((AGRICULTURE, 0.55), (FOREST, 0.14), (BACKGROUND, 0.16), (BARREN, 0.10),
                 (WATER, 0.05))


@lru_cache(maxsize=8)
def _aerial_tables(domain: str, move: float):
    look = AERIAL_LOOKS[domain]
    palette = np.zeros((256, 3), np.float32)
    for cls, rgb in _palette(_AERIAL_BASE, _AERIAL_PARTNER, move if look.moved else 0.0).items():
        palette[cls] = rgb
    return palette, _amplitude_table(look.texture)


def _choose(rng: np.random.Generator, choices, n: int) -> np.ndarray:
    classes = np.array([c for c, _ in choices], np.uint8)
    p = np.array([q for _, q in choices], np.float64)
    return classes[rng.choice(len(classes), size=n, p=p / p.sum())]


_AERIAL_JITTER_TABLE = np.zeros(256, np.float32)
_AERIAL_JITTER_TABLE[list(_AERIAL_JITTER)] = list(_AERIAL_JITTER.values())


def _instance_colours(rng, palette: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(n,) class ids -> (n, 3) colours with per-instance jitter; ``palette`` is (256, 3)."""
    base = palette[classes]
    sd = _AERIAL_JITTER_TABLE[classes][:, None]
    return _clip(base + rng.normal(0, 1, base.shape) * sd, 0.02, 1).astype(np.float32)


def _urban_layout(rng, canvas: _Canvas, palette, ridge: np.ndarray, stripes: np.ndarray):
    """Rotated road grid; blocks of building lots, yards, parks, building sites, ponds."""
    h, w = canvas.h, canvas.w
    ys, xs = _grid(h, w)
    angle = rng.uniform(0, math.pi / 2)
    span = (h + w) * 1.5
    u = xs * math.cos(angle) + ys * math.sin(angle) + rng.uniform(0, 40) + span
    v = -xs * math.sin(angle) + ys * math.cos(angle) + rng.uniform(0, 40) + span
    su, sv = rng.uniform(18, 30, 2)
    road_w = rng.uniform(2.5, 4.0)
    iu, iv = (u // su).astype(np.int64), (v // sv).astype(np.int64)
    lu, lv = u - iu * su, v - iv * sv
    iu -= iu.min()
    iv -= iv.min()
    nu, nv = int(iu.max()) + 1, int(iv.max()) + 1
    on_u, on_v = rng.random(nu) < 0.85, rng.random(nv) < 0.85
    block = _choose(rng, _URBAN_BLOCKS, nu * nv).reshape(nu, nv)
    block_colour = _instance_colours(rng, palette, block.ravel()).reshape(nu, nv, 3)
    kind = block[iu, iv]                                              # (h, w)
    canvas.label[:] = kind
    canvas.rgb[:] = block_colour[iu, iv]
    # building lots: k x k per block, each with its own margins and roof colour
    k = 3
    inner_u, inner_v = (su - road_w) / k, (sv - road_w) / k
    au = np.clip(((lu - road_w) // inner_u).astype(np.int64), 0, k - 1)
    av = np.clip(((lv - road_w) // inner_v).astype(np.int64), 0, k - 1)
    pu, pv = lu - road_w - au * inner_u, lv - road_w - av * inner_v     # position inside the lot
    margins = rng.uniform(0.3, 1.8, (nu, nv, k, k, 4)).astype(np.float32)
    present = rng.random((nu, nv, k, k)) < 0.9
    m = margins[iu, iv, au, av]                                       # (h, w, 4)
    lot_u, lot_v = inner_u - m[..., 0] - m[..., 1], inner_v - m[..., 2] - m[..., 3]
    inside = (pu > m[..., 0]) & (pu < inner_u - m[..., 1]) & (pv > m[..., 2]) & (pv < inner_v - m[..., 3])
    building = inside & present[iu, iv, au, av] & (kind == A_BUILDING) & (lu >= road_w) & (lv >= road_w)
    yard = (kind == A_BUILDING) & ~building
    canvas.label[yard] = BACKGROUND
    canvas.rgb[yard] = _instance_colours(rng, palette, np.array([BACKGROUND], np.uint8))[0]
    roofs = _instance_colours(rng, palette, np.full(nu * nv * k * k, A_BUILDING, np.uint8)).reshape(nu, nv, k, k, 3)
    canvas.label[building] = A_BUILDING
    canvas.rgb[building] = roofs[iu, iv, au, av][building]
    # roof ridge along the lot's longer side: one half lit, one in shade
    along_u = lot_u > lot_v
    half = np.where(along_u, (pv - m[..., 2]) / np.maximum(lot_v, 1e-3), (pu - m[..., 0]) / np.maximum(lot_u, 1e-3))
    ridge[building] = np.where(half[building] > 0.5, 1.0, -1.0)
    # fields inside agriculture blocks get stripes along the block
    stripes[:] = np.sin(u * (2 * math.pi / rng.uniform(2.5, 4.0)))
    road = ((lu < road_w) & on_u[iu]) | ((lv < road_w) & on_v[iv])
    canvas.label[road] = A_ROAD
    canvas.rgb[road] = _instance_colours(rng, palette, np.array([A_ROAD], np.uint8))[0]
    # street trees and a rare river
    for _ in range(rng.poisson(2.0)):
        canvas.ellipse(rng.uniform(0, h), rng.uniform(0, w), *rng.uniform(1.5, 3.5, 2), FOREST,
                       _instance_colours(rng, palette, np.array([FOREST], np.uint8))[0])
    if rng.random() < 0.12:
        _river(rng, canvas, palette)
    return building


def _river(rng, canvas: _Canvas, palette):
    h, w = canvas.h, canvas.w
    ys, xs = _grid(h, w)
    angle = rng.uniform(0, math.pi)
    across = xs * math.cos(angle) + ys * math.sin(angle) - (w / 2 * math.cos(angle) + h / 2 * math.sin(angle))
    along = -xs * math.sin(angle) + ys * math.cos(angle)
    centre = rng.uniform(-0.3, 0.3) * w + rng.uniform(2, 8) * np.sin(along / rng.uniform(6, 14) + rng.uniform(0, 6))
    canvas.paint(np.abs(across - centre) < rng.uniform(1.5, 5.0), WATER,
                 _instance_colours(rng, palette, np.array([WATER], np.uint8))[0])


def _rural_layout(rng, canvas: _Canvas, palette, ridge: np.ndarray, stripes: np.ndarray):
    """Irregular fields (warped Voronoi cells), forest patches, rivers, ponds, tracks, villages."""
    h, w = canvas.h, canvas.w
    ys, xs = _grid(h, w)
    n = int(rng.integers(5, 13))
    seeds = rng.uniform(-0.15, 1.15, (n, 2)) * np.array([h, w])
    wy = ys + 3 * _value_noise(rng, h, w, 12)
    wx = xs + 3 * _value_noise(rng, h, w, 12)
    dist = (wy[None] - seeds[:, 0, None, None]) ** 2 + (wx[None] - seeds[:, 1, None, None]) ** 2
    cell = dist.argmin(0)                                             # (h, w)
    kinds = _choose(rng, _RURAL_FIELDS, n)
    canvas.label[:] = kinds[cell]
    canvas.rgb[:] = _instance_colours(rng, palette, kinds)[cell]
    # each field ploughed in its own direction
    angle = rng.uniform(0, math.pi, n)[cell]
    period = rng.uniform(2.0, 4.0, n)[cell]
    stripes[:] = np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * (2 * math.pi) / period)
    if rng.random() < 0.5:                                            # forest patches
        patch = _value_noise(rng, h, w, 10) > rng.uniform(0.4, 1.0)
        canvas.paint(patch, FOREST, _instance_colours(rng, palette, np.array([FOREST], np.uint8))[0])
    if rng.random() < 0.35:
        _river(rng, canvas, palette)
    if rng.random() < 0.2:                                            # pond
        canvas.ellipse(rng.uniform(0, h), rng.uniform(0, w), *rng.uniform(3, 9, 2), WATER,
                       _instance_colours(rng, palette, np.array([WATER], np.uint8))[0])
    for _ in range(rng.poisson(0.9)):                                 # tracks
        angle = rng.uniform(0, math.pi)
        across = (xs - rng.uniform(0, w)) * math.cos(angle) + (ys - rng.uniform(0, h)) * math.sin(angle)
        along = -xs * math.sin(angle) + ys * math.cos(angle)
        bend = rng.uniform(0, 4) * np.sin(along / rng.uniform(8, 20))
        canvas.paint(np.abs(across - bend) < rng.uniform(0.8, 1.6), A_ROAD,
                     _instance_colours(rng, palette, np.array([A_ROAD], np.uint8))[0])
    building = np.zeros((h, w), bool)
    for _ in range(rng.poisson(0.9)):                                 # villages: yards and houses
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        canvas.ellipse(cy, cx, *rng.uniform(5, 10, 2), BACKGROUND,
                       _instance_colours(rng, palette, np.array([BACKGROUND], np.uint8))[0])
        houses = int(rng.integers(2, 8))
        for colour_h in _instance_colours(rng, palette, np.full(houses, A_BUILDING, np.uint8)):
            y0, x0 = cy + rng.normal(0, 4), cx + rng.normal(0, 4)
            dy, dx = rng.uniform(2, 5, 2)
            box = canvas.box(y0, y0 + dy, x0, x0 + dx)
            if box is None:
                continue
            canvas.label[box] = A_BUILDING
            canvas.rgb[box] = colour_h
            building[box] = True
            rows = ys[box[0]] - y0
            ridge[box] = np.where(np.broadcast_to(rows, ridge[box].shape) > dy / 2, 1.0, -1.0)
    return building


def render_aerial(domain: str, rng: np.random.Generator, size: tuple[int, int] = (64, 64),
                  palette_move: float = AERIAL_PALETTE_MOVE) -> tuple[np.ndarray, np.ndarray]:
    """One top-down tile -> (image (H, W, 3) uint8 RGB, label (H, W) uint8 LoveDA raw values)."""
    if domain not in AERIAL_LOOKS:
        raise ValueError(f"unknown aerial domain {domain!r}; valid domains: {', '.join(AERIAL_LOOKS)}")
    look = AERIAL_LOOKS[domain]
    palette, amplitudes = _aerial_tables(domain, float(palette_move))
    h, w = size
    canvas = _Canvas(h, w, BACKGROUND)
    ridge = np.zeros((h, w), np.float32)
    stripes = np.zeros((h, w), np.float32)
    layout = _urban_layout if domain == "urban" else _rural_layout
    building = layout(rng, canvas, palette, ridge, stripes)
    building &= canvas.label == A_BUILDING                            # later shapes may cover houses

    rgb = canvas.rgb * (1 + _texture(rng, canvas.label, amplitudes, _AERIAL_CELLS, [stripes]))[..., None]
    rgb = rgb * (1 + look.roof_ridge * ridge * building)[..., None]
    # shadows cast by buildings away from the sun; the ground keeps its label
    angle = rng.uniform(0, 2 * math.pi)
    length = rng.uniform(*look.shadow)
    dy, dx = int(round(length * math.sin(angle))), int(round(length * math.cos(angle)))
    cast = np.zeros_like(building)
    cast[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        building[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    rgb[cast & ~building] *= 1 - look.shadow_strength
    image = _develop(rgb, rng, look.camera)
    label = canvas.label
    if rng.random() < 0.04:                                           # no-data margin, as LoveDA has
        ys, xs = _grid(h, w)
        a = rng.uniform(0, 2 * math.pi)
        edge = (xs - w / 2) * math.cos(a) + (ys - h / 2) * math.sin(a)
        nodata = edge > rng.uniform(0.2, 0.45) * min(h, w)
        image[nodata] = 0
        label[nodata] = NO_DATA
    return image, label


# --------------------------------------------------------------------------------------------
# Writing to disk
# --------------------------------------------------------------------------------------------

def _domains(benchmark: str) -> tuple[str, ...]:
    return {"streets": STREET_STYLES, "streets_hr": HR_STREET_STYLES, "aerial": AERIAL_DOMAINS}[benchmark]


def _split_sizes(benchmark: str, domain: str, n_train: int, n_val: int) -> dict[str, int]:
    if benchmark == "streets" and domain in STREET_VAL_ONLY:
        return {"val": n_val}
    return {"train": n_train, "val": n_val}


def render_sample(benchmark: str, domain: str, split: str, index: int, seed: int = 0,
                  size: tuple[int, int] | None = None, palette_move: float | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Exactly the (image, label) that :func:`generate` writes for this file."""
    if benchmark not in DEFAULTS:
        raise ValueError(f"unknown synthetic benchmark {benchmark!r}; valid: {', '.join(BENCHMARKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    size = tuple(size or DEFAULTS[benchmark]["size"])
    move = DEFAULTS[benchmark]["palette_move"] if palette_move is None else palette_move
    rng = sample_rng(seed, benchmark, domain, split, index)
    if benchmark == "aerial":
        return render_aerial(domain, rng, size, move)
    if benchmark == "streets_hr" and domain not in HR_STREET_STYLES:
        raise ValueError(f"streets_hr has the styles {', '.join(HR_STREET_STYLES)}, not {domain!r}")
    scale = size[1] / STREET_BASE_WIDTH if benchmark == "streets_hr" else 1.0
    return render_street(domain, rng, size, move, scale)


def _png(pixels: np.ndarray) -> bytes:
    """A minimal 8-bit PNG: (H, W, 3) RGB or (H, W) grey, no row filters, zlib level 1.

    Pillow's encoder spends most of its time choosing row filters, which gain nothing on noisy
    64x128 images; writing the file directly halves the generation's encoding time.
    """
    h, w = pixels.shape[:2]
    colour_type = 2 if pixels.ndim == 3 else 0
    rows = np.zeros((h, 1 + pixels[0].size), np.uint8)            # a 0 byte (filter "none") per row
    rows[:, 1:] = pixels.reshape(h, -1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 1))
            + chunk(b"IEND", b""))


def _write_range(task: tuple) -> int:
    benchmark, domain, split, start, stop, seed, size, move, root = task
    images, labels = Path(root) / "images", Path(root) / "labels"
    for index in range(start, stop):
        image, label = render_sample(benchmark, domain, split, index, seed, size, move)
        (images / f"{index:05d}.png").write_bytes(_png(image))
        (labels / f"{index:05d}.png").write_bytes(_png(label))
    return stop - start


def _read_stamp(out_dir: Path) -> dict | None:
    path = out_dir / STAMP_FILE
    if not path.is_file():
        return None
    try:
        stamp = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SyntheticDataError(f"{path}: unreadable stamp file ({err}); delete {out_dir} and run `da-seg synth`")
    return stamp if isinstance(stamp, dict) else None


def _write_stamp(out_dir: Path, benchmarks: dict) -> None:
    stamp = {"generator": _GENERATOR, "version": SYNTHETIC_VERSION, "benchmarks": benchmarks}
    tmp = out_dir / (STAMP_FILE + ".tmp")
    tmp.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    tmp.replace(out_dir / STAMP_FILE)


def generate(out_dir: str | Path, benchmarks=DEFAULT_BENCHMARKS, n_train: int | None = None,
             n_val: int | None = None, seed: int = 0, workers: int | None = None, *,
             streets_palette_move: float = STREETS_PALETTE_MOVE,
             aerial_palette_move: float = AERIAL_PALETTE_MOVE,
             streets_size: tuple[int, int] = (64, 128), aerial_size: tuple[int, int] = (64, 64),
             streets_hr_size: tuple[int, int] = DEFAULTS["streets_hr"]["size"],
             force: bool = False, log: Callable[[str], None] | None = print) -> dict:
    """Write the synthetic benchmarks under ``out_dir`` and stamp them; returns a summary.

    Layout: ``out_dir/<benchmark>/<domain>/<split>/{images,labels}/00000.png``. ``n_train`` and
    ``n_val`` (per domain; None = the benchmark's default) apply to every requested benchmark;
    ``dusk`` and ``fog`` get val only. A benchmark already on disk with this generator version
    and the same parameters is left alone unless ``force``; otherwise its folders are replaced.
    A stamp of another version makes every benchmark it lists stale: they are removed, and the
    requested ones regenerated.
    """
    out_dir = Path(out_dir)
    benchmarks = (benchmarks,) if isinstance(benchmarks, str) else tuple(benchmarks)
    unknown = [b for b in benchmarks if b not in DEFAULTS]
    if unknown or not benchmarks:
        raise ValueError(f"unknown synthetic benchmark(s) {unknown}; valid: {', '.join(BENCHMARKS)}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    log = log or (lambda message: None)
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)

    stamp = _read_stamp(out_dir)
    recorded: dict = {}
    if stamp is not None:
        if stamp.get("version") == SYNTHETIC_VERSION:
            recorded = dict(stamp.get("benchmarks", {}))
        else:
            for stale in stamp.get("benchmarks", {}):
                if stale in DEFAULTS and (out_dir / stale).exists():
                    shutil.rmtree(out_dir / stale)
            log(f"synthetic data in {out_dir} was generator version {stamp.get('version')}, "
                f"this is version {SYNTHETIC_VERSION}: removed it")

    knobs = {"streets": (streets_size, streets_palette_move), "aerial": (aerial_size, aerial_palette_move),
             "streets_hr": (streets_hr_size, streets_palette_move)}
    summary = {"root": str(out_dir), "version": SYNTHETIC_VERSION, "benchmarks": {}}
    for benchmark in benchmarks:
        size, move = knobs[benchmark]
        n_tr = DEFAULTS[benchmark]["n_train"] if n_train is None else int(n_train)
        n_va = DEFAULTS[benchmark]["n_val"] if n_val is None else int(n_val)
        params = {
            "seed": int(seed), "size": [int(size[0]), int(size[1])], "palette_move": float(move),
            "domains": {d: _split_sizes(benchmark, d, n_tr, n_va) for d in _domains(benchmark)},
        }
        images = sum(n for d in params["domains"].values() for n in d.values())
        if not force and recorded.get(benchmark) == params:
            log(f"{benchmark}: up to date in {out_dir / benchmark} ({images} images, version {SYNTHETIC_VERSION})")
            summary["benchmarks"][benchmark] = {"generated": False, "images": images, **params}
            continue
        # unstamp first, so an interrupted run is never taken for a complete one
        recorded.pop(benchmark, None)
        _write_stamp(out_dir, recorded)
        if (out_dir / benchmark).exists():
            shutil.rmtree(out_dir / benchmark)
        tasks = []
        for domain, splits in params["domains"].items():
            for split, count in splits.items():
                root = out_dir / benchmark / domain / split
                (root / "images").mkdir(parents=True, exist_ok=True)
                (root / "labels").mkdir(parents=True, exist_ok=True)
                tasks += [(benchmark, domain, split, s, min(s + 100, count), int(seed), tuple(size), float(move), str(root))
                          for s in range(0, count, 100)]
        t0 = time.perf_counter()
        if workers <= 1 or len(tasks) <= 1:
            done = sum(map(_write_range, tasks))
        else:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with multiprocessing.get_context(method).Pool(min(workers, len(tasks))) as pool:
                done = sum(pool.imap_unordered(_write_range, tasks))
        seconds = time.perf_counter() - t0
        recorded[benchmark] = params
        _write_stamp(out_dir, recorded)
        log(f"{benchmark}: wrote {done} images to {out_dir / benchmark} in {seconds:.1f} s ({workers} workers)")
        summary["benchmarks"][benchmark] = {"generated": True, "images": done, "seconds": round(seconds, 2), **params}
    summary["seconds"] = round(time.perf_counter() - started, 2)
    log(f"synthetic benchmark version {SYNTHETIC_VERSION} ready in {out_dir} ({summary['seconds']:.1f} s)")
    return summary


def check_synthetic(root: str | Path) -> dict:
    """Check that synthetic data under ``root`` was made by this generator version.

    ``root`` is the generation root or a folder below it (a benchmark or a domain root, such
    as ``<data>/synth/streets/game``). Returns the stamp; raises :class:`SyntheticDataError`
    naming the fix (``da-seg synth``) when the stamp is missing, of another version, or does
    not list the benchmark.
    """
    root = Path(root)
    for level, candidate in enumerate([root, *list(root.parents)[:2]]):
        if (candidate / STAMP_FILE).is_file():
            break
    else:
        raise SyntheticDataError(
            f"{root}: no {STAMP_FILE} found here or up to two folders above, so these are not files "
            f"from the synthetic generator (version {SYNTHETIC_VERSION}); generate them with `da-seg synth`")
    stamp = _read_stamp(candidate) or {}
    version = stamp.get("version")
    if version != SYNTHETIC_VERSION:
        raise SyntheticDataError(
            f"{candidate / STAMP_FILE}: synthetic data made by generator version {version}, but this da_seg "
            f"needs version {SYNTHETIC_VERSION} (results would not be comparable); regenerate with `da-seg synth`")
    if level > 0:
        benchmark = root.parts[len(candidate.parts)]
        if benchmark not in stamp.get("benchmarks", {}):
            raise SyntheticDataError(
                f"{candidate / STAMP_FILE}: benchmark {benchmark!r} is not (completely) generated there; "
                f"run `da-seg synth`")
    return stamp
