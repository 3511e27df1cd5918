"""Evaluation: prediction at label resolution, the confusion-matrix loop, and AdaBN.

``predict`` turns images into class probabilities at the label size, by one forward pass
("whole") or by overlapping windows ("slide"), optionally averaged with the horizontal flip.
``evaluate`` runs it over a loader and scores it with one ``ConfusionMatrix`` for the whole
set (summed over ranks under torch.distributed). ``recompute_batchnorm`` is AdaBN: a copy
of the model whose BatchNorm statistics come from target images. ``Evaluator`` is what a
training run scores and logs at each evaluation.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

import numpy as np

from da_seg.data.augment import to_float_images
from da_seg.data.datasets import SegmentationDataset
from da_seg.data.domains import Domain
from da_seg.data.loaders import eval_loader, infinite_loader
from da_seg.engine.alignment import SOURCE_COLOR, TARGET_COLOR, alignment_image
from da_seg.models.segmenter import upsample_logits
from da_seg.utils.metrics import ConfusionMatrix, SegMetrics
from da_seg.utils.progress import Progress
from da_seg.utils.visualize import labelled_confusion, labelled_panels, panel, with_legend
from da_seg.utils.windows import check_windows, sliding_windows

PREDICT_MODES = ("whole", "slide")


class SoftmaxEnsemble(nn.Module):
    """Several segmenters scored as one: ``predict`` averages their softmaxes, each computed from
    its own logits upsampled to the output size (FDA's multi-band ensemble). Members keep their
    own input normalization. Use it with ``predict`` / ``evaluate``, not as a ``Segmenter``."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self.members = nn.ModuleList(members)
        classes = {getattr(m, "num_classes", None) for m in members}
        if len(classes) != 1:
            raise ValueError(f"ensemble members predict different numbers of classes: {sorted(map(str, classes))}")
        self.num_classes = classes.pop()


def _softmax_at(model: nn.Module, images: Tensor, size: tuple[int, int], amp_dtype) -> Tensor:
    """(N, 3, h, w) in [0, 1] -> (N, C, *size) float32 probabilities."""
    if isinstance(model, SoftmaxEnsemble):
        return torch.stack([_softmax_at(m, images, size, amp_dtype) for m in model.members]).mean(0)
    autocast = (torch.autocast(images.device.type, dtype=amp_dtype) if amp_dtype is not None
                else nullcontext())
    with autocast:
        out = model(images)
    return upsample_logits(out.logits.float(), size, out.align_corners).softmax(1)


def _predict_view(model: nn.Module, images: Tensor, output_size: tuple[int, int], mode: str,
                  crop, stride, amp_dtype, window_batch: int = 1) -> Tensor:
    if mode == "whole":
        return _softmax_at(model, images, output_size, amp_dtype)
    n, _, height, width = images.shape
    probs = None
    counts = torch.zeros(1, 1, height, width, device=images.device)
    windows = sliding_windows((height, width), crop, stride)
    # ``window_batch`` windows (all of one shape) go through the network as one batch: bounded
    # memory at full resolution, fewer passes than one window at a time (mmseg's batched_slide).
    for start in range(0, len(windows), window_batch):
        group = windows[start:start + window_batch]
        top, left, bottom, right = group[0]
        stacked = torch.cat([images[:, :, t:b, l:r] for t, l, b, r in group], dim=0)
        scores = _softmax_at(model, stacked, (bottom - top, right - left), amp_dtype)
        if probs is None:
            probs = images.new_zeros(n, scores.shape[1], height, width, dtype=torch.float32)
        for i, (t, l, b, r) in enumerate(group):
            probs[:, :, t:b, l:r] += scores[i * n:(i + 1) * n]
            counts[:, :, t:b, l:r] += 1
    probs = probs / counts  # (N, C, H_in, W_in), overlaps averaged
    if (height, width) != tuple(output_size):
        # Bilinear weights are convex, so resized probabilities still sum to one.
        probs = F.interpolate(probs, size=output_size, mode="bilinear", align_corners=False)
    return probs


def predict(model: nn.Module, images: Tensor, *, output_size: tuple[int, int] | None = None,
            mode: str = "whole", input_size: tuple[int, int] | None = None,
            crop: tuple[int, int] | None = None, stride: tuple[int, int] | None = None,
            flip: bool = False, amp_dtype: torch.dtype | None = None, window_batch: int = 1) -> Tensor:
    """Class probabilities for a batch.

    images:      (N, 3, H, W) float RGB in [0, 1].
    output_size: (H_out, W_out) of the returned map, normally the label size; default (H, W).
    mode:        "whole" (one forward, logits upsampled bilinearly) or "slide" (``crop``-sized
                 windows every ``stride``, default ``stride = crop``, never larger; softmax
                 averaged where windows overlap).
    input_size:  resize the input to this (H, W) before the network (e.g. 1024x512 inputs
                 scored against 2048x1024 labels).
    flip:        also run the horizontally flipped images and average the probabilities.
    window_batch: "slide": windows per forward pass (N x window_batch crops in one batch).
    Returns (N, C, H_out, W_out) float32 probabilities. Runs under the caller's grad mode.
    """
    if mode not in PREDICT_MODES:
        raise ValueError(f"unknown prediction mode {mode!r}; valid: {list(PREDICT_MODES)}")
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images must be float (N, 3, H, W) in [0, 1], got {images.dtype} "
                         f"{tuple(images.shape)}")
    if mode == "slide":
        if crop is None:
            raise ValueError("mode='slide' needs crop=(h, w)")
        crop = tuple(crop)
        stride = tuple(stride) if stride is not None else crop
        check_windows(crop, stride)  # before any forward
    output_size = tuple(output_size) if output_size is not None else tuple(images.shape[-2:])
    if input_size is not None and tuple(input_size) != tuple(images.shape[-2:]):
        images = F.interpolate(images, size=tuple(input_size), mode="bilinear",
                               align_corners=False, antialias=True)
    if window_batch < 1:
        raise ValueError(f"window_batch = {window_batch}; expected >= 1 windows per pass")
    probs = _predict_view(model, images, output_size, mode, crop, stride, amp_dtype, window_batch)
    if flip:
        flipped = _predict_view(model, images.flip(-1), output_size, mode, crop, stride, amp_dtype, window_batch)
        probs = (probs + flipped.flip(-1)) / 2
    return probs


