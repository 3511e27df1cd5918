"""What a method is: a component of the one training loop.

A component never owns a loop and never calls ``backward()`` or ``optimizer.step()``:
- ``prepare_batches(ctx)``: optional; changes the step's batches in place before any forward
  (FDA's spectrum swap); components run it in recipe order;
- ``losses(ctx)``: weighted terms that train the segmenter, by name;
- ``side_losses(ctx)``: terms that train the component's *own* networks (a discriminator),
  computed after the segmenter step on detached outputs; the trainer backpropagates them and
  steps the component's optimizers;
- ``after_step(ctx)``: gradient-free updates (EMA teacher, bookkeeping); returns scalars to log;
- ``visuals(ctx)``: images to log at evaluation time, from the latest step.
A component that trains only its own networks (the CycleGAN translator) sets
``trains_segmenter = False``; with no component training it, the trainer neither steps nor
evaluates the segmenter.
Networks, optimizers and schedulers a component owns go in ``self.networks``,
``self.optimizers`` and ``self.schedulers``: the trainer moves, wraps, checkpoints and resumes
them, so AMP, DDP, checkpointing and LR logging stay generic.
"""
from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from da_seg.config import ConfigError, Recipe, check_keys
from da_seg.models.segmenter import SegmenterOutput


@dataclass
class DomainBatch:
    """An augmented batch: images (N, 3, H, W) float in [0, 1]; labels (N, H, W) int64 or None."""

    images: Tensor
    labels: Tensor | None = None
    indices: Tensor | None = None


@dataclass
class StepContext:
    """Everything one training step shares between components.

    The segmenter runs at most once per domain: ``source_out`` / ``target_out`` are computed on
    first use and cached, whatever the number of components reading them.
    """

    model: nn.Module
    iteration: int
    max_iters: int
    source: DomainBatch | None
    target: DomainBatch | None
    autocast: Callable[[], AbstractContextManager]
    _cache: dict[str, SegmenterOutput] = field(default_factory=dict)

    @property
    def source_out(self) -> SegmenterOutput:
        if "source" not in self._cache:
            if self.source is None:
                raise RuntimeError("a component read ctx.source_out but no component declared uses_source")
            self._cache["source"] = self.forward(self.source.images)
        return self._cache["source"]

    @property
    def target_out(self) -> SegmenterOutput:
        if "target" not in self._cache:
            if self.target is None:
                raise RuntimeError("a component read ctx.target_out but no component declared uses_target")
            self._cache["target"] = self.forward(self.target.images)
        return self._cache["target"]

    def forward(self, images: Tensor) -> SegmenterOutput:
        """An extra segmenter pass (mixed images ...); (N, 3, H, W) in [0, 1]."""
        with self.autocast():
            return self.model(images)


@dataclass
class ComponentSetup:
    """What a component may know when it is built."""

    recipe: Recipe
    num_classes: int
    ignore_index: int
    device: torch.device
    model: nn.Module          # the bare segmenter (not DDP-wrapped)
    class_names: tuple[str, ...] = ()


class Component:
    """Base class. Subclasses set ``name``, an options dataclass ``Options`` and what they use."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = type("Options", (), {})
    uses_source: ClassVar[bool] = False
    uses_target: ClassVar[bool] = False
    uses_target_labels: ClassVar[bool] = False
    trains_segmenter: ClassVar[bool] = True

    def __init__(self, options: Any, setup: ComponentSetup):
        self.options = options
        self.setup = setup
        self.networks: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}

    def prepare_batches(self, ctx: StepContext) -> None:
        """Change ``ctx.source`` / ``ctx.target`` images in place before any forward (no grad)."""

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        return {}

    def side_losses(self, ctx: StepContext) -> dict[str, Tensor]:
        return {}

    def after_step(self, ctx: StepContext) -> dict[str, Tensor | float]:
        return {}

    def visuals(self, ctx: StepContext) -> dict[str, Tensor]:
        """Images to log at each evaluation, from the latest training step: tag -> uint8 (3, H, W)
        (pseudo-labels and their confidence masks, translated images ...)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Extra state beyond the registered networks/optimizers/schedulers."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def parse_options(cls: type[Component], raw: dict[str, Any], source: str = "recipe"):
    """Build ``cls.Options`` from a recipe table; unknown keys fail with the closest valid one."""
    valid = [f.name for f in dataclasses.fields(cls.Options)]
    check_keys(raw, valid, f"components.{cls.name}.", source)
    try:
        return cls.Options(**raw)
    except TypeError as err:
        raise ConfigError(f"{source}: components.{cls.name}: {err}") from err
