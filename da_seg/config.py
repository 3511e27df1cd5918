"""Recipes: TOML files -> frozen dataclasses.

A recipe may ``extends = "other.toml"`` (a path relative to the recipe; bases may extend further) and is then
deep-merged over its base; ``--set a.b=value`` overrides are applied last (values parsed as
TOML literals, so ``--set optim.lr=1e-3`` is a float and ``--set data.source=gta5`` a string).
Unknown keys fail with the closest valid key, because a typo in a recipe silently running
the default is the most expensive bug a training suite can have.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from da_seg.utils.tomlio import dumps_toml
from da_seg.utils.windows import check_windows


class ConfigError(ValueError):
    """A recipe that cannot be used as written; the message names the key and the file."""


class UnknownNameError(ConfigError, KeyError):
    """A name (method, stage, model) that is not in its registry; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would print the message as a quoted repr
        return str(self.args[0]) if self.args else ""


class OptionError(ConfigError):
    """An invalid value, raised by a settings dataclass's own check; ``key`` is relative to its table.

    Whoever reads the table adds where it is (``_build``: ``<file>: augment.source.<key> ...``;
    ``parse_options``: ``<file>: components.<method>.<key> ...``), so a dataclass need not know
    which recipe, or which of several tables of its kind, it belongs to.
    """

    def __init__(self, key: str, detail: str):
        super().__init__(f"{key} {detail}")
        self.key, self.detail = key, detail


# Bounds on sizes that a typo makes absurd. Segmentation DA trains on a few images per domain and
# GPU (AdaptSegNet and ADVENT 1, DAFormer 2); 1024 crops of even 256x256 are 200 MB of uint8
# input before any activation, so a larger batch is an extra digit, not a setting, and would
# start a run that can only die of memory.
MAX_BATCH_SIZE = 1024
# The largest images in use are 6000x6000 Potsdam tiles; at 16384x16384 the float logits of 19
# classes alone are 20 GB, so a larger side is a typo that would only fail once it is allocated.
MAX_IMAGE_SIDE = 16384


