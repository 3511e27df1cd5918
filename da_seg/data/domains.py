"""Domain descriptors: one TOML file per dataset -> a :class:`Domain` that lists and decodes samples.

The descriptor format is documented key by key in ``datasets/README.md``. Loading is strict: an
unknown key fails with the closest valid one, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import difflib
import os
import tomllib
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError

from da_seg.data import png16
from da_seg.data.classes import CLASS_PRESETS
from da_seg.utils.resources import shipped_dir

IGNORE_INDEX = 255
_UNKNOWN = 256  # marks raw values that are neither mapped nor ignored, before the policy applies
_INDEX_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L")  # Pillow modes holding one value per pixel

ENCODINGS = ("index", "rgb", "channel")
UNKNOWN_POLICIES = ("ignore", "error")
MISSING_LABEL_POLICIES = ("error", "skip")

# Every key a descriptor may hold, per table. Anything else is an error.
TOP_KEYS = ("name", "description", "root", "layout", "generator", "classes", "label", "splits")
CLASSES_KEYS = ("preset", "names", "colors", "subsets")
LABEL_KEYS = ("encoding", "channel", "rgb_map", "id_map", "ignore_values", "unknown")
SPLIT_KEYS = ("images", "image_suffix", "labels", "label_suffix", "list", "missing_label", "exclude")


class DomainError(ValueError):
    """A descriptor, dataset tree or data file is not what it should be; the message says which."""


@dataclass(frozen=True)
class Sample:
    image: Path
    label: Path | None
    name: str  # path relative to the split's image directory, without the image suffix


@dataclass(frozen=True)
class SplitSpec:
    images: str
    image_suffix: str = ".png"
    labels: str | None = None
    label_suffix: str = ".png"
    list: str = ""
    missing_label: str = "error"
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class LabelSpec:
    """How raw label files become train ids (see ``[label]`` in datasets/README.md)."""

    num_classes: int
    encoding: str = "index"
    channel: int = 0
    id_map: tuple[tuple[int, int], ...] | None = None  # None: identity
    rgb_map: tuple[tuple[tuple[int, int, int], int], ...] = ()
    ignore_values: tuple = ()  # ints, or (r, g, b) tuples for encoding = "rgb"
    unknown: str = "error"

    @cached_property
    def _index_lut(self) -> np.ndarray:
        """uint16 table raw value (0..65535) -> train id, 255 or the _UNKNOWN marker."""
        lut = np.full(65536, _UNKNOWN, np.uint16)
        pairs = self.id_map if self.id_map is not None else [(c, c) for c in range(self.num_classes)]
        for raw, train_id in pairs:
            lut[raw] = train_id
        for raw in self.ignore_values:
            lut[raw] = IGNORE_INDEX
        lut[IGNORE_INDEX] = IGNORE_INDEX
        return lut

    @cached_property
    def _rgb_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted packed colours and their train ids, for a searchsorted lookup."""
        pairs = [(_pack(c), t) for c, t in self.rgb_map]
        pairs += [(_pack(c), IGNORE_INDEX) for c in self.ignore_values]
        pairs.sort()
        keys = np.array([p for p, _ in pairs], np.int64)
        values = np.array([t for _, t in pairs], np.uint16)
        return keys, values

    def undeclared(self, values) -> list:
        """The raw values (ints, or (r, g, b) for "rgb") that are neither mapped nor ignored."""
        if self.encoding == "rgb":
            known = set(self._rgb_table[0].tolist())
            return [v for v in values if _pack(v) not in known]
        return [v for v in values if not 0 <= v < 65536 or self._index_lut[v] == _UNKNOWN]

    def to_train_ids(self, raw: np.ndarray, path: Path | str) -> np.ndarray:
        """raw (H, W) values, or (H, W, 3) colours for "rgb" -> (H, W) uint8 train ids."""
        if self.encoding == "rgb":
            packed = (
                (raw[..., 0].astype(np.int64) << 16) | (raw[..., 1].astype(np.int64) << 8) | raw[..., 2]
            )
            keys, values = self._rgb_table
            if keys.size == 0:
                mapped = np.full(packed.shape, _UNKNOWN, np.uint16)
            else:
                pos = np.minimum(np.searchsorted(keys, packed), keys.size - 1)
                mapped = np.where(keys[pos] == packed, values[pos], _UNKNOWN).astype(np.uint16)
        elif raw.dtype in (np.uint8, np.uint16, np.bool_):
            mapped = self._index_lut[raw]
        else:  # e.g. int32 from Pillow mode "I": values may fall outside the table
            values_in = raw.astype(np.int64, copy=False)
            in_range = (values_in >= 0) & (values_in < 65536)
            mapped = self._index_lut[np.where(in_range, values_in, 0)]
            mapped[~in_range] = _UNKNOWN
        unknown = mapped == _UNKNOWN
        if unknown.any():
            if self.unknown == "error":
                raise DomainError(_unknown_values_message(raw, unknown, path, self.encoding))
            mapped[unknown] = IGNORE_INDEX
        return mapped.astype(np.uint8)


