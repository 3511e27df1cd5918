"""THE training loop. Every method runs through ``Trainer.step``; none owns a loop.

One step reads top to bottom:
  batches -> GPU augmentation -> StepContext (one cached forward per domain)
  -> component batch transforms before any forward (FDA)
  -> named losses from every component -> one backward -> optimizer + LR schedule step
  -> side losses (discriminators) -> after_step updates (EMA teachers) -> accumulated logs.
A recipe whose components all train only their own networks (``trains_segmenter = False``:
the CycleGAN stage of ``da-seg translate``) runs the same loop, checkpoints, resume, AMP, DDP and
TensorBoard, but never steps the segmenter and evaluates nothing (the component's visuals are
still logged at each evaluation iteration).
Losses are accumulated on the device and read back once per ``log_every`` steps (no
host-device sync per step); that read is also where a NaN/inf is caught, before any
checkpoint can be written from a poisoned model.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from da_seg.config import Recipe, recipe_differences, to_toml
from da_seg.data.augment import BatchAugment, to_float_images
from da_seg.data.datasets import SegmentationDataset
from da_seg.data.domains import Domain, load_domain
from da_seg.data.loaders import eval_loader, infinite_loader
from da_seg.data.synthetic import check_synthetic
from da_seg.engine import distributed as du
from da_seg.engine.alignment import alignment_image
from da_seg.engine.checkpoint import load_checkpoint, rng_state, save_atomic, set_rng_state, write_text_atomic
from da_seg.engine.evaluate import check_windows, evaluate, recompute_batchnorm
from da_seg.engine.logging import Progress, RunLogger
from da_seg.engine.visualize import confusion_image, panel
from da_seg.methods import build_components
from da_seg.methods.base import ComponentSetup, DomainBatch, StepContext
from da_seg.models import build_model
from da_seg.models.segmenter import InputNorm, Segmenter

# Recipe keys that may change between a run and its resume without changing what is trained.
RESUME_SAFE_KEYS = {"train.log_every", "data.num_workers", "eval.max_panels", "eval.alignment_images",
                    "description", "reference"}


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or inf; the run stops and the last good checkpoint stays as it was."""


class IncompatibleResumeError(ValueError):
    """The recipe given to --resume differs from the one the checkpoint was trained with."""


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} was requested but CUDA is not available")
    return torch.device(device)


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """None = full precision. AMP is a CUDA feature here: on CPU it is always off."""
    valid = ("auto", "bf16", "fp16", "off")
    if amp not in valid:
        raise ValueError(f"train.amp = {amp!r}; valid: {valid}")
    if device.type != "cuda" or amp == "off":
        return None
    return torch.float16 if amp == "fp16" else torch.bfloat16