def _shown(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _refuse(key: str, value: Any, expected: str):
    raise OptionError(key, f"= {_shown(value)!r}; {expected}")


def _count(key: str, value: int, least: int, what: str, most: int | None = None) -> None:
    """An integer setting in ``least..most``; ``what`` is counted (``"iterations"``)."""
    if value < least or (most is not None and value > most):
        bound = (f"{least} to {most}" if most is not None else
                 "a positive number of" if least == 1 else f"{least} or more")
        _refuse(key, value, f"expected {bound} {what}")


def _nonnegative(key: str, value: float, what: str) -> None:
    if not 0 <= value < math.inf:  # written with `not` so that nan fails too
        _refuse(key, value, f"expected {what} >= 0")


def _between(key: str, value: float, low: float, high: float, what: str, open_low: bool = False,
             open_high: bool = False) -> None:
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if not (above and below):
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        _refuse(key, value, f"expected {what} in {interval}")


def _choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        _refuse(key, value, f"valid: {', '.join(map(repr, valid))}")


def _image_size(key: str, value: tuple[int, int] | None) -> None:
    """An optional (H, W) in pixels."""
    if value is not None and not all(1 <= v <= MAX_IMAGE_SIDE for v in value):
        _refuse(key, value, f"expected [height, width] with both in 1..{MAX_IMAGE_SIDE} pixels")


def _range(key: str, value: tuple[float, float], what: str) -> None:
    """A (min, max) of positive numbers."""
    low, high = value
    if not (0 < low <= high < math.inf):
        _refuse(key, value, f"expected [min, max] {what} with 0 < min <= max")


@dataclass(frozen=True)
class DataConfig:
    source: str = ""                      # domain name (datasets/<name>.toml) or descriptor path
    target: str = ""                      # unlabelled target domain; "" for domain generalization
    source_split: str = "train"
    target_split: str = "train"
    val_domains: tuple[str, ...] = ()     # evaluated domains; default: (target,)
    val_split: str = "val"
    source_size: tuple[int, int] | None = None   # (H, W) resize on load; None keeps the file's size
    target_size: tuple[int, int] | None = None
    val_size: tuple[int, int] | None = None      # resize val images *and* labels on load (cheap evaluation)
    batch_size: int = 8                   # per domain and per process
    num_workers: int = 2
    sampler: str = "random"               # "random" | "rare_class" (source only, DAFormer)
    rare_class_temperature: float = 0.01
    rare_class_min_pixels: int = 3000
    # Target importance sampling (SAC): per-image predicted class pixel counts (JSON, written by the
    # warm_start stage) and the uniform prior mixed in; None = uniform sampling (and no identity change).
    target_sample_weights: str | None = None
    target_uniform_prior: float | None = None
    # > 0: a rare-class sample's crop is redrawn (up to 9 times) until it holds more than
    # min_pixels x this many pixels of the drawn class (DAFormer 0.5, HRDA 2.0); 0 = off.
    rare_class_min_crop_ratio: float = 0.0
    # Target pixels (top, bottom, left, right, at the loaded size) whose pseudo-labels get weight 0,
    # cut out before the crop so that only crops at the image's edge lose them (HRDA: 30, 240, 30, 30).
    target_pseudo_margins: tuple[int, int, int, int] = (0, 0, 0, 0)

    def __post_init__(self):
        for key in ("source_size", "target_size", "val_size"):
            _image_size(key, getattr(self, key))
        _count("batch_size", self.batch_size, 1, "images per domain and process", MAX_BATCH_SIZE)
        _count("num_workers", self.num_workers, 0, "loader workers (0 loads in the main process)")
        _choice("sampler", self.sampler, ("random", "rare_class"))
        if not 0 < self.rare_class_temperature < math.inf:  # the rare-class sampler divides by it
            _refuse("rare_class_temperature", self.rare_class_temperature, "expected a temperature > 0")
        _count("rare_class_min_pixels", self.rare_class_min_pixels, 0, "pixels")
        if self.target_uniform_prior is not None:
            _between("target_uniform_prior", self.target_uniform_prior, 0, 1, "a probability")
        _nonnegative("rare_class_min_crop_ratio", self.rare_class_min_crop_ratio, "a ratio (0 = off)")
        margins = self.target_pseudo_margins
        if len(margins) != 4 or any(not isinstance(m, int) or isinstance(m, bool) or m < 0 for m in margins):
            _refuse("target_pseudo_margins", margins, "expected [top, bottom, left, right] pixel counts >= 0")


@dataclass(frozen=True)
class AugmentConfig:
    """GPU augmentation of one domain's batches (see da_seg/data/augment.py)."""

    crop: tuple[int, int] | None = None   # (H, W) random crop; labels padded with ignore
    scale: tuple[float, float] = (1.0, 1.0)  # random rescale factor range before cropping
    flip: bool = True
    brightness: float = 0.0               # colour jitter strengths (kornia ColorJitter)
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    color_p: float = 0.8
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.15, 1.15)
    grayscale_p: float = 0.0

    def __post_init__(self):
        _image_size("crop", self.crop)
        _range("scale", self.scale, "rescale factors")
        for key in ("brightness", "contrast", "saturation"):
            _nonnegative(key, getattr(self, key), "a jitter strength")
        # kornia shifts the hue by up to +-hue of the colour circle and refuses more than half of it.
        _between("hue", self.hue, 0, 0.5, "a hue jitter strength")
        for key in ("color_p", "blur_p", "grayscale_p"):
            _between(key, getattr(self, key), 0, 1, "a probability")
        _range("blur_sigma", self.blur_sigma, "blur sigmas")