def _pack(color) -> int:
    r, g, b = color
    return (int(r) << 16) | (int(g) << 8) | int(b)


def _unknown_values_message(raw: np.ndarray, unknown: np.ndarray, path, encoding: str) -> str:
    bad = np.unique(raw[unknown], axis=0)
    shown = [tuple(int(v) for v in c) if encoding == "rgb" else int(c) for c in bad[:20]]
    more = f" (and {len(bad) - 20} more)" if len(bad) > 20 else ""
    what = "colour(s)" if encoding == "rgb" else "value(s)"
    where = "rgb_map / ignore_values" if encoding == "rgb" else "id_map / ignore_values"
    return (
        f"label file {path}: {what} {shown}{more} on {int(unknown.sum())} pixels are not in the "
        f'descriptor\'s {where}, and unknown = "error". Map them, list them in ignore_values, or '
        f'set unknown = "ignore" to send them to 255.'
    )


@dataclass(frozen=True)
class Domain:
    """One dataset as its descriptor describes it: where it is, its classes, its splits, and how
    its label files decode to train ids. Build it with :func:`load_domain`; ``root`` is absolute.
    """

    name: str
    root: Path
    descriptor: Path
    class_names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    class_subsets: dict[str, tuple[int, ...]]
    ignore_index: int = IGNORE_INDEX
    layout: str = ""
    description: str = ""
    generator: str = ""          # what made the files (da_seg.data.generated.GENERATORS), checked before training
    label: LabelSpec | None = field(default=None, repr=False)
    split_specs: Mapping[str, SplitSpec] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def label_spec(self) -> LabelSpec:
        # A Domain built in code without a [label] table reads labels that already hold train ids.
        return self.label if self.label is not None else LabelSpec(self.num_classes)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.split_specs)

    def split_spec(self, split: str) -> SplitSpec:
        try:
            return self.split_specs[split]
        except KeyError:
            raise DomainError(
                f"domain {self.name!r} has no split {split!r}; its splits are: "
                f"{', '.join(self.splits)} (descriptor {self.descriptor})"
            ) from None

    # -- listing --------------------------------------------------------------------------------

    def samples(self, split: str, with_labels: bool) -> list[Sample]:
        """Samples of ``split``, sorted by name (in file order for a ``list`` split).

        ``with_labels=False`` never touches label files; ``True`` pairs every image with its label
        and fails, naming them, on images without one (unless the split says missing_label = "skip").
        """
        spec = self.split_spec(split)
        images_dir = self._directory(spec.images, f"splits.{split}.images")
        if spec.list:
            names = self._names_from_list(spec, split, images_dir)
        else:
            names = sorted(_scan(images_dir, spec.image_suffix))
        if spec.exclude:
            excluded = set(spec.exclude)
            names = [n for n in names if n not in excluded]
        if not names:
            source = f"the names listed in {self.root / spec.list}" if spec.list else (
                f"files ending in {spec.image_suffix!r} under {images_dir}"
            )
            raise DomainError(
                f"split {split!r} of domain {self.name!r} is empty: found no {source}. "
                f"Expected layout under {self.root}: {self.layout or '(not given)'}"
            )
        if not with_labels:
            return [Sample(images_dir / (n + spec.image_suffix), None, n) for n in names]
        if spec.labels is None:
            raise DomainError(
                f"split {split!r} of domain {self.name!r} has no labels (no splits.{split}.labels in "
                f"{self.descriptor}); use it with with_labels=False"
            )
        labels_dir = self._directory(spec.labels, f"splits.{split}.labels")
        present = _scan(labels_dir, spec.label_suffix)
        missing = [n for n in names if n not in present]
        if missing and spec.missing_label == "error":
            shown = ", ".join(
                f"{images_dir / (n + spec.image_suffix)} -> {labels_dir / (n + spec.label_suffix)}"
                for n in missing[:5]
            )
            raise DomainError(
                f"split {split!r} of domain {self.name!r}: {len(missing)} of {len(names)} images have no "
                f"label file, e.g. {shown}. Fix the tree, or set missing_label = \"skip\" in "
                f"[splits.{split}] of {self.descriptor} to drop them."
            )
        if missing:
            names = [n for n in names if n in present]
        return [
            Sample(images_dir / (n + spec.image_suffix), labels_dir / (n + spec.label_suffix), n)
            for n in names
        ]

    def _directory(self, relative: str, key: str) -> Path:
        if not self.root.is_dir():
            raise DomainError(missing_root_message(self))
        path = self.root / relative
        if not path.is_dir():
            raise DomainError(
                f"domain {self.name!r}: directory {path} ({key} = {relative!r} in {self.descriptor}) "
                f"does not exist. Expected layout under {self.root}: {self.layout or '(not given)'}"
            )
        return path

    def _names_from_list(self, spec: SplitSpec, split: str, images_dir: Path) -> list[str]:
        list_path = self.root / spec.list
        if not list_path.is_file():
            raise DomainError(
                f"domain {self.name!r}: list file {list_path} of split {split!r} (splits.{split}.list in "
                f"{self.descriptor}) does not exist; it holds one image name per line, relative to "
                f"{images_dir}, with or without the suffix {spec.image_suffix!r}"
            )
        names = []
        for line in list_path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if spec.image_suffix and line.endswith(spec.image_suffix):
                line = line[: -len(spec.image_suffix)]
            names.append(line)
        absent = [n for n in names if not (images_dir / (n + spec.image_suffix)).is_file()]
        if absent:
            raise DomainError(
                f"domain {self.name!r}: {len(absent)} names in {list_path} have no image, e.g. "
                + ", ".join(str(images_dir / (n + spec.image_suffix)) for n in absent[:5])
            )
        return names

    # -- decoding -------------------------------------------------------------------------------

    def read_image(self, path: Path) -> np.ndarray:
        """(H, W, 3) uint8 RGB."""
        try:
            with Image.open(path) as im:
                return np.array(im.convert("RGB"))  # writable, unlike asarray
        except FileNotFoundError:
            raise DomainError(f"image file not found: {path}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DomainError(f"cannot read image file {path} (domain {self.name!r}): {e}") from None

    def read_label(self, path: Path) -> np.ndarray:
        """(H, W) uint8 train ids, 255 = ignore."""
        return self.label_spec.to_train_ids(self.read_raw_label(Path(path)), path)

    def read_pair(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """Image and label of a labelled sample; a size mismatch names both files."""
        image = self.read_image(sample.image)
        label = self.read_label(sample.label)
        if image.shape[:2] != label.shape:
            raise DomainError(
                f"domain {self.name!r}: image {sample.image} is {image.shape[1]}x{image.shape[0]} but its "
                f"label {sample.label} is {label.shape[1]}x{label.shape[0]} (WxH). Remove the pair or list "
                f"{sample.name!r} in the split's exclude = [...] in {self.descriptor}"
            )
        return image, label

    def read_raw_label(self, path: Path) -> np.ndarray:
        """The label file's values before mapping: (H, W), or (H, W, 3) colours for "rgb"."""
        encoding = self.label_spec.encoding
        try:
            header = png16.read_png_header(path)
        except FileNotFoundError:
            raise DomainError(f"label file not found: {path}") from None
        except OSError as e:
            raise DomainError(f"cannot read label file {path}: {e}") from None
        multi16 = header is not None and header.bit_depth == 16 and header.channels > 1
        try:
            if multi16:
                if encoding != "channel":
                    raise DomainError(
                        f"label file {path} is a 16-bit {header.channels}-channel PNG, but the descriptor "
                        f"{self.descriptor} says encoding = {encoding!r}; such files (SYNTHIA) need "
                        f'encoding = "channel" with the channel holding the class'
                    )
                raw = png16.read_png(path)
            else:
                with Image.open(path) as im:
                    if encoding == "rgb":
                        raw = np.asarray(im.convert("RGB"))
                    else:
                        if encoding == "index" and im.mode not in _INDEX_MODES:
                            raise DomainError(
                                f"label file {path} has {len(im.getbands())} channels (mode {im.mode}), but "
                                f'the descriptor {self.descriptor} says encoding = "index" (one channel or '
                                f'palette indices); colour-coded labels need encoding = "rgb" with an rgb_map'
                            )
                        raw = np.asarray(im)
        except DomainError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DomainError(f"cannot read label file {path} (domain {self.name!r}): {e}") from None
        if encoding == "channel":
            channels = 1 if raw.ndim == 2 else raw.shape[2]
            if self.label_spec.channel >= channels:
                raise DomainError(
                    f"label file {path} has {channels} channel(s); the descriptor {self.descriptor} asks "
                    f"for channel = {self.label_spec.channel}"
                )
            if raw.ndim == 3:
                raw = raw[..., self.label_spec.channel]
        return raw


def _scan(directory: Path, suffix: str) -> set[str]:
    """Names (relative path without ``suffix``, '/'-separated) of files under ``directory``."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # e.g. .da_seg caches
        rel = os.path.relpath(dirpath, directory)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        for f in filenames:
            if f.endswith(suffix) and not f.startswith("."):
                found.add(prefix + (f[: -len(suffix)] if suffix else f))
    return found


def missing_root_message(domain: Domain) -> str:
    env = os.environ.get("DA_SEG_DATA")
    base = f"$DA_SEG_DATA={env}" if env else f"$DA_SEG_DATA is unset, so {Path.cwd() / 'data'}"
    return (
        f"dataset root of domain {domain.name!r} not found: {domain.root}\n"
        f"  (root in {domain.descriptor}; a relative root resolves against $DA_SEG_DATA; here {base})\n"
        f"  expected layout under the root: {domain.layout or '(not given)'}\n"
        f"  set $DA_SEG_DATA to the folder holding your datasets, or see datasets/README.md"
    )


# ---------------------------------------------------------------------------------------------
# Descriptor lookup and parsing


def descriptor_dirs() -> list[Path]:
    """Where domain names are looked up, in order: $DA_SEG_DATASETS, ./datasets, then the
    descriptors da_seg ships (the checkout's ``datasets/``, or the installed package's copy)."""
    dirs = [Path(p).expanduser() for p in os.environ.get("DA_SEG_DATASETS", "").split(os.pathsep) if p]
    dirs.append(Path.cwd() / "datasets")
    shipped = shipped_dir("datasets")
    if shipped is not None:
        dirs.append(shipped)
    return dirs


def available_domains() -> dict[str, Path]:
    """Domain name -> descriptor path; earlier directories in :func:`descriptor_dirs` win."""
    found: dict[str, Path] = {}
    for d in descriptor_dirs():
        if d.is_dir():
            for path in sorted(d.glob("*.toml")):
                found.setdefault(path.stem, path)
    return found


def load_domain(name_or_path: str | Path) -> Domain:
    """A domain by name (see :func:`descriptor_dirs`) or by the path of a ``.toml`` descriptor."""
    text = str(name_or_path)
    if text.endswith(".toml"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise DomainError(f"domain descriptor file not found: {path.absolute()}")
        return parse_descriptor(path)
    domains = available_domains()
    if text not in domains:
        close = difflib.get_close_matches(text, domains, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DomainError(
            f"unknown domain {text!r}.{hint} Valid domains: {', '.join(sorted(domains)) or '(none)'} "
            f"(descriptors found in: {', '.join(str(d) for d in descriptor_dirs())})"
        )
    return parse_descriptor(domains[text])


def resolve_root(root: str) -> Path:
    """Absolute roots stay; relative ones resolve against $DA_SEG_DATA, default ./data."""
    path = Path(root).expanduser()
    if path.is_absolute():
        return path
    base = os.environ.get("DA_SEG_DATA")
    base_path = Path(base).expanduser() if base else Path("data")
    return (base_path / path).absolute()


def _check_keys(table: Mapping[str, Any], valid: tuple[str, ...], where: str, descriptor: Path) -> None:
    for key in table:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise DomainError(
                f"{descriptor}: unknown key {key!r} in {where}{hint} Valid keys there: {', '.join(valid)}"
            )


class _Reader:
    """Typed access to descriptor values, with errors that name the file and the key."""

    def __init__(self, descriptor: Path):
        self.descriptor = descriptor

    def fail(self, key: str, message: str) -> DomainError:
        return DomainError(f"{self.descriptor}: {key} {message}")

    def get(self, table: Mapping[str, Any], key: str, kind, where: str, default=None, required=False):
        if key not in table:
            if required:
                raise self.fail(f"{where}{key}", "is required")
            return default
        value = table[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(f"{where}{key}", f"must be a {names}, got {value!r}")
        return value

    def color(self, value, key: str) -> tuple[int, int, int]:
        if (
            not isinstance(value, list)
            or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)
        ):
            raise self.fail(key, f"must be [r, g, b] with 0..255 integers, got {value!r}")
        return tuple(value)

    def class_id(self, value, key: str, num_classes: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not (
            0 <= value < num_classes or value == IGNORE_INDEX
        ):
            raise self.fail(key, f"must be a train id in 0..{num_classes - 1} or 255, got {value!r}")
        return value

    def raw_value(self, value, key: str) -> int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise self.fail(key, f"must be an integer label value, got {value!r}") from None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 65536:
            raise self.fail(key, f"must be an integer label value in 0..65535, got {value!r}")
        return value


def parse_descriptor(path: Path) -> Domain:
    """Read and validate one descriptor file."""
    path = Path(path).absolute()
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise DomainError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise DomainError(f"cannot read domain descriptor {path}: {e}") from None
    rd = _Reader(path)
    _check_keys(data, TOP_KEYS, "the top level", path)

    name = rd.get(data, "name", str, "", default=path.stem)
    if name != path.stem:
        raise rd.fail("name", f"is {name!r} but the file is {path.name}; name must equal the file stem")
    root = rd.get(data, "root", str, "", required=True)
    layout = rd.get(data, "layout", str, "", default="")
    description = rd.get(data, "description", str, "", default="")
    generator = rd.get(data, "generator", str, "", default="")

    classes = rd.get(data, "classes", dict, "", required=True)
    _check_keys(classes, CLASSES_KEYS, "[classes]", path)
    class_names, colors = _parse_classes(classes, rd)
    num_classes = len(class_names)
    subsets = {}
    for subset, ids in rd.get(classes, "subsets", dict, "classes.", default={}).items():
        if not isinstance(ids, list) or not ids:
            raise rd.fail(f"classes.subsets.{subset}", f"must be a non-empty list of train ids, got {ids!r}")
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_classes:
                raise rd.fail(
                    f"classes.subsets.{subset}", f"has {i!r}, not a train id in 0..{num_classes - 1}"
                )
        subsets[subset] = tuple(ids)

    label = _parse_label(rd.get(data, "label", dict, "", default={}), rd, num_classes)

    splits_table = rd.get(data, "splits", dict, "", required=True)
    if not splits_table:
        raise rd.fail("[splits]", "must define at least one split, e.g. [splits.train]")
    split_specs = {}
    for split, table in splits_table.items():
        if not isinstance(table, dict):
            raise rd.fail(f"splits.{split}", f"must be a table ([splits.{split}]), got {table!r}")
        split_specs[split] = _parse_split(split, table, rd)

    return Domain(
        name=name,
        root=resolve_root(root),
        descriptor=path,
        class_names=class_names,
        colors=colors,
        class_subsets=subsets,
        layout=layout,
        description=description,
        generator=generator,
        label=label,
        split_specs=split_specs,
    )


def _parse_classes(classes: Mapping[str, Any], rd: _Reader):
    preset = rd.get(classes, "preset", str, "classes.")
    names = rd.get(classes, "names", list, "classes.")
    colors = rd.get(classes, "colors", list, "classes.")
    if preset is not None:
        if names is not None or colors is not None:
            raise rd.fail("[classes]", "gives both preset and names/colors; give one or the other")
        if preset not in CLASS_PRESETS:
            close = difflib.get_close_matches(preset, CLASS_PRESETS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise rd.fail(
                "classes.preset",
                f"is {preset!r}, not a built-in preset{hint}; valid: {', '.join(CLASS_PRESETS)}",
            )
        chosen = CLASS_PRESETS[preset]
        return chosen.names, chosen.colors
    if names is None:
        raise rd.fail("[classes]", "needs either preset = \"...\" or names = [...] (with colors = [...])")
    if not names or not all(isinstance(n, str) for n in names):
        raise rd.fail("classes.names", f"must be a non-empty list of strings, got {names!r}")
    if len(names) > 255:
        raise rd.fail("classes.names", "has more than 255 classes; train ids are stored as uint8")
    if colors is None:
        raise rd.fail("classes.colors", f"is required with names ({len(names)} [r, g, b] entries)")
    if len(colors) != len(names):
        raise rd.fail("classes.colors", f"has {len(colors)} entries but names has {len(names)}")
    parsed = tuple(rd.color(c, f"classes.colors[{i}]") for i, c in enumerate(colors))
    _warn_shared_colors(names, parsed, rd)
    return tuple(names), parsed


def _warn_shared_colors(names, colors, rd: _Reader) -> None:
    # Only a warning: colours are for display, training is unaffected; but rendered predictions
    # then cannot tell the classes apart, which is almost always a copy-paste slip.
    first_with: dict[tuple[int, int, int], int] = {}
    for i, color in enumerate(colors):
        if color in first_with:
            j = first_with[color]
            warnings.warn(
                f"{rd.descriptor}: classes.colors: classes {names[j]!r} ({j}) and {names[i]!r} ({i}) share "
                f"the display colour {list(color)}; rendered predictions cannot tell them apart",
            )
        else:
            first_with[color] = i


def _parse_label(table: Mapping[str, Any], rd: _Reader, num_classes: int) -> LabelSpec:
    _check_keys(table, LABEL_KEYS, "[label]", rd.descriptor)
    encoding = rd.get(table, "encoding", str, "label.", default="index")
    if encoding not in ENCODINGS:
        raise rd.fail("label.encoding", f"is {encoding!r}; valid: {', '.join(ENCODINGS)}")
    unknown = rd.get(table, "unknown", str, "label.", default="error")
    if unknown not in UNKNOWN_POLICIES:
        raise rd.fail("label.unknown", f"is {unknown!r}; valid: {', '.join(UNKNOWN_POLICIES)}")
    channel = rd.get(table, "channel", int, "label.", default=0)
    if "channel" in table and encoding != "channel":
        raise rd.fail("label.channel", f'only applies to encoding = "channel" (encoding is {encoding!r})')
    if channel < 0:
        raise rd.fail("label.channel", f"must be >= 0, got {channel}")
    ignore = rd.get(table, "ignore_values", list, "label.", default=[])

    if encoding == "rgb":
        if "id_map" in table:
            raise rd.fail(
                "label.id_map", 'does not apply to encoding = "rgb"; use rgb_map = [[r, g, b, train_id], ...]'
            )
        entries = rd.get(table, "rgb_map", list, "label.", required=True)
        rgb_map = []
        for i, entry in enumerate(entries):
            key = f"label.rgb_map[{i}]"
            if not isinstance(entry, list) or len(entry) != 4:
                raise rd.fail(key, f"must be [r, g, b, train_id], got {entry!r}")
            rgb_map.append((rd.color(entry[:3], key), rd.class_id(entry[3], key, num_classes)))
        ignore_values = tuple(rd.color(c, f"label.ignore_values[{i}]") for i, c in enumerate(ignore))
        _check_rgb_contradictions(rgb_map, ignore_values, rd)
        return LabelSpec(num_classes, encoding, 0, None, tuple(rgb_map), ignore_values, unknown)

    if "rgb_map" in table:
        raise rd.fail("label.rgb_map", f'only applies to encoding = "rgb" (encoding is {encoding!r})')
    id_map = None
    keys: list[str] = []  # the keys as written, for messages
    if "id_map" in table:
        raw_map = rd.get(table, "id_map", dict, "label.")
        keys = list(raw_map)
        id_map = tuple(
            (rd.raw_value(k, f"label.id_map key {k!r}"), rd.class_id(v, f"label.id_map.{k}", num_classes))
            for k, v in raw_map.items()
        )
    ignore_values = tuple(rd.raw_value(v, f"label.ignore_values[{i}]") for i, v in enumerate(ignore))
    _check_index_contradictions(id_map, keys, ignore_values, num_classes, rd)
    return LabelSpec(num_classes, encoding, channel, id_map, (), ignore_values, unknown)


# A mapping that sends one raw value to two places is resolved silently by the lookup tables
# (the later rgb_map entry wins, ignore_values overrides id_map, raw 255 is always ignored), so
# a class would vanish from training and scoring while `da-seg prepare check` saw nothing wrong.
# Such descriptors fail at load. Repeating an entry with the same target is redundant, not
# contradictory, and passes.


def _check_rgb_contradictions(rgb_map, ignore_values, rd: _Reader) -> None:
    """rgb_map: [((r, g, b), train_id)], in file order; ignore_values: [(r, g, b)]."""
    first: dict[tuple[int, int, int], int] = {}  # colour -> index of its first rgb_map entry
    for i, (color, train_id) in enumerate(rgb_map):
        j = first.setdefault(color, i)
        if rgb_map[j][1] != train_id:
            raise rd.fail(
                "label.rgb_map:",
                f"colour {list(color)} is mapped to train ids {rgb_map[j][1]} and {train_id} "
                f"(entries {j} and {i})",
            )
    for i, color in enumerate(ignore_values):
        j = first.get(color)
        if j is not None and rgb_map[j][1] != IGNORE_INDEX:
            raise rd.fail(
                "label.ignore_values:",
                f"colour {list(color)} (entry {i}) is also label.rgb_map[{j}] -> {rgb_map[j][1]}; "
                f"a colour is either mapped or ignored",
            )


def _check_index_contradictions(id_map, keys: list[str], ignore_values, num_classes: int,
                                rd: _Reader) -> None:
    """id_map: ((raw, train_id), ...) in file order, or None for the identity; keys: its keys
    as written (TOML keys are strings, so "7" and "07" are two keys but one raw value)."""
    first: dict[int, int] = {}  # raw value -> index of its first id_map entry
    for i, (raw, train_id) in enumerate(id_map or ()):
        j = first.setdefault(raw, i)
        if id_map[j][1] != train_id:
            raise rd.fail(
                "label.id_map:",
                f'keys "{keys[j]}" and "{keys[i]}" are both raw value {raw}, mapped to train ids '
                f"{id_map[j][1]} and {train_id}",
            )
        if raw == IGNORE_INDEX and train_id != IGNORE_INDEX:
            raise rd.fail(
                "label.id_map:",
                f'key "{keys[i]}" -> {train_id}, but raw value {IGNORE_INDEX} always means ignore',
            )
    for i, raw in enumerate(ignore_values):
        if id_map is None:
            if raw < num_classes:
                raise rd.fail(
                    "label.ignore_values:",
                    f"raw value {raw} (entry {i}) is train id {raw} under the identity mapping (there is "
                    f"no label.id_map), so ignoring it would remove that class; to drop a class, give an "
                    f"id_map that maps it to {IGNORE_INDEX}",
                )
            continue
        j = first.get(raw)
        if j is not None and id_map[j][1] != IGNORE_INDEX:
            raise rd.fail(
                "label.ignore_values:",
                f'raw value {raw} is also label.id_map key "{keys[j]}" -> {id_map[j][1]}; '
                f"a raw value is either mapped or ignored",
            )


def _parse_split(split: str, table: Mapping[str, Any], rd: _Reader) -> SplitSpec:
    _check_keys(table, SPLIT_KEYS, f"[splits.{split}]", rd.descriptor)
    where = f"splits.{split}."
    missing_label = rd.get(table, "missing_label", str, where, default="error")
    if missing_label not in MISSING_LABEL_POLICIES:
        raise rd.fail(
            f"{where}missing_label", f"is {missing_label!r}; valid: {', '.join(MISSING_LABEL_POLICIES)}"
        )
    exclude = rd.get(table, "exclude", list, where, default=[])
    if not all(isinstance(e, str) for e in exclude):
        raise rd.fail(f"{where}exclude", f"must be a list of image names (strings), got {exclude!r}")
    return SplitSpec(
        images=rd.get(table, "images", str, where, required=True),
        image_suffix=rd.get(table, "image_suffix", str, where, default=".png"),
        labels=rd.get(table, "labels", str, where),
        label_suffix=rd.get(table, "label_suffix", str, where, default=".png"),
        list=rd.get(table, "list", str, where, default=""),
        missing_label=missing_label,
        exclude=tuple(exclude),
    )
