"""Method registry: every component a recipe can list under [components.<name>]."""
from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

from da_seg.config import ConfigError, Recipe, UnknownNameError
from da_seg.methods.adversarial import AdaptSegNet, AdvEnt
from da_seg.methods.base import Component, ComponentSetup, parse_options
from da_seg.methods.cbst import PseudoLabelCE
from da_seg.methods.cyclegan import CycleGAN
from da_seg.methods.entropy import MinEnt
from da_seg.methods.fda import FDA
from da_seg.methods.isw import InstanceSelectiveWhitening
from da_seg.methods.masking import MaskedImageConsistency
from da_seg.methods.san_saw import SanSaw
from da_seg.methods.self_training import MeanTeacher
from da_seg.methods.source import SourceCE, TargetBatchNorm, TargetCE

METHODS: dict[str, type[Component]] = {
    SourceCE.name: SourceCE,
    TargetCE.name: TargetCE,
    TargetBatchNorm.name: TargetBatchNorm,
    AdaptSegNet.name: AdaptSegNet,
    AdvEnt.name: AdvEnt,
    MinEnt.name: MinEnt,
    MeanTeacher.name: MeanTeacher,
    MaskedImageConsistency.name: MaskedImageConsistency,
    PseudoLabelCE.name: PseudoLabelCE,
    SanSaw.name: SanSaw,
    InstanceSelectiveWhitening.name: InstanceSelectiveWhitening,
    FDA.name: FDA,
    CycleGAN.name: CycleGAN,
}


def method_class(name: str, source: str = "recipe") -> type[Component]:
    if name not in METHODS:
        raise UnknownNameError(f"{source}: unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def validate(recipe: Recipe, source: str | None = None) -> dict[str, Any]:
    """Parse every component table of ``recipe`` (names and option values); returns name -> options.

    Runs when a recipe is loaded, before any network is built, so that a recipe whose components
    cannot be built never starts a run.
    """
    source = source or recipe.name
    if not recipe.components:
        raise ConfigError(f"{source}: the recipe lists no [components]; valid: {', '.join(sorted(METHODS))}")
    parsed = {}
    for name, raw in recipe.components.items():
        cls = method_class(name, source)
        if cls.stage and cls.stage != recipe.stage:
            raise ConfigError(f"{source}: components.{name} runs in the {cls.stage} stage only; set "
                              f"stage = \"{cls.stage}\" at the top of the recipe (it is stage = \"{recipe.stage}\")")
        parsed[name] = parse_options(cls, raw or {}, source)
    classes = {name: METHODS[name] for name in parsed}
    for name, options in parsed.items():
        try:
            classes[name].check_recipe(options, classes)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
    return parsed


def build_components(table: dict[str, dict[str, Any]], setup: ComponentSetup,
                     source: str = "recipe") -> list[Component]:
    """Instantiate the recipe's components in the order they are listed."""
    if not table:
        raise ConfigError(f"{source}: the recipe lists no [components]; valid: {', '.join(sorted(METHODS))}")
    components = []
    for name, raw in table.items():
        cls = method_class(name, source)
        options = parse_options(cls, raw or {}, source)
        try:
            components.append(cls(options, setup))
        except ConfigError as err:  # what only the built model can tell (missing DG blocks ...)
            raise ConfigError(f"{source}: {err}") from None
    return components


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    """One field of a method's options: name, type (as written), default ("required" when it has
    none) and the comment beside it in the source (what the value means, where it comes from)."""

    name: str
    type: str
    default: Any
    comment: str = ""


_TRAILING_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.*)$")


def method_options(cls: type[Component]) -> list[OptionInfo]:
    """The recipe keys of ``[components.<name>]`` for ``cls``, from its ``Options`` dataclass."""
    options_cls = cls.Options
    if not dataclasses.is_dataclass(options_cls):
        return []
    try:
        comments = {m.group(1): m.group(2).strip() for line in inspect.getsource(options_cls).splitlines()
                    if (m := _TRAILING_COMMENT.match(line))}
    except (OSError, TypeError):  # no source (a frozen application): names and defaults still tell
        comments = {}
    infos = []
    for f in dataclasses.fields(options_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "required"
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        infos.append(OptionInfo(f.name, kind, default, comments.get(f.name, "")))
    return infos