@dataclass(frozen=True)
class AugmentPair:
    source: AugmentConfig = field(default_factory=AugmentConfig)
    target: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "deeplab_small"
    pretrained: str = ""                  # a weight file the user names; "" = random init
    init_checkpoint: str = ""             # a da_seg checkpoint (last.pt / best.pt) to start from (self-training rounds)
    align_corners: bool = False           # logits upsampling: ADVENT / AdaptSegNet / DACS code True, mmseg False
    options: dict[str, Any] = field(default_factory=dict)  # builder keyword options
    channels_last: bool = False


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"                     # "sgd" | "adamw" | "adam"
    lr: float = 2.5e-4
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    head_lr_mult: float = 10.0
    grad_clip: float = 0.0                # max global grad norm; 0 = off

    def __post_init__(self):
        _choice("name", self.name, ("sgd", "adamw", "adam"))
        # lr = 0 is legal: a recipe whose segmenter does not train (a translator stage).
        for key, what in (("lr", "a learning rate"), ("weight_decay", "a weight decay"),
                          ("head_lr_mult", "an LR multiplier"), ("grad_clip", "a gradient norm (0 = off)")):
            _nonnegative(key, getattr(self, key), what)
        _between("momentum", self.momentum, 0, 1, "a momentum", open_high=True)
        if self.nesterov and self.momentum == 0 and self.name == "sgd":
            _refuse("nesterov", self.nesterov, "Nesterov SGD needs optim.momentum > 0")
        for beta in self.betas:
            if not 0 <= beta < 1:
                _refuse("betas", self.betas, "expected [beta1, beta2] with both in [0, 1)")


@dataclass(frozen=True)
class ScheduleConfig:
    iters: int = 1000                     # iterations to train (the early stop of the official codes)
    poly_iters: int = 0                   # length of the poly decay; 0 = iters (AdaptSegNet: 250k, stop 150k)
    poly_power: float = 0.9
    warmup_iters: int = 0                 # linear warm-up from warmup_ratio * lr
    warmup_ratio: float = 1e-6

    def __post_init__(self):
        _count("iters", self.iters, 1, "iterations")
        # poly_iters < iters is legal: AdaptSegNet decays over 250k iterations and stops at 150k.
        _count("poly_iters", self.poly_iters, 0, "iterations (0 decays over schedule.iters)")
        # A negative power divides by zero at the last iteration, after the whole run trained.
        _nonnegative("poly_power", self.poly_power, "a power (0 keeps the LR constant)")
        _count("warmup_iters", self.warmup_iters, 0, "iterations")
        _between("warmup_ratio", self.warmup_ratio, 0, 1, "the starting fraction of the LR", open_low=True)


TRACKERS = ("tensorboard", "mlflow", "wandb")  # the writers of da_seg.engine.logging.RunLogger


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    amp: str = "auto"                     # "auto" (bf16 on CUDA, off on CPU) | "bf16" | "fp16" | "off"
    log_every: int = 50
    eval_every: int = 500
    checkpoint_every: int = 500
    deterministic: bool = False
    compile: bool = False                 # torch.compile the segmenter (CUDA)
    # Where the run's scalars, images and HParams go (da_seg.engine.logging); leaves the identity alone.
    trackers: tuple[str, ...] = ("tensorboard",)

    def __post_init__(self):
        for tracker in self.trackers:
            _choice("trackers", tracker, TRACKERS)
        if len(set(self.trackers)) != len(self.trackers):
            _refuse("trackers", list(self.trackers), "expected each tracker once")
        if not 0 <= self.seed < 2**32 - 1024:  # NumPy seeds are 32-bit unsigned; each process adds its rank
            _refuse("seed", self.seed, "expected a seed in 0..2**32 - 1025")
        _choice("amp", self.amp, ("auto", "bf16", "fp16", "off"))
        for key in ("log_every", "eval_every", "checkpoint_every"):
            _count(key, getattr(self, key), 1, "iterations")


