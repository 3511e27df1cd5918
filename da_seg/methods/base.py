"""What a method is: a component of the one training loop.

A component never owns a loop and never calls ``backward()`` or ``optimizer.step()``:
- ``prepare_batches(ctx)``: optional; changes the step's batches in place before any forward
  (FDA's spectrum swap); components run it in recipe order;
- ``losses(ctx)``: weighted terms that train the segmenter, by name (none: the segmenter is not
  stepped, as for the CycleGAN translator, which trains only its own networks);
- ``side_losses(ctx)``: terms that train the component's *own* networks (a discriminator),
  computed after the segmenter step on detached outputs; the trainer backpropagates them and
  steps the component's optimizers;
- ``after_step(ctx)``: gradient-free updates (EMA teacher, bookkeeping); returns scalars to log;
- ``visuals(ctx)``: images to log at evaluation time, from the latest step.
Networks, optimizers and schedulers a component owns go in ``self.networks``,
``self.optimizers`` and ``self.schedulers``: the trainer moves, wraps, checkpoints and resumes
them, so AMP, DDP, checkpointing and LR logging stay generic.

A component sees a :class:`ComponentSetup` (classes, device, the bare segmenter, the schedule
length), never the recipe; its options are a frozen dataclass that checks every value when it
is built, so a recipe is validated when it is loaded (``da_seg.methods.validate``), before any
network exists.
"""
from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from da_seg.config import ConfigError, OptionError, check_keys
from da_seg.models.segmenter import SegmenterOutput


@dataclass
class DomainBatch:
    """An augmented batch: images (N, 3, H, W) float in [0, 1]; labels (N, H, W) int64 or None;
    valid (N, H, W) bool or None: pixels that may be pseudo-labelled (``data.target_pseudo_margins``)."""

    images: Tensor
    labels: Tensor | None = None
    indices: Tensor | None = None
    valid: Tensor | None = None


@dataclass
class PseudoLabels:
    """An EMA teacher's pseudo-labels of the step's target batch (before any mixing or masking).

    labels (N, H, W) int64 (argmax); confidence (N, H, W) float (max softmax); weights (N, H, W)
    float: DAFormer's confidence ratio q (one scalar per batch), 0 where the recipe ignores rows.
    """

    labels: Tensor
    confidence: Tensor
    weights: Tensor
    q: Tensor                    # 0-d: share of the batch's pixels with confidence >= threshold


@dataclass
class StepContext:
    """Everything one training step shares between components.

    The segmenter runs at most once per domain: ``source_out`` / ``target_out`` are computed on
    first use and cached, whatever the number of components reading them. Likewise the EMA
    teacher runs once: the component owning it sets ``pseudo_labeler`` in ``prepare_batches``,
    and every component that learns from its pseudo-labels (``mean_teacher``, ``mic``) reads
    ``ctx.target_pseudo``, computed on first use.
    """

    model: nn.Module
    iteration: int
    max_iters: int
    source: DomainBatch | None
    target: DomainBatch | None
    autocast: Callable[[], AbstractContextManager]
    _cache: dict[str, SegmenterOutput] = field(default_factory=dict)
    pseudo_labeler: Callable[["StepContext"], PseudoLabels] | None = None
    pseudo_labeler_name: str = ""                 # the component that set it, for messages
    _pseudo: PseudoLabels | None = None

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

    @property
    def target_pseudo(self) -> PseudoLabels:
        """The teacher's pseudo-labels of ``target.images``, computed once per step (no grad)."""
        if self._pseudo is None:
            if self.pseudo_labeler is None:
                raise RuntimeError("a component read ctx.target_pseudo but no component set a pseudo_labeler")
            with torch.no_grad():
                self._pseudo = self.pseudo_labeler(self)
        return self._pseudo

    def set_pseudo_labeler(self, labeler: Callable[["StepContext"], PseudoLabels], owner: str) -> None:
        """Called from ``prepare_batches`` by the component whose teacher labels the target."""
        if self.pseudo_labeler is not None:
            raise ValueError(f"components.{owner} and components.{self.pseudo_labeler_name} both set the "
                             "step's pseudo-labeler; one teacher labels the target, the others share it")
        self.pseudo_labeler, self.pseudo_labeler_name = labeler, owner

    def forward(self, images: Tensor) -> SegmenterOutput:
        """An extra segmenter pass (mixed images ...); (N, 3, H, W) in [0, 1]."""
        with self.autocast():
            return self.model(images)