@dataclass
class EvalResult:
    """metrics: scores over the whole set; confusion: (C, C) int64 on the CPU, rows = ground truth;
    panels: up to ``max_panels`` (image uint8 (3, H, W), pred (H, W), gt (H, W)) for visualization,
    from this rank's first batches."""

    metrics: SegMetrics
    confusion: Tensor
    panels: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)


def evaluate(model: nn.Module, loader: Iterable[dict], *, num_classes: int,
             device: torch.device | str, class_subsets: Mapping[str, Sequence[int]] | None = None,
             mode: str = "whole", input_size: tuple[int, int] | None = None,
             crop: tuple[int, int] | None = None, stride: tuple[int, int] | None = None,
             flip: bool = False, amp_dtype: torch.dtype | None = None, max_panels: int = 4,
             progress: Callable[[int, int | None], None] | None = None, window_batch: int = 1) -> EvalResult:
    """Scores ``model`` on a loader of {"image": uint8 (N, 3, H, W), "label": int64 (N, H, W)}.

    Predictions are made at label resolution. Under torch.distributed each rank evaluates its
    shard and the confusion matrices are summed, so the loader's sampler must not pad the
    set with duplicates for exact numbers. The model's train/eval mode is restored afterwards.
    """
    # DDP would broadcast buffers on every forward and hang when ranks get unequal batch counts.
    net = model.module if isinstance(model, DistributedDataParallel) else model
    confusion = ConfusionMatrix(num_classes, device)
    panels: list[tuple[Tensor, Tensor, Tensor]] = []
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    modes = {module: module.training for module in net.modules()}
    net.eval()
    try:
        with torch.inference_mode():
            for done, batch in enumerate(loader, start=1):
                images = batch["image"].to(device, non_blocking=True).float().div_(255)
                labels = batch["label"].to(device, non_blocking=True).long()
                probs = predict(net, images, output_size=tuple(labels.shape[-2:]), mode=mode,
                                input_size=input_size, crop=crop, stride=stride, flip=flip,
                                amp_dtype=amp_dtype, window_batch=window_batch)
                preds = probs.argmax(1)  # (N, H_label, W_label)
                confusion.update(preds, labels)
                for i in range(min(max_panels - len(panels), len(images))):
                    panels.append(_panel_tensors(batch["image"][i], preds[i], labels[i]))
                if progress is not None:
                    progress(done, total)
    finally:
        for module, training in modes.items():
            module.training = training
    confusion.all_reduce_()
    return EvalResult(metrics=confusion.compute(class_subsets), confusion=confusion.matrix.cpu(),
                      panels=panels)


