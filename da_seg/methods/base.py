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
A component may declare ``loss_domains``, the cached outputs its ``losses`` backpropagate through
(``("source",)``, ``("target",)``, ``()``); when every component declares one domain or none and each
domain's components are consecutive, the trainer backpropagates each domain's losses before the next
domain's forward (``loss_groups``: one graph alive at a time); undeclared (None): one joint backward.
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
from da_seg.models.segmenter import SegmenterOutput, upsample_logits


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
    _pseudo: PseudoLabels | None = None
    _upsampled: dict[tuple, tuple[Tensor, Tensor]] = field(default_factory=dict)

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

    def forward(self, images: Tensor) -> SegmenterOutput:
        """An extra segmenter pass (mixed images ...); (N, 3, H, W) in [0, 1]."""
        with self.autocast():
            return self.model(images)

    def upsampled(self, logits: Tensor, size, align_corners: bool = False) -> Tensor:
        """(N, C, h, w) logits -> (N, C, *size) float32, bilinear, computed once per step.

        The CE, the entropy and the discriminators of one step read the same map, as the official
        codes upsample once and reuse it. A map made without gradient is never handed to a caller
        that needs one (it is recomputed); one made with gradient is handed detached under no_grad.
        """
        key = (id(logits), tuple(size), align_corners)
        cached = self._upsampled.get(key)
        wants_grad = torch.is_grad_enabled() and logits.requires_grad
        if cached is not None and cached[0] is logits and (cached[1].requires_grad or not wants_grad):
            return cached[1] if wants_grad else cached[1].detach()
        out = upsample_logits(logits.float(), tuple(size), align_corners)
        self._upsampled[key] = (logits, out)  # the logits kept: their id is not reused this step
        return out


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
    # The cached outputs ``losses`` backpropagates through ("source", "target"); None = not declared.
    loss_domains: ClassVar[tuple[str, ...] | None] = None
    # The stage this component only makes sense in ("translate": the CycleGAN translator); "" = any.
    stage: ClassVar[str] = ""
    # Its teacher labels the target for every component of the step (ctx.pseudo_labeler).
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


def loss_groups(components: list[Component], per_domain: bool = True) -> list[list[Component]]:
    """The components in recipe order, cut where their losses move from one domain to the next.

    The trainer backpropagates each group before the next one's losses run, which frees a
    domain's graph before the next domain's forward (the official ADVENT / AdaptSegNet loops
    call ``backward()`` on the source loss before the target forward). The gradients add up to
    those of one joint backward. One group (a joint backward) unless every component declares
    ``loss_domains`` of one domain or none and each domain's components are consecutive.
    """
    declared = [c.loss_domains for c in components]
    if not per_domain or any(d is None or len(d) > 1 for d in declared):
        return [list(components)]
    groups: list[list[Component]] = []
    current, finished = None, set()
    for component, domains in zip(components, declared):
        if domains and domains[0] != current:
            if domains[0] in finished:  # a domain read again after another one: one backward
                return [list(components)]
            if current is not None:
                finished.add(current)
            current = domains[0]
            groups.append([])
        if not groups:
            groups.append([])
        groups[-1].append(component)
    return groups


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