@dataclass(frozen=True)
class EvalConfig:
    mode: str = "whole"                   # "whole" | "slide"
    input_size: tuple[int, int] | None = None  # resize the network input (labels stay full size)
    crop: tuple[int, int] | None = None   # sliding window size
    stride: tuple[int, int] | None = None
    window_batch: int = 1                 # "slide": windows per forward (mmseg batched_slide; bounds memory)
    flip: bool = False
    batch_size: int = 1
    adabn: bool = False                   # recompute BatchNorm statistics on target train images first
    adabn_batches: int = 50
    max_panels: int = 4
    alignment_images: int = 16          # per domain, for the source/target alignment picture; 0 = off

    def __post_init__(self):
        _choice("mode", self.mode, ("whole", "slide"))
        _image_size("input_size", self.input_size)
        _count("batch_size", self.batch_size, 1, "images", MAX_BATCH_SIZE)
        _count("window_batch", self.window_batch, 1, "sliding windows per forward pass")
        if self.adabn:
            _count("adabn_batches", self.adabn_batches, 1, "batches (eval.adabn = true)")
        _count("max_panels", self.max_panels, 0, "panels")
        _count("alignment_images", self.alignment_images, 0, "images per domain (0 = off)")
        if self.mode == "slide":
            if self.crop is None:
                raise ConfigError("eval.mode = 'slide' needs eval.crop = [h, w] (and optionally eval.stride)")
            try:  # fail when the recipe loads, not at the first evaluation
                check_windows(self.crop, self.stride or self.crop)
            except ValueError as err:
                raise ConfigError(str(err)) from None


@dataclass(frozen=True)
class Recipe:
    name: str = ""
    description: str = ""
    reference: str = ""                   # where the hyper-parameters and the aimed-at number come from
    stage: str = "train"                  # what runs the recipe (da_seg.stages.STAGES): train | translate | self_train
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentPair = field(default_factory=AugmentPair)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    components: dict[str, dict[str, Any]] = field(default_factory=dict)  # method name -> options
    # The table named after the stage ([translate], [self_train]); the stage checks its keys.
    stage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def val_domains(self) -> tuple[str, ...]:
        return self.data.val_domains or ((self.data.target,) if self.data.target else ())

    @property
    def pair(self) -> str:
        """The folder name grouping comparable runs: ``<source>_to_<target>``."""
        target = self.data.target or "unseen"
        return f"{_short(self.data.source)}_to_{_short(target)}"

    def to_dict(self) -> dict[str, Any]:
        """The recipe as TOML tables: the stage's options under the stage's own name."""
        data = dataclasses.asdict(self)
        options = data.pop("stage_options")
        if options:
            data[self.stage] = options
        return data


def _short(domain: str) -> str:
    return Path(domain).stem if domain.endswith(".toml") else domain


# ---------------------------------------------------------------------------- loading

def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file, resolve ``extends`` and ``--set`` overrides, validate every key."""
    path = Path(path)
    raw = _read_with_bases(path, ())
    raw.setdefault("name", path.stem)
    for override in overrides:
        apply_override(raw, override)
    # `source_ce = false` under [components] removes a component a base recipe listed.
    raw["components"] = {k: v for k, v in raw.get("components", {}).items() if v is not False}
    return recipe_from_dict(raw, source=str(path))


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """A recipe's table deep-merged over its ``extends`` chain (each path relative to its file).

    The name and description belong to the file itself and are not inherited.
    """
    raw = _read_toml(path)
    if "extends" not in raw:
        return raw
    base_path = (path.parent / raw.pop("extends")).resolve()
    chain = (*chain, path.resolve())
    if base_path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, base_path))
        raise ConfigError(f"{path}: extends forms a cycle: {cycle}")
    if not base_path.is_file():
        raise ConfigError(f"{path}: extends {base_path}, which does not exist")
    base = _read_with_bases(base_path, chain)
    base.pop("name", None)
    base.pop("description", None)
    return deep_merge(base, raw)


def recipe_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Recipe:
    raw = dict(raw)
    stage = raw.get("stage", "train")
    if not isinstance(stage, str):
        raise ConfigError(f"{source}: stage must be a string (a name of da_seg.stages.STAGES), got {stage!r}")
    own_fields = {f.name for f in dataclasses.fields(Recipe)}
    if stage not in own_fields and stage in raw:
        options = raw.pop(stage)
        if not isinstance(options, dict):
            raise ConfigError(f"{source}: [{stage}] must be a table of the {stage} stage's options, got {options!r}")
        raw["stage_options"] = options
    elif "stage_options" in raw:
        raise ConfigError(f"{source}: unknown key 'stage_options'; a stage's options go in a table named after "
                          f"the stage ([{stage}])")
    recipe = _build(Recipe, raw, prefix="", source=source)
    for key in ("source", "target"):
        value = getattr(recipe.data, key)
        if key == "source" and not value:
            raise ConfigError(f"{source}: data.source is empty; name a source domain (see `da-seg list domains`)")
    return recipe


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_value(text: str) -> Any:
    """``--set`` values are TOML literals; anything that is not one is taken as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key.sub=value")
    dotted, text = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is a value, not a table")
    node[keys[-1]] = parse_value(text.strip())