def _panel_tensors(image: Tensor, pred: Tensor, label: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """CPU copies at label resolution (the image is resized when it was loaded smaller)."""
    image = image.cpu()
    if tuple(image.shape[-2:]) != tuple(label.shape[-2:]):
        image = F.interpolate(image[None].float(), size=tuple(label.shape[-2:]), mode="bilinear",
                              align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
    return image.clone(), pred.cpu().clone(), label.cpu().clone()


def recompute_batchnorm(model: nn.Module, batches: Iterable[Tensor],
                        max_batches: int | None = None) -> nn.Module:
    """AdaBN: a deep copy of ``model`` with BatchNorm statistics measured on ``batches``.

    batches: (N, 3, H, W) float images in [0, 1] (uint8 is divided by 255), e.g. target
    training images. Running statistics are reset and re-estimated as a cumulative average
    (``momentum=None``) over at most ``max_batches`` batches, with only the BatchNorm layers
    in train mode (dropout and the like stay off, so they do not distort the statistics).
    The original model is untouched; the copy keeps its module modes and momenta.
    """
    net = model.module if isinstance(model, DistributedDataParallel) else model
    adapted = copy.deepcopy(net)
    norms = [m for m in adapted.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return adapted
    modes = {module: module.training for module in adapted.modules()}
    momenta = {norm: norm.momentum for norm in norms}
    parameter = next(adapted.parameters(), None)
    device = parameter.device if parameter is not None else norms[0].running_mean.device
    adapted.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    seen = 0
    try:
        with torch.no_grad():
            for images in batches:
                if max_batches is not None and seen >= max_batches:
                    break
                images = images.to(device, non_blocking=True)
                if images.dtype == torch.uint8:
                    images = images.float() / 255
                adapted(images)
                seen += 1
    finally:
        for norm, momentum in momenta.items():
            norm.momentum = momentum
        for module, training in modes.items():
            module.training = training
    if seen == 0:
        raise ValueError("recompute_batchnorm got no batches; BatchNorm statistics would be empty")
    return adapted


# ---------------------------------------------------------------------------------------------
# Evaluation during training

class Evaluator:
    """What a run scores at each evaluation: every val domain (and the source val split at the
    end), with TensorBoard scalars, confusion matrices, panels and the alignment probe.

    The *primary* score of a run is the mean over its val domains when it has several (domain
    generalization), else its one val domain (the target).
    """

    def __init__(self, recipe, *, source: Domain, target: Domain | None, val_domains: Sequence[Domain],
                 device: torch.device, amp_dtype, logger, dist, progress: bool):
        self.recipe, self.source, self.target = recipe, source, target
        self.val_domains = list(val_domains)
        self.device, self.amp_dtype, self.logger, self.dist = device, amp_dtype, logger, dist
        self.show_progress = progress
        self.class_names = source.class_names

    @property
    def primary_domain(self) -> str:
        return "mean" if len(self.val_domains) > 1 else (self.val_domains[0].name if self.val_domains else "")

    def primary(self, record: dict | None) -> float | None:
        if not record or not self.primary_domain:
            return None
        return record["domains"].get(self.primary_domain, {}).get("miou")

    def __call__(self, model: nn.Module, iteration: int, final: bool) -> dict:
        """Evaluate, log, and return the record ``{"iteration", "domains": {name: metrics}}``."""
        ev, data = self.recipe.eval, self.recipe.data
        if ev.adabn and self.val_domains:
            model = recompute_batchnorm(model, self._adabn_batches(), ev.adabn_batches)
        record: dict = {"iteration": iteration, "domains": {}}
        domains = list(self.val_domains)
        if final and self.val_domains and self.source.name not in {d.name for d in domains} \
                and data.val_split in self.source.splits:
            domains.append(self.source)
        scalars: dict[str, float] = {}
        for domain in domains:
            metrics = self._evaluate_domain(model, domain, iteration)
            record["domains"][domain.name] = metrics.to_json()
            if domain.name not in {d.name for d in self.val_domains}:
                # The source scored once, at the end: in metrics.json and the HParams metrics, not as
                # a one-point time series next to the curves of the val domains.
                continue
            scalars[f"eval/{domain.name}/mIoU"] = metrics.miou
            scalars[f"eval/{domain.name}/pixel_accuracy"] = metrics.pixel_accuracy
            for subset, value in metrics.subsets.items():
                scalars[f"eval/{domain.name}/mIoU_{subset}"] = value
            for name, iou in zip(self.class_names, metrics.iou):
                scalars[f"eval/{domain.name}/IoU/{name}"] = iou
        if self.dist.is_main and ev.alignment_images > 0 and self.target is not None and self.val_domains:
            self._log_alignment(model, iteration)
        if len(self.val_domains) > 1:
            values = [record["domains"][d.name]["miou"] for d in self.val_domains
                      if record["domains"][d.name]["miou"] is not None]
            record["domains"]["mean"] = {"miou": float(np.mean(values)) if values else None}
            scalars["eval/mean/mIoU"] = record["domains"]["mean"]["miou"] or float("nan")
        if self.val_domains:
            scalars["eval/mIoU"] = self.primary(record) or float("nan")
        self.logger.scalars(scalars, iteration)
        self.logger.flush()
        return record

    def _evaluate_domain(self, model: nn.Module, domain: Domain, iteration: int) -> SegMetrics:
        ev, data = self.recipe.eval, self.recipe.data
        dataset = SegmentationDataset(domain, data.val_split, with_labels=True, size=data.val_size)
        loader = eval_loader(dataset, ev.batch_size, data.num_workers, self.dist.rank, self.dist.world_size)
        bar = Progress(len(loader), f"eval {domain.name}", enabled=self.show_progress, every_s=30)
        result = evaluate(model, loader, num_classes=self.source.num_classes, device=self.device,
                          class_subsets=domain.class_subsets, mode=ev.mode, input_size=ev.input_size,
                          crop=ev.crop, stride=ev.stride, flip=ev.flip, amp_dtype=self.amp_dtype,
                          window_batch=ev.window_batch,
                          max_panels=ev.max_panels, progress=lambda done, total: bar.update(done))
        bar.close()
        if self.dist.is_main:
            self.logger.image(f"confusion/{domain.name}", labelled_confusion(
                result.confusion, self.class_names, cell=max(12, 160 // len(self.class_names)),
                title=f"{domain.name} {data.val_split} @ {iteration}: rows sum to 1"), iteration)
            if result.panels:
                rows = [panel(img, pred, gt, domain.colors) for img, pred, gt in result.panels]
                self.logger.image(f"panels/{domain.name}", labelled_panels(rows, self.class_names, domain.colors),
                                  iteration)
        return result.metrics

    def _log_alignment(self, model: nn.Module, iteration: int) -> None:
        """Do source and target outputs overlap? A PCA scatter of per-pixel softmax vectors from a few
        source-val and target-val images, and a domain classifier's accuracy (50 = aligned)."""
        n, split = self.recipe.eval.alignment_images, self.recipe.data.val_split
        if split not in self.source.splits:
            return
        batches = []
        for domain in (self.source, self.val_domains[0]):
            dataset = SegmentationDataset(domain, split, with_labels=False, size=self.recipe.data.val_size)
            images = [dataset[i]["image"] for i in range(min(n, len(dataset)))]
            if len({tuple(im.shape) for im in images}) != 1:  # mixed sizes: not worth resizing here
                return
            batches.append(torch.stack(images).to(self.device))
        result = alignment_image(model, batches[0], batches[1], kind="output", method="pca",
                                 seed=self.recipe.train.seed)
        self.logger.image("alignment/output_pca", with_legend(
            result.image, [f"source: {self.source.name}", f"target: {self.val_domains[0].name}"],
            [SOURCE_COLOR, TARGET_COLOR], title=f"softmax PCA, separability {result.separability:.0f}%"), iteration)
        self.logger.scalars({"alignment/output_separability": result.separability}, iteration)

    def _adabn_batches(self):
        if self.target is None:
            raise ValueError("eval.adabn needs data.target (the images whose statistics to use)")
        data = self.recipe.data
        dataset = SegmentationDataset(self.target, data.target_split, with_labels=False, size=data.target_size)
        loader = infinite_loader(dataset, data.batch_size, seed=12345, num_workers=data.num_workers)
        for _ in range(self.recipe.eval.adabn_batches):
            yield to_float_images(next(loader)["image"].to(self.device))