@dataclass(frozen=True)
class ComponentSetup:
    """What a component may know when it is built: no recipe, only what methods need."""

    num_classes: int
    device: torch.device
    model: nn.Module                               # the bare segmenter (not DDP-wrapped)
    ignore_index: int = 255
    class_names: tuple[str, ...] = ()
    class_colors: tuple[tuple[int, int, int], ...] = ()
    model_name: str = ""                           # for messages ("model 'deeplab_small' has ...")
    iterations: int = 1000                         # schedule.iters: the length of this run
    poly_iters: int = 0                            # length of the poly LR decay; 0 = iterations
    poly_power: float = 0.9
    # The recipe's segmenter built afresh with some options changed (DAFormer's frozen ImageNet
    # model: ``build_segmenter(pretrained=path)``), and a trained da_seg segmenter read from a
    # checkpoint file (CyCADA's frozen source model). None where no trainer provides them.
    build_segmenter: Callable[..., nn.Module] | None = None
    load_trained: Callable[[str], nn.Module] | None = None

    @property
    def decay_iters(self) -> int:
        return self.poly_iters or self.iterations

    def palette(self) -> list[list[int]]:
        """Class colours for visuals; a fixed random palette when the domain gave none."""
        if self.class_colors:
            return [list(c) for c in self.class_colors]
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (self.num_classes, 3), generator=g).tolist()


class Component:
    """Base class. Subclasses set ``name``, an options dataclass ``Options`` and what they use.

    ``stage``: the one stage whose recipes may list it (``da_seg.stages``), "" for any.
    ``uses_target_labels``: the component reads target label files, ``"ground_truth"`` (the
    oracle) or ``"pseudo"`` (a pseudo-labelled domain written by a self-training stage: the
    trainer refuses a target that is not one, which would silently make it the oracle).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = type("Options", (), {})
    uses_source: ClassVar[bool] = False
    uses_target: ClassVar[bool] = False
    uses_target_labels: ClassVar[str] = ""
    # The stage this component only makes sense in ("translate": the CycleGAN translator); "" = any.
    stage: ClassVar[str] = ""
    # Its teacher labels the target for every component of the step (ctx.set_pseudo_labeler).
    provides_pseudo_labels: ClassVar[bool] = False

    def __init__(self, options: Any, setup: ComponentSetup):
        self.options = options
        self.setup = setup
        self.networks: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}

    @classmethod
    def check_recipe(cls, options: Any, components: dict[str, type["Component"]]) -> None:
        """Raise ConfigError when ``options`` cannot work beside the recipe's ``components``
        (name -> class, this one included): checked when the recipe is loaded."""

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


def build_options(options_cls: type, raw: dict[str, Any], where: str, source: str | None = None):
    """``options_cls(**raw)`` for the recipe table at ``where`` (e.g. ``components.advent.``):
    unknown keys fail with the closest valid one, invalid values with the key and what was
    expected (checked by the options dataclass itself), each prefixed with ``source``."""
    valid = [f.name for f in dataclasses.fields(options_cls)]
    prefix = f"{source}: " if source else ""
    check_keys(raw, valid, where, source or "recipe")
    try:
        return options_cls(**raw)
    except OptionError as err:
        raise ConfigError(f"{prefix}{where}{err.key} {err.detail}") from None
    except TypeError as err:
        raise ConfigError(f"{prefix}{where.rstrip('.')}: {err}") from err


def parse_options(cls: type[Component], raw: dict[str, Any], source: str | None = None):
    """A component's options from its recipe table ``[components.<name>]``."""
    return build_options(cls.Options, raw, f"components.{cls.name}.", source)
