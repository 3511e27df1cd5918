"""Method registry: every component a recipe can list under [components.<name>]."""
from __future__ import annotations

from typing import Any

from da_seg.methods.adversarial import AdaptSegNet, AdvEnt
from da_seg.methods.base import Component, ComponentSetup, parse_options
from da_seg.methods.cbst import PseudoLabelCE
from da_seg.methods.entropy import MinEnt
from da_seg.methods.generalization import InstanceSelectiveWhitening, SanSaw
from da_seg.methods.self_training import MeanTeacher
from da_seg.methods.source import SourceCE, TargetBatchNorm, TargetCE
from da_seg.methods.style import FDA, CycleGAN

METHODS: dict[str, type[Component]] = {
    SourceCE.name: SourceCE,
    TargetCE.name: TargetCE,
    TargetBatchNorm.name: TargetBatchNorm,
    AdaptSegNet.name: AdaptSegNet,
    AdvEnt.name: AdvEnt,
    MinEnt.name: MinEnt,
    MeanTeacher.name: MeanTeacher,
    PseudoLabelCE.name: PseudoLabelCE,
    SanSaw.name: SanSaw,
    InstanceSelectiveWhitening.name: InstanceSelectiveWhitening,
    FDA.name: FDA,
    CycleGAN.name: CycleGAN,
}


def build_components(table: dict[str, dict[str, Any]], setup: ComponentSetup,
                     source: str = "recipe") -> list[Component]:
    """Instantiate the recipe's components in the order they are listed."""
    if not table:
        raise KeyError(f"{source}: the recipe lists no [components]; valid: {', '.join(sorted(METHODS))}")
    components = []
    for name, raw in table.items():
        if name not in METHODS:
            raise KeyError(f"{source}: unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
        cls = METHODS[name]
        components.append(cls(parse_options(cls, raw or {}, source), setup))
    return components