def new_run_dir(runs_root: Path, recipe: Recipe) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(runs_root) / recipe.pair / recipe.name / f"{recipe.train.seed}-{stamp}"
    path, n = base, 1
    while path.exists():  # two runs started within the same second
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


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
    if cfg.name == "adam":
        return torch.optim.Adam(param_groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name = {cfg.name!r}; valid: 'sgd', 'adamw', 'adam'")


def check_same_classes(domains: list[Domain]) -> None:
    first = domains[0]
    for other in domains[1:]:
        if other.class_names != first.class_names:
            raise ValueError(
                f"domains {first.name!r} ({first.descriptor}) and {other.name!r} ({other.descriptor}) have "
                f"different classes: {list(first.class_names)} vs {list(other.class_names)}; a source, "
                "its targets and its evaluation domains must share one label space")


class Trainer:
    """Builds everything a recipe names and trains it. ``fit()`` returns the final metrics dict."""

    def __init__(self, recipe: Recipe, run_dir: Path | None, *, device: str = "auto",
                 resume: bool = False, progress: bool = True, dist: du.DistInfo | None = None):
        self.recipe = recipe
        self.dist = dist or du.DistInfo()
        self.device = pick_device(device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.is_main = self.dist.is_main
        self.show_progress = progress and self.is_main
        self.amp_dtype = amp_dtype_for(recipe.train.amp, self.device)
        self._seed_everything(recipe.train.seed + self.dist.rank)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not recipe.train.deterministic
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        data = recipe.data
        self.source_domain = load_domain(data.source)
        self.target_domain = load_domain(data.target) if data.target else None
        self.val_domains = [load_domain(name) for name in recipe.val_domains]
        domains = [d for d in [self.source_domain, self.target_domain, *self.val_domains] if d]
        check_same_classes(domains)
        for domain in domains:
            if domain.name.startswith("synth_"):  # generated data must match this generator version
                check_synthetic(domain.root)
        self.num_classes = self.source_domain.num_classes
        self.class_names = self.source_domain.class_names

        options = dict(recipe.model.options)
        if recipe.model.pretrained:
            options["pretrained"] = recipe.model.pretrained
        self.model: Segmenter = build_model(recipe.model.name, self.num_classes, **options).to(self.device)
        if recipe.model.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

        setup = ComponentSetup(recipe=recipe, num_classes=self.num_classes, ignore_index=255,
                               device=self.device, model=self.model, class_names=self.class_names)
        self.components = build_components(recipe.components, setup, source=recipe.name)
        self.uses_source = any(c.uses_source for c in self.components)
        self.uses_target = any(c.uses_target for c in self.components)
        self.target_labels = any(c.uses_target_labels for c in self.components)
        self.trains_segmenter = any(c.trains_segmenter for c in self.components)
        if not self.trains_segmenter:  # nothing to score: the segmenter stays as initialized
            self.val_domains = []
        if self.uses_target and self.target_domain is None:
            raise ValueError(f"recipe {recipe.name!r}: a component needs target images but data.target is empty")
        if recipe.eval.mode == "slide" and recipe.eval.crop is not None:
            # Fail now, not at the first evaluation eval_every iterations into training.
            check_windows(recipe.eval.crop, recipe.eval.stride or recipe.eval.crop)
        for component in self.components:
            for name, net in component.networks.items():
                component.networks[name] = self._wrap(net.to(self.device))

        self.net = self._wrap(self.model)
        if recipe.train.compile:
            self.net = torch.compile(self.net)
        self.optimizer = build_optimizer(recipe.optim, self.model.param_groups(recipe.optim.lr,
                                                                               recipe.optim.head_lr_mult))
        sched = recipe.schedule
        total = sched.poly_iters or sched.iters
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: poly_warmup_factor(
            it, total=total, power=sched.poly_power, warmup=sched.warmup_iters, warmup_ratio=sched.warmup_ratio))
        use_scaler = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.side_scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.source_augment = BatchAugment(recipe.augment.source, "source").to(self.device)
        self.target_augment = BatchAugment(recipe.augment.target, "target").to(self.device)

        self.iteration = 0
        self.evaluations: list[dict] = []
        self.best: dict | None = None
        self.status = "running"
        if resume:
            self._resume()
        self.logger = RunLogger(self.run_dir, enabled=self.is_main)
        self._sums: dict[str, Tensor] = {}
        self._count = 0
        self._window_start = self.iteration
        self._log_time = time.perf_counter()
        self._source_iter = self._target_iter = None
        self._last_ctx: StepContext | None = None

    # ------------------------------------------------------------------ set-up helpers
    def _wrap(self, net: nn.Module) -> nn.Module:
        if not self.dist.enabled or not any(p.requires_grad for p in net.parameters()):
            return net
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(net, device_ids=ids)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        import random

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _loader(self, domain: Domain, split: str, with_labels: bool, size, seed_offset: int):
        dataset = SegmentationDataset(domain, split, with_labels=with_labels, size=size)
        data = self.recipe.data
        sampler = None
        if data.sampler == "rare_class" and seed_offset == 0:
            from da_seg.data.rare_class import RareClassSampler

            sampler = RareClassSampler.for_dataset(
                dataset, temperature=data.rare_class_temperature, min_pixels=data.rare_class_min_pixels,
                seed=self.recipe.train.seed, rank=self.dist.rank, world_size=self.dist.world_size,
                start=self.iteration * data.batch_size)
        elif data.sampler not in ("random", "rare_class"):
            raise ValueError(f"data.sampler = {data.sampler!r}; valid: 'random', 'rare_class'")
        return infinite_loader(dataset, data.batch_size, seed=self.recipe.train.seed * 7919 + seed_offset,
                               start_batch=self.iteration, num_workers=data.num_workers,
                               rank=self.dist.rank, world_size=self.dist.world_size,
                               pin_memory=self.device.type == "cuda", sampler=sampler)

    def _next_batches(self) -> tuple[DomainBatch | None, DomainBatch | None]:
        data = self.recipe.data
        source = target = None
        if self.uses_source:
            if self._source_iter is None:
                self._source_iter = self._loader(self.source_domain, data.source_split, True, data.source_size, 0)
            raw = next(self._source_iter)
            images, labels = self.source_augment(raw["image"].to(self.device, non_blocking=True),
                                                 raw["label"].to(self.device, non_blocking=True))
            source = DomainBatch(images, labels, raw["index"])
        if self.uses_target:
            if self._target_iter is None:
                self._target_iter = self._loader(self.target_domain, data.target_split, self.target_labels,
                                                 data.target_size, 1)
            raw = next(self._target_iter)
            labels = raw["label"].to(self.device, non_blocking=True) if self.target_labels else None
            images, labels = self.target_augment(raw["image"].to(self.device, non_blocking=True), labels)
            target = DomainBatch(images, labels, raw["index"])
        if self.recipe.model.channels_last:
            for batch in (source, target):
                if batch is not None:
                    batch.images = batch.images.contiguous(memory_format=torch.channels_last)
        return source, target

    # ------------------------------------------------------------------ the step
    def step(self) -> None:
        source, target = self._next_batches()
        ctx = StepContext(model=self.net, iteration=self.iteration, max_iters=self.recipe.schedule.iters,
                          source=source, target=target, autocast=self.autocast)
        for component in self.components:
            component.prepare_batches(ctx)
        self.model.train()
        with self.autocast():
            losses = {f"{c.name}/{k}": v for c in self.components for k, v in c.losses(ctx).items()}
        total = sum(losses.values())
        if self.trains_segmenter:
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
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
        self._accumulate({"loss/total": total, **{f"loss/{k}": v for k, v in losses.items()},
                          **{f"side/{k}": v for k, v in side.items()}, **{f"stats/{k}": v for k, v in extra.items()}})

    def _is_eval_iteration(self, iteration: int) -> bool:
        return iteration % self.recipe.train.eval_every == 0 or iteration == self.recipe.schedule.iters

    def _accumulate(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            value = value.detach().float() if isinstance(value, Tensor) else torch.tensor(float(value))
            value = value.to(self.device)
            self._sums[name] = self._sums[name] + value if name in self._sums else value.clone()
        self._count += 1

    def flush_logs(self) -> dict[str, float]:
        """Average the accumulated values (one device->host copy), check them, log them."""
        if self._count == 0:
            return {}
        names = list(self._sums)
        means = (torch.stack([self._sums[n] for n in names]) / self._count).tolist()
        averaged = dict(zip(names, means))
        bad = [n for n in names if n.startswith(("loss/", "side/")) and n != "loss/total"
               and not math.isfinite(averaged[n])]
        if bad or not math.isfinite(averaged.get("loss/total", 0.0)):
            terms = ", ".join(f"{n.split('/', 1)[1]}={averaged[n]}" for n in bad) or f"total={averaged['loss/total']}"
            raise NonFiniteLossError(
                f"non-finite loss between iterations {self._window_start + 1} and {self.iteration}: {terms}. "
                f"Stopped; the last good checkpoint is kept ({self._last_checkpoint_text()}). "
                "Lower optim.lr, set optim.grad_clip, or check the inputs, then resume with --resume.")
        now = time.perf_counter()
        elapsed = now - self._log_time
        steps = self.iteration - self._window_start
        averaged["time/step_s"] = elapsed / max(steps, 1)
        images = self.recipe.data.batch_size * self.dist.world_size * (int(self.uses_source) + int(self.uses_target))
        averaged["time/images_per_s"] = images * steps / max(elapsed, 1e-9)
        for group in self.optimizer.param_groups:
            averaged[f"lr/{group.get('name', 'group')}"] = group["lr"]
        for component in self.components:
            for opt_name, opt in component.optimizers.items():
                averaged[f"lr/{component.name}/{opt_name}"] = opt.param_groups[0]["lr"]
        self.logger.scalars(averaged, self.iteration)
        self._sums, self._count = {}, 0
        self._window_start, self._log_time = self.iteration, now
        return averaged

    def _last_checkpoint_text(self) -> str:
        if self.run_dir is not None and (self.run_dir / "last.pt").exists():
            state = load_checkpoint(self.run_dir / "last.pt")
            return f"{self.run_dir / 'last.pt'} at iteration {state['iteration']}"
        return "none was written yet"

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, Any]:
        """Evaluate every val domain (and the source val split at the end); log; return the record."""
        recipe, ev = self.recipe, self.recipe.eval
        model: nn.Module = self.model
        if ev.adabn and self.trains_segmenter:
            model = recompute_batchnorm(self.model, self._adabn_batches(), ev.adabn_batches)
        record: dict[str, Any] = {"iteration": self.iteration, "domains": {}}
        domains = list(self.val_domains)
        final = self.iteration >= recipe.schedule.iters
        if final and self.trains_segmenter and self.source_domain.name not in {d.name for d in domains} \
                and recipe.data.val_split in self.source_domain.splits:
            domains.append(self.source_domain)
        scalars: dict[str, float] = {}
        for domain in domains:
            dataset = SegmentationDataset(domain, recipe.data.val_split, with_labels=True, size=recipe.data.val_size)
            loader = eval_loader(dataset, ev.batch_size, recipe.data.num_workers, self.dist.rank, self.dist.world_size)
            bar = Progress(len(loader), f"eval {domain.name}", enabled=self.show_progress, every_s=30)
            result = evaluate(model, loader, num_classes=self.num_classes, device=self.device,
                              class_subsets=domain.class_subsets, mode=ev.mode, input_size=ev.input_size,
                              crop=ev.crop, stride=ev.stride, flip=ev.flip, amp_dtype=self.amp_dtype,
                              max_panels=ev.max_panels, progress=lambda done, total: bar.update(done))
            bar.close()
            metrics = result.metrics
            record["domains"][domain.name] = metrics.to_json()
            scalars[f"eval/{domain.name}/mIoU"] = metrics.miou
            scalars[f"eval/{domain.name}/pixel_accuracy"] = metrics.pixel_accuracy
            for subset, value in metrics.subsets.items():
                scalars[f"eval/{domain.name}/mIoU_{subset}"] = value
            for name, iou in zip(self.class_names, metrics.iou):
                scalars[f"eval/{domain.name}/IoU/{name}"] = iou
            if self.is_main:
                self.logger.image(f"confusion/{domain.name}", confusion_image(result.confusion), self.iteration)
                if result.panels:
                    rows = [panel(img, pred, gt, domain.colors) for img, pred, gt in result.panels]
                    self.logger.image(f"panels/{domain.name}", torch.cat(rows, dim=1), self.iteration)
        if self.is_main and ev.alignment_images > 0 and self.target_domain is not None and self.val_domains:
            self._log_alignment(model)
        if self.is_main and self._last_ctx is not None:
            for component in self.components:
                for tag, image in component.visuals(self._last_ctx).items():
                    self.logger.image(f"{component.name}/{tag}", image, self.iteration)
        unseen = [d.name for d in self.val_domains]
        if len(unseen) > 1:
            values = [record["domains"][n]["miou"] for n in unseen if record["domains"][n]["miou"] is not None]
            record["domains"]["mean"] = {"miou": float(np.mean(values)) if values else None}
            scalars["eval/mean/mIoU"] = record["domains"]["mean"]["miou"] or float("nan")
        if self.trains_segmenter:
            scalars["eval/mIoU"] = self._primary_miou(record) or float("nan")
        self.logger.scalars(scalars, self.iteration)
        self.logger.flush()
        return record

    def _log_alignment(self, model: nn.Module) -> None:
        """Do source and target outputs overlap? A PCA scatter of per-pixel softmax vectors from a few
        source-val and target-val images, and a domain classifier's accuracy (50 = aligned)."""
        n, split = self.recipe.eval.alignment_images, self.recipe.data.val_split
        if split not in self.source_domain.splits:
            return
        size = self.recipe.data.val_size
        batches = []
        for domain in (self.source_domain, self.val_domains[0]):
            dataset = SegmentationDataset(domain, split, with_labels=False, size=size)
            images = [dataset[i]["image"] for i in range(min(n, len(dataset)))]
            if len({tuple(im.shape) for im in images}) != 1:  # mixed sizes: not worth resizing here
                return
            batches.append(torch.stack(images).to(self.device))
        result = alignment_image(model, batches[0], batches[1], kind="output", method="pca",
                                 seed=self.recipe.train.seed)
        self.logger.image("alignment/output_pca", result.image, self.iteration)
        self.logger.scalars({"alignment/output_separability": result.separability}, self.iteration)

    def _adabn_batches(self):
        if self.target_domain is None:
            raise ValueError("eval.adabn needs data.target (the images whose statistics to use)")
        data = self.recipe.data
        dataset = SegmentationDataset(self.target_domain, data.target_split, with_labels=False, size=data.target_size)
        loader = infinite_loader(dataset, data.batch_size, seed=12345, num_workers=data.num_workers)
        for _ in range(self.recipe.eval.adabn_batches):
            yield to_float_images(next(loader)["image"].to(self.device))

    def _primary_miou(self, record: dict) -> float | None:
        key = "mean" if len(self.val_domains) > 1 else (self.val_domains[0].name if self.val_domains else None)
        if key is None:
            return None
        return record["domains"].get(key, {}).get("miou")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "recipe": self.recipe.to_dict(),
            "model_meta": model_meta(self.model, self.recipe, self.source_domain),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "side_scaler": self.side_scaler.state_dict(),
            "components": {c.name: {
                "networks": {k: _unwrap(n).state_dict() for k, n in c.networks.items()},
                "optimizers": {k: o.state_dict() for k, o in c.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in c.schedulers.items()},
                "extra": c.state_dict()} for c in self.components},
            "rng": rng_state(),
            "evaluations": self.evaluations,
            "best": self.best,
        }

    def _resume(self) -> None:
        path = self.run_dir / "last.pt"
        state = load_checkpoint(path)
        diffs = [k for k in recipe_differences(state["recipe"], self.recipe.to_dict()) if k not in RESUME_SAFE_KEYS]
        if diffs:
            old, new = state["recipe"], self.recipe.to_dict()
            detail = "; ".join(f"{k}: checkpoint {_get(old, k)!r}, now {_get(new, k)!r}" for k in diffs[:8])
            raise IncompatibleResumeError(f"cannot resume {path} with this recipe: it differs at {detail}. "
                                          "Start a new run, or resume with the recipe the run was started with.")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.side_scaler.load_state_dict(state["side_scaler"])
        for component in self.components:
            saved = state["components"][component.name]
            for k, net in component.networks.items():
                _unwrap(net).load_state_dict(saved["networks"][k])
            for k, opt in component.optimizers.items():
                opt.load_state_dict(saved["optimizers"][k])
            for k, sched in component.schedulers.items():
                sched.load_state_dict(saved["schedulers"][k])
            component.load_state_dict(saved["extra"])
        set_rng_state(state["rng"])
        # Each rank continues its own stream: re-seed relative to the restored generator.
        if self.dist.rank:
            torch.manual_seed(torch.initial_seed() + self.dist.rank)
        self.iteration = state["iteration"]
        self.evaluations = list(state["evaluations"])
        self.best = state["best"]

    def save(self, best: bool = False) -> None:
        if not self.is_main or self.run_dir is None:
            return
        state = self.state_dict()
        save_atomic(state, self.run_dir / "last.pt")
        if best:
            save_atomic({k: state[k] for k in ("iteration", "recipe", "model_meta", "model")}, self.run_dir / "best.pt")

    def write_metrics(self) -> dict[str, Any]:
        metrics = {
            "recipe": self.recipe.name, "source": self.source_domain.name,
            "target": self.target_domain.name if self.target_domain else "",
            "seed": self.recipe.train.seed, "iterations": self.recipe.schedule.iters,
            "iteration": self.iteration, "finished": self.status == "finished", "status": self.status,
            "primary_domain": "mean" if len(self.val_domains) > 1 else (self.val_domains[0].name if self.val_domains else ""),
            "val_domains": [d.name for d in self.val_domains],
            "class_names": list(self.class_names), "components": list(self.recipe.components),
            "model": self.recipe.model.name, "evaluations": self.evaluations,
            "last": self.evaluations[-1] if self.evaluations else None, "best": self.best,
        }
        if self.is_main and self.run_dir is not None:
            write_text_atomic(json.dumps(metrics, indent=1), self.run_dir / "metrics.json")
        return metrics

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any]:
        recipe = self.recipe
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
                    shown = "loss/" if self.trains_segmenter else "side/"  # the translator's own terms
                    bar.update(it, {k.split("/", 1)[1]: v for k, v in logs.items() if k.startswith(shown)})
                if is_eval:
                    record = self.evaluate()
                    self.evaluations.append(record)
                    miou = self._primary_miou(record)
                    improved = miou is not None and (self.best is None or miou > (self._primary_miou(self.best) or -1))
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
        except NonFiniteLossError:
            self.status = "failed: non-finite loss"
            self._write_failure_status()
            raise
        finally:
            self.logger.close()
            self.close_loaders()
        if self.is_main and self.run_dir is not None:
            self._write_hparams()
        self.status = "finished"
        return self.write_metrics()

    def close_loaders(self) -> None:
        """Stop the training loaders' worker processes. Persistent workers otherwise outlive the
        run: a sweep, which trains many runs in one process, would keep every run's workers."""
        for name in ("_source_iter", "_target_iter"):
            iterator = getattr(self, name)
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            setattr(self, name, None)

    def _write_failure_status(self) -> None:
        if self.is_main and self.run_dir is not None and (self.run_dir / "metrics.json").exists():
            metrics = json.loads((self.run_dir / "metrics.json").read_text())
            metrics["status"] = self.status
            write_text_atomic(json.dumps(metrics, indent=1), self.run_dir / "metrics.json")

    def _write_hparams(self) -> None:
        r = self.recipe
        params = {"recipe": r.name, "source": r.data.source, "target": r.data.target, "model": r.model.name,
                  "components": "+".join(r.components), "seed": r.train.seed, "iters": r.schedule.iters,
                  "optim": r.optim.name, "lr": r.optim.lr, "batch_size": r.data.batch_size}
        metrics = {"hparam/last_mIoU": self._primary_miou(self.evaluations[-1]) or float("nan"),
                   "hparam/best_mIoU": self._primary_miou(self.best) if self.best else float("nan")}
        logger = RunLogger(self.run_dir)
        logger.hparams(params, metrics)
        logger.close()


def _unwrap(net: nn.Module) -> nn.Module:
    return net.module if isinstance(net, DistributedDataParallel) else net


def _get(d: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def model_meta(model: Segmenter, recipe: Recipe, domain: Domain) -> dict[str, Any]:
    """What it takes to rebuild the model for evaluation, input normalization included."""
    return {"name": recipe.model.name, "options": dict(recipe.model.options), "num_classes": model.num_classes,
            "input_norm": dataclasses.asdict(model.input_norm), "class_names": list(domain.class_names),
            "colors": [list(c) for c in domain.colors]}


def restore_model(checkpoint: dict[str, Any], device: torch.device | str = "cpu") -> Segmenter:
    """Rebuild a trained segmenter from a ``last.pt`` / ``best.pt`` dict (no pretrained file needed)."""
    meta = checkpoint["model_meta"]
    model = build_model(meta["name"], meta["num_classes"], **meta["options"])
    model.load_state_dict(checkpoint["model"])
    norm = meta["input_norm"]
    model.input_norm = InputNorm(tuple(norm["mean"]), tuple(norm["std"]), norm["bgr"], norm["scale"])
    return model.to(device)
