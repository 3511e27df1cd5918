"""The only place that writes TensorBoard events, the run's text log, and the loss meter of the
training loop."""
from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from da_seg.config import recipe_identity
from da_seg.utils.files import storage_error, write_json_atomic


class RunLogger:
    """TensorBoard writer for one run; a no-op on non-main ranks."""

    def __init__(self, run_dir: Path | None, enabled: bool = True):
        try:  # the writer creates the folder and opens its events file at once
            self.writer = SummaryWriter(str(run_dir)) if (enabled and run_dir is not None) else None
        except OSError as err:
            raise storage_error(err, f"cannot write the run folder {run_dir}") from err

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(name, value, step)

    def image(self, tag: str, image: np.ndarray | torch.Tensor, step: int) -> None:
        """image: (3, H, W) uint8."""
        if self.writer is not None:
            self.writer.add_image(tag, torch.as_tensor(image), step, dataformats="CHW")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            # Markdown: indent by four spaces so TOML shows as a code block.
            self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)

    def hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        """One HParams record in the run's own folder, so runs compare side by side in the
        HPARAMS tab (SummaryWriter.add_hparams would open a sub-run per call instead)."""
        if self.writer is None:
            return
        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in params.items()}
        exp, ssi, sei = hparams_summary(clean, metrics)
        file_writer = self.writer._get_file_writer()
        for summary in (exp, ssi, sei):
            file_writer.add_summary(summary)
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, 0)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


RUN_LOG = "train.log"


@contextmanager
def run_log_file(run_dir: Path | None) -> Iterator[None]:
    """While a run is built and trains, da_seg's log records (INFO and up: which pretrained
    tensors loaded, what was skipped or kept random, warnings) are appended to
    ``<run_dir>/train.log``, so that the run folder says what its model started from.
    ``None`` (a non-main rank): nothing is written."""
    if run_dir is None:
        yield
        return
    logger = logging.getLogger("da_seg")
    try:
        handler = logging.FileHandler(Path(run_dir) / RUN_LOG, encoding="utf-8")
    except OSError as err:
        raise storage_error(err, f"cannot write the run folder {run_dir}") from err
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = logger.level
    if not level or level > logging.INFO:  # unset (WARNING from the root) would drop the INFO records
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or inf; the run stops and the last good checkpoint stays as it was."""


class LossMeter:
    """Named values of the training steps, summed on the device between two reads.

    One device->host copy per ``flush`` (every ``train.log_every`` steps, and before every
    checkpoint): no host-device sync per step. That read is also where a NaN/inf loss is caught.
    """

    def __init__(self, device: torch.device, iteration: int = 0):
        self.device = device
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._window_start = iteration
        self._time = time.perf_counter()

    def add(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            value = value.to(self.device)
            self._sums[name] = self._sums[name] + value if name in self._sums else value.clone()
        self._count += 1

    def flush(self, iteration: int) -> dict[str, float]:
        """Means since the last flush, plus ``time/step_s``; {} when nothing was added.

        Raises NonFiniteLossError naming the terms when a ``loss/`` or ``side/`` mean is not finite.
        """
        if self._count == 0:
            return {}
        names = list(self._sums)
        means = dict(zip(names, (torch.stack([self._sums[n] for n in names]) / self._count).tolist()))
        bad = [n for n in names if n.startswith(("loss/", "side/")) and n != "loss/total"
               and not math.isfinite(means[n])]
        if bad or not math.isfinite(means.get("loss/total", 0.0)):
            terms = ", ".join(f"{n.split('/', 1)[1]}={means[n]}" for n in bad) or f"total={means['loss/total']}"
            raise NonFiniteLossError(f"non-finite loss between iterations {self._window_start + 1} and {iteration}: "
                                     f"{terms}.")
        now = time.perf_counter()
        means["time/step_s"] = (now - self._time) / max(iteration - self._window_start, 1)
        self._sums, self._count = {}, 0
        self._window_start, self._time = iteration, now
        return means


def write_hparams(run_dir: Path, recipe, metrics: dict[str, float]) -> None:
    """The run's HParams record: who it is (recipe, seed, components, model ...) and its scores."""
    params = {"recipe": recipe.name, "source": recipe.data.source, "target": recipe.data.target,
              "model": recipe.model.name, "components": "+".join(recipe.components), "seed": recipe.train.seed,
              "iters": recipe.schedule.iters, "optim": recipe.optim.name, "lr": recipe.optim.lr,
              "batch_size": recipe.data.batch_size}
    logger = RunLogger(run_dir)
    logger.hparams(params, metrics)
    logger.close()


def run_metrics(trainer) -> dict[str, Any]:
    """The run's ``metrics.json`` record: who it is, how far it got, every evaluation, last and best."""
    recipe, ev = trainer.recipe, trainer.evaluator
    return {
        "recipe": recipe.name, "identity": recipe_identity(recipe), "source": trainer.source_domain.name,
        "target": trainer.target_domain.name if trainer.target_domain else "",
        "seed": recipe.train.seed, "iterations": recipe.schedule.iters,
        "iteration": trainer.iteration, "finished": trainer.status == "finished", "status": trainer.status,
        "primary_domain": ev.primary_domain, "val_domains": [d.name for d in ev.val_domains],
        "class_names": list(trainer.source_domain.class_names), "components": list(recipe.components),
        "model": recipe.model.name, "evaluations": trainer.evaluations,
        "last": trainer.evaluations[-1] if trainer.evaluations else None, "best": trainer.best,
        "resume_changes": trainer.resume_changes,
    }


def mark_failed(run_dir: Path, status: str) -> None:
    """Record a stopped run's status in its ``metrics.json`` (when one was written)."""
    path = Path(run_dir) / "metrics.json"
    if path.exists():
        metrics = json.loads(path.read_text())
        metrics["status"] = status
        write_json_atomic(metrics, path)
