"""Dataset preparation: ISPRS tiling, tree checks, label conversion.

Plain functions do the work; :data:`prepare` is a click group whose subcommands call them
(attached to the main CLI as ``da-seg prepare ...``).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import click
import numpy as np
from PIL import Image, UnidentifiedImageError

from da_seg.data.domains import (
    IGNORE_INDEX,
    Domain,
    DomainError,
    Sample,
    _scan,
    load_domain,
)
from da_seg.utils.progress import Progress

# ---------------------------------------------------------------------------------------------
# ISPRS Potsdam / Vaihingen

# The train/val tile split of mmsegmentation's ISPRS converters, which remote-sensing DA papers use.
ISPRS_SPLITS = {
    "potsdam": {
        "train": (
            "2_10 2_11 2_12 3_10 3_11 3_12 4_10 4_11 4_12 5_10 5_11 5_12 "
            "6_10 6_11 6_12 6_7 6_8 6_9 7_10 7_11 7_12 7_7 7_8 7_9"
        ).split(),
        "val": "5_15 6_15 6_13 3_13 4_14 6_14 5_14 2_13 4_15 2_14 5_13 4_13 3_14 7_13".split(),
    },
    "vaihingen": {
        "train": [f"area{i}" for i in (1, 11, 13, 15, 17, 21, 23, 26, 28, 3, 30, 32, 34, 37, 5, 7)],
        "val": [f"area{i}" for i in (6, 24, 35, 16, 14, 22, 10, 4, 2, 20, 8, 31, 33, 27, 38, 12, 29)],
    },
}
# Tile key in the file names: top_potsdam_2_10_RGB.tif -> "2_10"; top_mosaic_09cm_area1.tif -> "area1".
_ISPRS_KEY = {
    "potsdam": re.compile(r"top_potsdam_(\d+_\d+)", re.IGNORECASE),
    "vaihingen": re.compile(r"(area\d+)", re.IGNORECASE),
}
_RASTER_SUFFIXES = (".tif", ".tiff", ".png")

# ISPRS colour -> train id, on colours binarised at 128 and packed as (R>>7)<<2 | (G>>7)<<1 | (B>>7).
# Binarising absorbs the off-by-a-few colours some Potsdam label TIFFs contain.
_ISPRS_CODE_TO_ID = np.full(8, IGNORE_INDEX, np.uint8)
for _code, _train_id in ((0b111, 0), (0b001, 1), (0b011, 2), (0b010, 3), (0b110, 4), (0b100, 5)):
    _ISPRS_CODE_TO_ID[_code] = _train_id  # white, blue, cyan, green, yellow, red; black/magenta -> 255


def isprs_rgb_to_index(rgb: np.ndarray) -> tuple[np.ndarray, int]:
    """(H, W, 3) ISPRS colour-coded label -> ((H, W) uint8 train ids, number of pixels whose colour is
    no ISPRS class colour nor black). Ids: 0 impervious (white), 1 building (blue), 2 low vegetation
    (cyan), 3 tree (green), 4 car (yellow), 5 clutter (red); black boundary -> 255."""
    bits = (rgb[..., :3] >= 128).astype(np.uint8)
    code = (bits[..., 0] << 2) | (bits[..., 1] << 1) | bits[..., 2]
    odd = int(np.count_nonzero(code == 0b101))  # magenta is the only unused combination
    return _ISPRS_CODE_TO_ID[code], odd


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins covering [0, length): regular steps, the last tile flush with the edge."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def _isprs_files(directory: Path, dataset: str, kind: str) -> dict[str, list[Path]]:
    if not directory.is_dir():
        raise DomainError(f"ISPRS {kind} directory not found: {directory}")
    found: dict[str, list[Path]] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() in _RASTER_SUFFIXES and not path.name.startswith("."):
            match = _ISPRS_KEY[dataset].search(path.stem)
            if match:
                found.setdefault(match.group(1).lower(), []).append(path)
    return found


def _read_raster(path: Path, what: str) -> np.ndarray:
    """(H, W, 3) uint8 of an ISPRS TIFF/PNG; 4-band RGBIR tiles keep their first three bands (R, G, B)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # ISPRS tiles are large by design (Potsdam: 6000x6000)
    try:
        with Image.open(path) as im:
            if im.mode == "RGB":
                array = np.asarray(im)
            elif im.mode in ("RGBA", "RGBX", "CMYK"):  # Pillow may label a 4-band TIFF CMYK
                array = np.asarray(im)[..., :3]
            elif im.mode == "P":
                array = np.asarray(im.convert("RGB"))
            else:
                raise DomainError(f"{what} {path} has mode {im.mode}; 8-bit RGB (or IRRG) is expected")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DomainError):
            raise
        raise DomainError(f"cannot read {what} {path}: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    return np.ascontiguousarray(array)


def prepare_isprs(
    dataset: str,
    images: Path,
    labels: Path,
    out: Path,
    tile: int = 512,
    overlap: int = 0,
    eroded: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Cut ISPRS tiles into ``tile`` x ``tile`` PNG crops with index labels.

    Writes ``out/images/{train,val}/<key>_<x0>_<y0>_<x1>_<y1>.png`` (RGB, or IRRG for Vaihingen) and
    ``out/labels/{split}/<same>.png`` (train ids, 255 = boundary), the layout of
    ``datasets/{potsdam,vaihingen}.toml``. ``eroded`` picks the ``*_noBoundary`` label files (the
    benchmark's evaluation labels, black boundary = ignore); ``eroded=False`` the full ones.
    Returns a summary dict (also written to ``out/prepare_isprs.json``).
    """
    if dataset not in ISPRS_SPLITS:
        raise DomainError(f"unknown ISPRS dataset {dataset!r}; valid: {', '.join(ISPRS_SPLITS)}")
    if not 0 <= overlap < tile:
        raise DomainError(f"overlap must be in 0..{tile - 1} for tile {tile}, got {overlap}")
    images, labels, out = Path(images), Path(labels), Path(out)
    image_files = _isprs_files(images, dataset, "image")
    label_files = _isprs_files(labels, dataset, "label")
    if not image_files:
        raise DomainError(f"no {dataset} image tiles (*.tif) with a recognisable tile name in {images}")

    kind = "eroded (*_noBoundary)" if eroded else "full (without _noBoundary)"
    chosen_labels: dict[str, Path] = {}
    for key, paths in label_files.items():
        wanted = [p for p in paths if ("noboundary" in p.stem.lower()) == eroded]
        if len(wanted) > 1:
            raise DomainError(f"several {kind} label files for tile {key}: {', '.join(map(str, wanted))}")
        if wanted:
            chosen_labels[key] = wanted[0]
    if label_files and not chosen_labels:
        other = "--full" if eroded else "--eroded"
        raise DomainError(
            f"{labels} holds no {kind} label files; pass {other} or point --labels at the other set"
        )

    split_of = {key: split for split, keys in ISPRS_SPLITS[dataset].items() for key in keys}
    summary = {
        "dataset": dataset, "tile": tile, "overlap": overlap, "eroded": eroded, "tiles": {}, "skipped": []
    }
    stride = tile - overlap
    for key in sorted(image_files):
        paths = image_files[key]
        if len(paths) > 1:
            raise DomainError(
                f"several image files for tile {key} in {images}: {', '.join(p.name for p in paths)}; "
                "keep one kind (e.g. only *_RGB.tif) in the directory"
            )
        if key not in chosen_labels:
            summary["skipped"].append(f"{paths[0].name}: no {kind} label file")
            continue
        split = split_of.get(key)
        if split is None:
            summary["skipped"].append(f"{paths[0].name}: tile {key} is in neither the train nor the val list")
            continue
        image = _read_raster(paths[0], "image")
        label_rgb = _read_raster(chosen_labels[key], "label")
        if image.shape[:2] != label_rgb.shape[:2]:
            raise DomainError(
                f"image {paths[0]} is {image.shape[1]}x{image.shape[0]} but label {chosen_labels[key]} is "
                f"{label_rgb.shape[1]}x{label_rgb.shape[0]} (WxH)"
            )
        label, odd = isprs_rgb_to_index(label_rgb)
        if odd:
            log(f"warning: {chosen_labels[key]}: {odd} pixels with a non-ISPRS colour -> 255")
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        height, width = label.shape
        count = 0
        for y0 in _tile_starts(height, tile, stride):
            for x0 in _tile_starts(width, tile, stride):
                y1, x1 = min(y0 + tile, height), min(x0 + tile, width)
                name = f"{key}_{x0}_{y0}_{x1}_{y1}.png"
                Image.fromarray(image[y0:y1, x0:x1]).save(out / "images" / split / name, compress_level=3)
                Image.fromarray(label[y0:y1, x0:x1]).save(out / "labels" / split / name, compress_level=3)
                count += 1
        summary["tiles"][key] = {"split": split, "crops": count, "odd_color_pixels": odd}
        log(f"{key}: {count} crops -> {split}")
    for line in summary["skipped"]:
        log(f"skipped {line}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "prepare_isprs.json").write_text(json.dumps(summary, indent=1))
    return summary


# ---------------------------------------------------------------------------------------------
# check


@dataclass
class CheckReport:
    domain: str
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        out = list(self.lines)
        if self.problems:
            out.append(f"PROBLEMS ({len(self.problems)}):")
            out += [f"  - {p}" for p in self.problems]
        else:
            out.append("no problems found")
        return "\n".join(out)


def _format_values(values: Iterable) -> str:
    values = sorted(values)
    shown = ", ".join(str(v) for v in values[:40])
    return shown + (f", ... ({len(values)} values)" if len(values) > 40 else "")


def check_domain(
    domain: Domain, splits: Iterable[str] | None = None, limit: int | None = None, progress: bool = False
) -> CheckReport:
    """Scan a domain's splits: counts, image sizes, label values, class frequencies, and problems
    (missing root/dirs, empty splits, unpaired, unreadable or mismatched files, unexpected values).
    ``limit`` reads only the first N samples of each split (listing and pairing are always full).
    ``progress``: a progress bar per split on stderr."""
    report = CheckReport(domain.name)
    report.lines.append(f"domain {domain.name}: descriptor {domain.descriptor}, root {domain.root}")
    explicit = splits is not None
    checked: dict = {}
    for split in list(splits) if explicit else domain.splits:
        try:
            spec = domain.split_spec(split)
        except DomainError as e:
            report.problems.append(str(e))
            continue
        if spec.list and not explicit and not (domain.root / spec.list).is_file():
            report.lines.append(f"[{split}] skipped: list file {domain.root / spec.list} absent (optional)")
            continue
        if spec in checked:  # e.g. gta5 "train" and "all": the same files
            report.lines.append(f"[{split}] same files as [{checked[spec]}], not read twice")
            continue
        checked[spec] = split
        _check_split(domain, split, spec, limit, report, progress)
    return report


def _check_split(domain: Domain, split: str, spec, limit: int | None, report: CheckReport,
                 progress: bool = False) -> None:
    head = f"[{split}]"
    try:
        unlabelled = domain.samples(split, with_labels=False)
    except DomainError as e:
        report.problems.append(f"{head} {e}")
        return
    labelled = None
    if spec.labels is not None:
        labels_dir = domain.root / spec.labels
        if not labels_dir.is_dir():
            report.problems.append(f"{head} label directory {labels_dir} does not exist")
        else:
            present = _scan(labels_dir, spec.label_suffix)
            no_label = [s for s in unlabelled if s.name not in present]
            # With a list or exclusions, label files outside the split are expected.
            no_image = [] if spec.list or spec.exclude else sorted(present - {s.name for s in unlabelled})
            # missing_label = "skip" declares pairing gaps acceptable: report them, do not fail.
            severity = report.lines if spec.missing_label == "skip" else report.problems
            if no_label:
                severity.append(
                    f"{head} {len(no_label)} image(s) without a label file, e.g. "
                    + ", ".join(str(s.image) for s in no_label[:5])
                )
            if no_image:
                severity.append(
                    f"{head} {len(no_image)} label file(s) without an image, e.g. "
                    + ", ".join(str(labels_dir / (n + spec.label_suffix)) for n in no_image[:5])
                )
            labelled = [
                Sample(s.image, labels_dir / (s.name + spec.label_suffix), s.name)
                for s in unlabelled
                if s.name in present
            ]
    samples = labelled if labelled is not None else unlabelled
    report.lines.append(
        f"{head} {len(unlabelled)} images"
        + (f", {len(labelled)} with labels" if labelled is not None else ", no labels")
    )
    to_read = samples[:limit] if limit is not None else samples
    sizes: Counter = Counter()
    raw_values: set = set()
    unknown_values: set = set()
    pixel_counts = np.zeros(domain.num_classes, np.int64)
    image_counts = np.zeros(domain.num_classes, np.int64)
    spec_label = domain.label_spec
    bar = Progress(len(to_read), f"check {domain.name} [{split}]", enabled=progress)
    for done, sample in enumerate(to_read, start=1):
        bar.update(done)
        try:
            image = domain.read_image(sample.image)
            sizes[(image.shape[1], image.shape[0])] += 1
        except DomainError as e:
            report.problems.append(f"{head} unreadable image: {e}")
            image = None
        if sample.label is None:
            continue
        try:
            raw = domain.read_raw_label(sample.label)
        except DomainError as e:
            report.problems.append(f"{head} unreadable label: {e}")
            continue
        if spec_label.encoding == "rgb":
            values = {tuple(int(v) for v in c) for c in np.unique(raw.reshape(-1, raw.shape[-1]), axis=0)}
        else:
            values = {int(v) for v in np.unique(raw)}
        raw_values |= values
        try:
            ids = spec_label.to_train_ids(raw, sample.label)
        except DomainError as e:
            report.problems.append(f"{head} {e}")
            continue
        if spec_label.unknown == "ignore":
            unknown_values |= set(spec_label.undeclared(values))
        if image is not None and image.shape[:2] != ids.shape:
            report.problems.append(
                f"{head} size mismatch: image {sample.image} is {image.shape[1]}x{image.shape[0]}, "
                f"label {sample.label} is {ids.shape[1]}x{ids.shape[0]}"
            )
        counts = np.bincount(ids.ravel(), minlength=256)[: domain.num_classes]
        pixel_counts += counts
        image_counts += counts > 0
    bar.close()
    read_note = f" (first {len(to_read)} read)" if limit is not None and len(to_read) < len(samples) else ""
    if sizes:
        common = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common(5))
        more = f", {len(sizes) - 5} more sizes" if len(sizes) > 5 else ""
        report.lines.append(f"{head} image sizes{read_note}: {common}{more}")
    if raw_values:
        report.lines.append(f"{head} raw label values found: {_format_values(raw_values)}")
    if unknown_values:
        report.lines.append(
            f"{head} values outside the map, sent to ignore (unknown = \"ignore\"): "
            + _format_values(unknown_values)
        )
    total = pixel_counts.sum()
    if total:
        report.lines.append(f"{head} class frequencies (share of labelled pixels, images containing):")
        for c, name in enumerate(domain.class_names):
            share = 100 * pixel_counts[c] / total
            report.lines.append(f"    {c:3d} {name:<20s} {share:6.2f}%  {image_counts[c]}")


# ---------------------------------------------------------------------------------------------
# convert-labels


def dumps_toml(data: dict) -> str:
    """TOML text for nested dicts of str / int / float / bool / lists (enough for descriptors)."""

    def key(k: str) -> str:
        return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) and not k.isdigit() else json.dumps(k)

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{key(str(k))} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    lines: list[str] = []

    def table(d: dict, prefix: str) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in d.items() if isinstance(v, dict)}
        if prefix and (scalars or not tables):
            lines.append(f"\n[{prefix}]")
        lines.extend(f"{key(k)} = {value(v)}" for k, v in scalars.items())
        for k, v in tables.items():
            table(v, f"{prefix}.{key(k)}" if prefix else key(k))

    table(data, "")
    return "\n".join(lines).lstrip("\n") + "\n"


def _convert_one(args: tuple[Domain, Path, Path]) -> None:
    domain, source, target = args
    if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
        return  # converted by an earlier (interrupted) run
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}.png")
    Image.fromarray(domain.read_label(source)).save(tmp, compress_level=3)
    tmp.replace(target)


def convert_labels(
    domain: Domain,
    splits: Iterable[str] | None = None,
    out: Path | None = None,
    descriptor_dir: Path | None = None,
    workers: int = 0,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> Path:
    """Decode every label once into 8-bit train-id PNGs and write a descriptor for them.

    Labels go to ``out`` (default ``<root>/da_seg_trainids``), mirroring each split's label
    directory; the new descriptor ``<name>_trainids.toml`` (same images, classes and splits,
    ``encoding = "index"`` identity) goes to ``descriptor_dir`` (default: the first $DA_SEG_DATASETS
    directory, else ./datasets). Already converted, up-to-date files are skipped. Returns the
    descriptor path.
    """
    out = Path(out) if out is not None else domain.root / "da_seg_trainids"
    if descriptor_dir is None:
        env = [p for p in os.environ.get("DA_SEG_DATASETS", "").split(os.pathsep) if p]
        descriptor_dir = Path(env[0]).expanduser() if env else Path.cwd() / "datasets"
    if splits is None:
        chosen = [s for s in domain.splits if domain.split_specs[s].labels is not None]
    else:
        chosen = list(splits)
    split_tables = {}
    jobs = []
    for split in chosen:
        spec = domain.split_spec(split)
        if spec.labels is None:
            raise DomainError(f"split {split!r} of domain {domain.name!r} has no labels to convert")
        if spec.list and splits is None and not (domain.root / spec.list).is_file():
            log(f"[{split}] skipped: list file {domain.root / spec.list} absent")
            continue
        target_dir = out / spec.labels
        samples = domain.samples(split, with_labels=True)
        jobs += [(domain, s.label, target_dir / (s.name + ".png")) for s in samples]
        try:
            labels_entry = str(target_dir.relative_to(domain.root))
        except ValueError:
            labels_entry = str(target_dir.absolute())
        table = {"images": spec.images, "image_suffix": spec.image_suffix}
        table.update(labels=labels_entry, label_suffix=".png")
        if spec.list:
            table["list"] = spec.list
        if spec.missing_label != "error":
            table["missing_label"] = spec.missing_label
        if spec.exclude:
            table["exclude"] = list(spec.exclude)
        split_tables[split] = table
        log(f"[{split}] {len(samples)} labels -> {target_dir}")
    unique_jobs = list({job[2]: job for job in jobs}.values())
    bar = Progress(len(unique_jobs), f"convert {domain.name}", enabled=progress)
    if workers > 0:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            for done, _ in enumerate(pool.map(_convert_one, unique_jobs, chunksize=16), start=1):
                bar.update(done)
    else:
        for done, job in enumerate(unique_jobs, start=1):
            _convert_one(job)
            bar.update(done)
    bar.close()

    try:
        root_entry = str(domain.root.relative_to(Path(os.environ.get("DA_SEG_DATA", "data")).absolute()))
    except ValueError:
        root_entry = str(domain.root)
    descriptor = {
        "name": f"{domain.name}_trainids",
        "description": f"{domain.name} with labels pre-decoded to train ids by da-seg prepare convert-labels",
        "root": root_entry,
        "layout": f"{domain.layout} -- labels converted to 8-bit train ids under {out}",
        "classes": {"names": list(domain.class_names), "colors": [list(c) for c in domain.colors]},
        "label": {"encoding": "index", "unknown": "error"},
        "splits": split_tables,
    }
    if domain.class_subsets:
        descriptor["classes"]["subsets"] = {k: list(v) for k, v in domain.class_subsets.items()}
    descriptor_dir.mkdir(parents=True, exist_ok=True)
    path = descriptor_dir / f"{domain.name}_trainids.toml"
    header = f"# Written by `da-seg prepare convert-labels {domain.name}` from {domain.descriptor}.\n"
    path.write_text(header + dumps_toml(descriptor))
    log(f"wrote {path}")
    return path


# ---------------------------------------------------------------------------------------------
# click commands


_PATH = click.Path(path_type=Path)


@click.group("prepare")
def prepare() -> None:
    """Prepare, convert and check datasets (descriptors: datasets/README.md)."""


@prepare.command("isprs")
@click.option("--dataset", type=click.Choice(sorted(ISPRS_SPLITS)), required=True)
@click.option("--images", type=_PATH, required=True, help="Folder of the image TIFFs.")
@click.option("--labels", type=_PATH, required=True, help="Folder of the RGB-coded label TIFFs.")
@click.option("--out", type=_PATH, required=True, help="Output root, e.g. $DA_SEG_DATA/potsdam.")
@click.option("--tile", type=int, default=512, show_default=True)
@click.option("--overlap", type=int, default=0, show_default=True)
@click.option(
    "--eroded/--full", default=True, show_default=True, help="Use the *_noBoundary labels, or the full ones."
)
def isprs_command(dataset, images, labels, out, tile, overlap, eroded) -> None:
    """Cut ISPRS Potsdam/Vaihingen tiles into crops with index labels."""
    try:
        prepare_isprs(dataset, images, labels, out, tile, overlap, eroded, log=click.echo)
    except DomainError as e:
        raise click.ClickException(str(e)) from None


@prepare.command("check")
@click.argument("domain")
@click.option("--split", "splits", multiple=True, help="Split(s) to check (default: all).")
@click.option("--limit", type=int, default=None, help="Read only the first N samples of each split.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def check_command(domain, splits, limit, no_progress) -> None:
    """Scan a domain; exit code 1 if any problem is found."""
    try:
        report = check_domain(load_domain(domain), splits or None, limit, progress=not no_progress)
    except DomainError as e:
        raise click.ClickException(str(e)) from None
    click.echo(report.text())
    if not report.ok:
        raise SystemExit(1)


@prepare.command("convert-labels")
@click.argument("domain")
@click.option("--split", "splits", multiple=True, help="Split(s) to convert (default: all labelled).")
@click.option("--out", type=_PATH, default=None, help="Default: <root>/da_seg_trainids.")
@click.option(
    "--descriptor-dir", type=_PATH, default=None, help="Default: the first $DA_SEG_DATASETS dir, else ./datasets."
)
@click.option("--workers", type=int, default=0, show_default=True)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def convert_labels_command(domain, splits, out, descriptor_dir, workers, no_progress) -> None:
    """Write 8-bit train-id PNGs once (e.g. for SYNTHIA's slow 16-bit labels) and a descriptor."""
    try:
        convert_labels(load_domain(domain), splits or None, out, descriptor_dir, workers, log=click.echo,
                       progress=not no_progress)
    except DomainError as e:
        raise click.ClickException(str(e)) from None
