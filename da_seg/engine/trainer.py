"""THE training loop. Every method runs through ``Trainer.step``; none owns a loop.

One step reads top to bottom:
  batches -> GPU augmentation -> StepContext (one cached forward per domain)
  -> component batch transforms before any forward (FDA)
  -> named losses from every component -> one backward -> optimizer + LR schedule step
  -> side losses (discriminators, translators) -> after_step updates (EMA teachers) -> LossMeter.
The segmenter is stepped when some component returned a loss for it; a recipe whose components
train only their own networks (the CycleGAN translator) runs the same loop, checkpoints, resume,
AMP, DDP and TensorBoard. What is scored at each evaluation is the ``Evaluator``'s; checkpoint
state is ``engine/checkpoint.py``'s; metrics.json and HParams are ``engine/logging.py``'s.
"""
from __future__ import annotations

import functools
import random
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from da_seg.config import Recipe, to_toml
from da_seg.data.augment import BatchAugment
from da_seg.data.domains import Domain, load_domain
from da_seg.data.generated import check_generated
from da_seg.data.pseudo_labels import check_pseudo_labelled
from da_seg.engine import checkpoint as ckpt
from da_seg.engine.batches import training_streams
from da_seg.engine.evaluate import Evaluator
from da_seg.engine.logging import LossMeter, NonFiniteLossError, RunLogger, finish_run_log, mark_failed, run_metrics
from da_seg.methods import build_components
from da_seg.methods.base import Component, ComponentSetup, StepContext, loss_groups
from da_seg.models import build_model
from da_seg.models.segmenter import Segmenter
from da_seg.utils import distributed as du
from da_seg.utils.files import write_json_atomic, write_text_atomic
from da_seg.utils.progress import Progress


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; ValueError (one line for the command) otherwise,
    or when the GPU asked for is not there, before anything is loaded or written."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"--device {device!r}; expected auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: CUDA is not available on this machine; use --device cpu "
                             "(or auto, which picks the GPU when there is one)")
        index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"--device {device!r}: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
    return torch.device(device)


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """None = full precision. AMP is a CUDA feature here: on CPU it is always off."""
    if device.type != "cuda" or amp == "off":
        return None
    return torch.float16 if amp == "fp16" else torch.bfloat16


def poly_warmup_factor(iteration: int, *, total: int, power: float, warmup: int, warmup_ratio: float) -> float:
    """LR multiplier: linear warm-up from ``warmup_ratio`` over ``warmup`` steps, then poly decay."""
    if iteration < warmup:
        return warmup_ratio + (1.0 - warmup_ratio) * iteration / warmup
    return max(0.0, 1.0 - iteration / total) ** power