def closest(key: str, valid: list[str], prefix: str = "") -> str:
    """'; did you mean ...?' for the closest valid key, else the list of valid keys."""
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if match:
        return f"; did you mean {prefix + match[0]!r}?"
    return f"; valid keys: {', '.join(sorted(valid))}"


def check_keys(given: dict[str, Any], valid: list[str], where: str, source: str) -> None:
    for key in given:
        if key not in valid:
            raise ConfigError(f"{source}: unknown key {where + key!r}{closest(key, valid, where)}")


def _build(cls: type, raw: dict[str, Any], prefix: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'recipe'} must be a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(raw, list(fields), prefix, source)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name, source)
    try:
        return cls(**kwargs)
    except OptionError as err:  # a value check of the dataclass itself: name the file and the table
        raise ConfigError(f"{source}: {prefix}{err.key} {err.detail}") from None
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _coerce(hint: Any, value: Any, key: str, source: str) -> Any:
    """Check ``value`` against the field's type hint, converting lists to tuples."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", source)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key, source)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else ConfigError(f"{source}: {key} = {value!r} has the wrong type")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, key, source) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{source}: {key} must have {len(args)} entries, got {list(value)!r}")
        return tuple(_coerce(a, v, key, source) for a, v in zip(args, value))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a table, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{source}: {key} must be {hint.__name__}, got {value!r}")
        return value
    return value


# ---------------------------------------------------------------------------- writing

def to_toml(data: dict[str, Any]) -> str:
    """A resolved recipe (``Recipe.to_dict()``) as TOML that ``load_recipe`` reads back; None is omitted."""
    return dumps_toml(data)


# Keys that may change between a run and its resume without changing what is trained; they are
# left out of a run's identity too (as is the seed, which is one axis of a comparison).
RESUME_SAFE_KEYS = frozenset({"train.log_every", "data.num_workers", "eval.max_panels", "eval.alignment_images",
                              "description", "reference", "train.trackers"})
IDENTITY_EXCLUDED = RESUME_SAFE_KEYS | {"name", "train.seed"}


def recipe_identity(recipe: Recipe) -> str:
    """A short hash of everything the recipe trains: its resolved settings without its name, seed
    and the resume-safe keys. Two runs with one identity are seeds of the same experiment; runs of
    one recipe name with different identities (another ``--set``, an edited file) are variants."""
    data = recipe.to_dict()
    for dotted in IDENTITY_EXCLUDED:
        node, *rest = dotted.split(".")
        if rest:
            data.get(node, {}).pop(rest[0], None)
        else:
            data.pop(node, None)
    canonical = json.dumps(_plain(data), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:8]


def saved_identity(recipe_toml: Path) -> str | None:
    """The identity of a run's saved ``recipe.toml``; None when it is missing or unreadable
    (older da_seg versions wrote some recipes as invalid TOML)."""
    if not recipe_toml.is_file():
        return None
    try:
        return recipe_identity(recipe_from_dict(tomllib.loads(recipe_toml.read_text()), source=str(recipe_toml)))
    except (tomllib.TOMLDecodeError, ConfigError):
        return None


def _plain(value: Any) -> Any:
    """Tuples as lists and None dropped, as the TOML a run saves: a reloaded recipe hashes the same."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def recipe_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipe dicts."""
    keys = sorted(set(a) | set(b))
    out = []
    for key in keys:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += recipe_differences(va, vb, prefix + key + ".")
        elif _normalize(va) != _normalize(vb):
            out.append(prefix + key)
    return out


def _normalize(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