def build_optimizer(cfg, param_groups: list[dict]) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(param_groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def check_same_classes(domains: list[Domain]) -> None:
    first = domains[0]
    for other in domains[1:]:
        if other.class_names != first.class_names:
            raise ValueError(
                f"domains {first.name!r} ({first.descriptor}) and {other.name!r} ({other.descriptor}) have "
                f"different classes: {list(first.class_names)} vs {list(other.class_names)}; a source, "
                "its targets and its evaluation domains must share one label space")


def build_segmenter(recipe: Recipe, num_classes: int, **changes) -> Segmenter:
    """The recipe's segmenter (``[model]``), with some options changed (e.g. ``pretrained=...``)."""
    options = dict(recipe.model.options)
    if recipe.model.pretrained:
        options["pretrained"] = recipe.model.pretrained
    model = build_model(recipe.model.name, num_classes, **{**options, **changes})
    model.align_corners = recipe.model.align_corners
    return model


def component_setup(recipe: Recipe, model: Segmenter, device: torch.device, class_names=(),
                    class_colors=()) -> ComponentSetup:
    """What the recipe's components may know: classes, device, the model, the schedule."""
    schedule = recipe.schedule
    return ComponentSetup(
        num_classes=model.num_classes, device=device, model=model, ignore_index=255,
        class_names=tuple(class_names), class_colors=tuple(tuple(c) for c in class_colors),
        model_name=recipe.model.name, iterations=schedule.iters, poly_iters=schedule.poly_iters,
        poly_power=schedule.poly_power,
        build_segmenter=functools.partial(build_segmenter, recipe, model.num_classes),
        load_trained=functools.partial(ckpt.load_trained, device=device))


class Trainer:
    """Builds everything a recipe names and trains it. ``fit()`` returns the final metrics dict."""

    def __init__(self, recipe: Recipe, run_dir: Path | None, *, device: str = "auto",
                 resume: bool = False, progress: bool = True, dist: du.DistInfo | None = None,
                 val_domains: Sequence[str] | None = None, allow_changes: Sequence[str] = ()):
        """``val_domains``: the domains scored at each evaluation; None = the recipe's.
        ``allow_changes``: recipe keys a resume may change (``--allow-change``), recorded in the run."""
        self.recipe, data = recipe, recipe.data
        self.dist = dist or du.DistInfo()
        self.device = pick_device(device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.is_main = self.dist.is_main
        self.amp_dtype = amp_dtype_for(recipe.train.amp, self.device)
        _seed_everything(recipe.train.seed + self.dist.rank)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not recipe.train.deterministic
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.source_domain = load_domain(data.source)
        self.target_domain = load_domain(data.target) if data.target else None
        val_domains = [load_domain(name) for name in (recipe.val_domains if val_domains is None else val_domains)]
        domains = [d for d in [self.source_domain, self.target_domain, *val_domains] if d]
        check_same_classes(domains)
        for domain in domains:
            check_generated(domain)

        self.model: Segmenter = build_segmenter(recipe, self.source_domain.num_classes).to(self.device)
        if recipe.model.init_checkpoint:  # before any component copies the weights (an EMA teacher)
            ckpt.load_model_weights(self.model, recipe.model.init_checkpoint)
        if recipe.model.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        setup = component_setup(recipe, self.model, self.device, self.source_domain.class_names,
                                self.source_domain.colors)
        self.components = build_components(recipe.components, setup, source=recipe.name)
        self.uses_source = any(c.uses_source for c in self.components)
        self.uses_target = any(c.uses_target for c in self.components)
        target_labels = {c.uses_target_labels for c in self.components} - {""}
        if self.uses_target and self.target_domain is None:
            raise ValueError(f"recipe {recipe.name!r}: a component needs target images but data.target is empty")
        if "pseudo" in target_labels:
            check_pseudo_labelled(self.target_domain, data.target_split,
                                  " and ".join(f"components.{c.name}" for c in self.components
                                               if c.uses_target_labels == "pseudo"))
        self.target_labels = bool(target_labels)
        self.loss_groups = loss_groups(self.components, per_domain=not self.dist.enabled)  # DDP: one backward
        for component in self.components:
            for name, net in component.networks.items():
                component.networks[name] = self._wrap(net.to(self.device))

        self.net = self._wrap(self.model)
        if recipe.train.compile:
            self.net = torch.compile(self.net)
        self.optimizer = build_optimizer(recipe.optim, self.model.param_groups(recipe.optim.lr,
                                                                               recipe.optim.head_lr_mult))
        sched = recipe.schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(
            poly_warmup_factor, total=sched.poly_iters or sched.iters, power=sched.poly_power,
            warmup=sched.warmup_iters, warmup_ratio=sched.warmup_ratio))
        use_scaler = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.side_scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.source_augment = BatchAugment(recipe.augment.source, "source").to(self.device)
        self.target_augment = BatchAugment(recipe.augment.target, "target").to(self.device)

        self.iteration = 0
        self.evaluations: list[dict] = []
        self.best: dict | None = None
        self.status = "running"
        self.resume_changes: list[dict] = []
        if resume:
            self._resume(tuple(allow_changes))
        self.logger = RunLogger.for_recipe(self.run_dir, recipe, enabled=self.is_main)
        self.evaluator = Evaluator(recipe, source=self.source_domain, target=self.target_domain,
                                   val_domains=val_domains, device=self.device, amp_dtype=self.amp_dtype,
                                   logger=self.logger, dist=self.dist, progress=progress and self.is_main)
        self.meter = LossMeter(self.device, self.iteration)
        self.show_progress = progress and self.is_main
        self.source_stream, self.target_stream = training_streams(self)
        self._last_ctx: StepContext | None = None

    # ------------------------------------------------------------------ set-up helpers
    def _wrap(self, net: nn.Module) -> nn.Module:
        if not self.dist.enabled or not any(p.requires_grad for p in net.parameters()):
            return net
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(net, device_ids=ids)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ the step
    def next_batches(self):
        """The step's augmented (source, target) batches; None for a domain no component uses."""
        return tuple(stream.next() if stream else None for stream in (self.source_stream, self.target_stream))

    def step(self) -> None:
        source, target = self.next_batches()
        ctx = StepContext(model=self.net, iteration=self.iteration, max_iters=self.recipe.schedule.iters,
                          source=source, target=target, autocast=self.autocast)
        for component in self.components:
            component.prepare_batches(ctx)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses = backward_by_group(ctx, self.loss_groups, self.autocast, self.scaler)
        total = sum(v.detach() for v in losses.values())
        if losses:
            if self.recipe.optim.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.optim.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()

        with self.autocast():
            side = {f"{c.name}/{k}": v for c in self.components for k, v in c.side_losses(ctx).items()}
        if side:
            side_optimizers = [o for c in self.components for o in c.optimizers.values()]
            for opt in side_optimizers:
                opt.zero_grad(set_to_none=True)
            self.side_scaler.scale(sum(side.values())).backward()
            for opt in side_optimizers:
                self.side_scaler.step(opt)
            self.side_scaler.update()
        for component in self.components:
            for scheduler in component.schedulers.values():
                scheduler.step()
        with torch.no_grad():
            extra = {f"{c.name}/{k}": v for c in self.components for k, v in c.after_step(ctx).items()}

        self.iteration += 1
        # Visuals are drawn at evaluations only: keep this step's tensors alive just then.
        self._last_ctx = ctx if self._is_eval_iteration(self.iteration) else None
        self.meter.add({"loss/total": total, **{f"loss/{k}": v for k, v in losses.items()},
                        **{f"side/{k}": v for k, v in side.items()}, **{f"stats/{k}": v for k, v in extra.items()}})

    def _is_eval_iteration(self, iteration: int) -> bool:
        return iteration % self.recipe.train.eval_every == 0 or iteration == self.recipe.schedule.iters

    def flush_logs(self) -> dict[str, float]:
        """Average the accumulated values (one device->host copy), check them, log them."""
        averaged = self.meter.flush(self.iteration)
        if not averaged:
            return averaged
        domains = int(self.uses_source) + int(self.uses_target)
        averaged["time/images_per_s"] = self.recipe.data.batch_size * self.dist.world_size * domains \
            / max(averaged["time/step_s"], 1e-9)
        for group in self.optimizer.param_groups:
            averaged[f"lr/{group.get('name', 'group')}"] = group["lr"]
        for component in self.components:
            for opt_name, opt in component.optimizers.items():
                averaged[f"lr/{component.name}/{opt_name}"] = opt.param_groups[0]["lr"]
        self.logger.scalars(averaged, self.iteration)
        return averaged

    # ------------------------------------------------------------------ evaluation and checkpoints
    def evaluate(self) -> dict[str, Any]:
        record = self.evaluator(self.model, self.iteration, final=self.iteration >= self.recipe.schedule.iters)
        if self.is_main and self._last_ctx is not None:
            for component in self.components:
                for tag, image in component.visuals(self._last_ctx).items():
                    self.logger.image(f"{component.name}/{tag}", image, self.iteration)
        return record

    def _resume(self, allow_changes: tuple[str, ...]) -> None:
        path = self.run_dir / "last.pt"
        if self.is_main:  # nothing of this run writes yet
            ckpt.remove_stale_checkpoint_writes(self.run_dir)
        state = ckpt.load_checkpoint(path)
        changed = ckpt.check_resumable(state, self.recipe, path, allow_changes)
        ckpt.restore_training_state(self, state)
        if changed:  # recorded: the run's recipe is no longer what it started with
            self.resume_changes.append({"iteration": self.iteration, "changes": changed})

    def check_finite(self) -> None:
        """Parameters and buffers must be finite before anything is evaluated or saved: a loss can
        stay finite while a BatchNorm variance overflows, and a checkpoint of that would score ~0."""
        bad = ckpt.nonfinite_tensors({"model": self.model, **{f"{c.name}.{k}": n for c in self.components
                                                                for k, n in c.networks.items()}})
        if bad:
            raise NonFiniteLossError(f"non-finite parameters or buffers after iteration {self.iteration}: "
                                     f"{', '.join(bad)}.")

    def save(self, best: bool = False) -> None:
        if self.is_main and self.run_dir is not None:
            self.check_finite()
            ckpt.save_training_state(self, self.run_dir, best=best)

    def write_metrics(self) -> dict[str, Any]:
        metrics = run_metrics(self)
        if self.is_main and self.run_dir is not None:
            write_json_atomic(metrics, self.run_dir / "metrics.json")
        return metrics

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any]:
        recipe, ev = self.recipe, self.evaluator
        iters, train = recipe.schedule.iters, recipe.train
        if self.is_main and self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(to_toml(recipe.to_dict()), self.run_dir / "recipe.toml")
            if self.iteration == 0:
                self.logger.text("recipe", to_toml(recipe.to_dict()))
        bar = Progress(iters, f"{recipe.name} seed {train.seed}", start=self.iteration, enabled=self.show_progress)
        try:
            while self.iteration < iters:
                self.step()
                it = self.iteration
                is_eval = self._is_eval_iteration(it)
                is_ckpt = is_eval or it % train.checkpoint_every == 0
                if it % train.log_every == 0 or is_ckpt:
                    logs = self.flush_logs()
                    bar.update(it, {k.split("/", 1)[1]: v for k, v in logs.items() if k.startswith(("loss/", "side/"))})
                if is_eval:
                    self.check_finite()
                    record = self.evaluate()
                    self.evaluations.append(record)
                    miou = ev.primary(record)
                    improved = miou is not None and (self.best is None or miou > (ev.primary(self.best) or -1))
                    if improved:
                        self.best = record
                    self.status = "finished" if it == iters else "running"
                    self.save(best=improved)
                    self.write_metrics()
                    if self.show_progress and miou is not None:
                        bar.stream.write(("\n" if bar.tty else "") + f"iteration {it}: mIoU {miou:.2f}\n")
                elif is_ckpt:
                    self.save()
            bar.close()
            self.status = "finished"
            metrics = finish_run_log(self.logger, recipe, self.write_metrics())  # before the writers close
        except NonFiniteLossError as err:
            self.status = "failed: non-finite loss"
            if self.is_main and self.run_dir is not None:
                mark_failed(self.run_dir, self.status)
            raise NonFiniteLossError(
                f"{err} Stopped; the last good checkpoint is kept ({ckpt.describe_last(self.run_dir)}). Lower "
                "optim.lr, set optim.grad_clip, or check the inputs, and continue that run with the keys you "
                f"change named: da-seg train RECIPE --resume {self.run_dir} --set optim.lr=... "
                "--allow-change optim.lr (the change is recorded in its metrics.json).") from None
        finally:
            self.logger.close(self.status)
            self.close_loaders()
        return metrics

    def close_loaders(self) -> None:
        for stream in (self.source_stream, self.target_stream):
            if stream is not None:
                stream.close()


def backward_by_group(ctx: StepContext, groups: list[list[Component]], autocast, scaler) -> dict:
    """Every component's named losses; each group's sum is backpropagated as soon as the group is
    done (``loss_groups``: per domain, or all at once). Returns {"<component>/<term>": Tensor}."""
    losses = {}
    for group in groups:
        with autocast():
            terms = {f"{c.name}/{k}": v for c in group for k, v in c.losses(ctx).items()}
        group_total = sum(terms.values())
        if terms and group_total.requires_grad:
            scaler.scale(group_total).backward()
        losses.update(terms)
    return losses


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
