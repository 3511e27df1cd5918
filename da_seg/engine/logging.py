"""The only place that writes a run's tracked logs (TensorBoard events, and MLflow or Weights &
Biases when ``train.trackers`` names them: optional extras ``[mlflow]``, ``[wandb]``), its text log,
and the loss meter of the training loop."""
from __future__ import annotations

import html
import importlib
import json
import logging
import math
import os
import re
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from da_seg.config import recipe_identity
from da_seg.utils.files import storage_error, write_json_atomic


class RunLogger:
    """The run's writers (``train.trackers``: TensorBoard, MLflow, Weights & Biases) behind one
    interface; a no-op on non-main ranks. Every other module logs through this class only."""

    def __init__(self, run_dir: Path | None, enabled: bool = True, trackers: Sequence[str] = ("tensorboard",),
                 run_name: str = "", group: str = "", experiment: str = ""):
        self.writers: list[Any] = []
        if not enabled or run_dir is None:
            return
        unknown = [t for t in trackers if t not in TRACKER_WRITERS]
        if unknown:
            raise ValueError(f"train.trackers: unknown {unknown}; valid: {', '.join(TRACKER_WRITERS)}")
        run_name = run_name or Path(run_dir).name
        try:
            for tracker in trackers:
                self.writers.append(TRACKER_WRITERS[tracker](Path(run_dir), run_name=run_name, group=group,
                                                             experiment=experiment or group))
        except BaseException:
            self.close()
            raise

    @classmethod
    def for_recipe(cls, run_dir: Path | None, recipe, enabled: bool = True) -> "RunLogger":
        """The writers a recipe names, with the run named ``<recipe> seed <n>`` in the trackers that
        name runs, grouped by recipe, in an experiment per domain pair."""
        return cls(run_dir, enabled=enabled, trackers=recipe.train.trackers,
                   run_name=f"{recipe.name} seed {recipe.train.seed}", group=recipe.name, experiment=recipe.pair)

    def scalars(self, values: dict[str, float], step: int) -> None:
        finite = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}
        if finite:
            for writer in self.writers:
                writer.scalars(finite, step)

    def image(self, tag: str, image: np.ndarray | torch.Tensor, step: int) -> None:
        """image: (3, H, W) uint8."""
        for writer in self.writers:
            writer.image(tag, torch.as_tensor(image).cpu(), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        for writer in self.writers:
            writer.text(tag, text, step)

    def hparams(self, params: dict[str, Any], metrics: dict[str, float], step: int = 0) -> None:
        """The run's hyper-parameters (str, int, float, bool) and its final scores (NaN: not scored)."""
        for writer in self.writers:
            writer.hparams(params, {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}, step)

    def flush(self) -> None:
        for writer in self.writers:
            writer.flush()

    def close(self, status: str = "finished") -> None:
        writers, self.writers = self.writers, []
        for writer in writers:
            writer.close(status)


class TensorBoardWriter:
    """Events in the run folder. HParams: an explicit experiment config (every run writes the same
    one, so whichever TensorBoard picks describes them all): integers as text (its numbers all
    print as 5 significant digits, 8 -> "8.0000"), the identifying hparams first."""

    def __init__(self, run_dir: Path, **_names):
        try:  # the writer creates the folder and opens its events file at once
            self.writer = SummaryWriter(str(run_dir))
        except OSError as err:
            raise storage_error(err, f"cannot write the run folder {run_dir}") from err

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="CHW")

    def text(self, tag: str, text: str, step: int) -> None:
        # Markdown: indent by four spaces so TOML shows as a code block.
        self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)

    def hparams(self, params: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        file_writer = self.writer._get_file_writer()
        for summary in hparams_summaries(params, metrics):
            file_writer.add_summary(summary)
        for name, value in metrics.items():  # what the HParams tab reads each metric from
            self.writer.add_scalar(name, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class _ExternalRun:
    """A tracker whose run id is kept in ``<run_dir>/trackers.json``, so that a resumed run
    continues the same tracked run instead of starting a second one."""

    name = ""

    def __init__(self, run_dir: Path):
        self.ids_file = run_dir / "trackers.json"

    def saved_id(self) -> str | None:
        if self.ids_file.exists():
            return json.loads(self.ids_file.read_text()).get(self.name)
        return None

    def save_id(self, run_id: str) -> None:
        ids = json.loads(self.ids_file.read_text()) if self.ids_file.exists() else {}
        ids[self.name] = run_id
        write_json_atomic(ids, self.ids_file)


def _import_tracker(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"train.trackers names {extra!r}, which needs the {module} package: "
                          f"pip install 'da-seg[{extra}]' (or pip install {module})") from err


class MLflowWriter(_ExternalRun):
    """MLflow through its client API (no global active run): the tracking URI is MLflow's own
    (``MLFLOW_TRACKING_URI``, default ``./mlruns``); experiment = the domain pair, run name =
    ``<recipe> seed <n>``; images and the recipe as artifacts."""

    name = "mlflow"

    def __init__(self, run_dir: Path, *, run_name: str, group: str, experiment: str):
        super().__init__(run_dir)
        mlflow = _import_tracker("mlflow", "mlflow")
        self.client = mlflow.tracking.MlflowClient()
        self.entities = mlflow.entities
        self.run_id = self.saved_id()
        if self.run_id is None:
            found = self.client.get_experiment_by_name(experiment or "da_seg")
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment or "da_seg")
            run = self.client.create_run(experiment_id, run_name=run_name,
                                         tags={"da_seg.recipe": group, "da_seg.run_dir": str(run_dir)})
            self.run_id = run.info.run_id
            self.save_id(self.run_id)
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def scalars(self, values: dict[str, float], step: int) -> None:
        stamp = int(time.time() * 1000)
        metrics = [self.entities.Metric(_mlflow_key(k), v, stamp, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.client.log_image(self.run_id, image.permute(1, 2, 0).numpy(), artifact_file=f"images/{tag}/{step:07d}.png")

    def text(self, tag: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, artifact_file=f"text/{tag}.txt")

    def hparams(self, params: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        logged = set(self.client.get_run(self.run_id).data.params)
        fresh = [self.entities.Param(_mlflow_key(k), str(v)[:500]) for k, v in params.items()
                 if _mlflow_key(k) not in logged]  # params are write-once (a resumed run logs them again)
        self.client.log_batch(self.run_id, params=fresh)
        self.scalars(metrics, step)

    def flush(self) -> None:
        pass

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if status == "finished" else "FAILED")


def _mlflow_key(name: str) -> str:
    # MLflow keys: alphanumerics, underscores, dashes, periods, spaces, colons and slashes.
    return re.sub(r"[^\w\-. :/]", "_", name)


class WandbWriter(_ExternalRun):
    """Weights & Biases: project ``$WANDB_PROJECT`` (default ``da_seg``), runs grouped by recipe;
    ``WANDB_MODE=offline`` writes under ``<run_dir>/wandb`` for a later ``wandb sync``."""

    name = "wandb"

    def __init__(self, run_dir: Path, *, run_name: str, group: str, experiment: str):
        super().__init__(run_dir)
        self.wandb = _import_tracker("wandb", "wandb")
        run_id = self.saved_id() or uuid.uuid4().hex[:12]
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "da_seg"), name=run_name, group=group,
                                   job_type=experiment, id=run_id, resume="allow", dir=str(run_dir),
                                   reinit="create_new")
        self.save_id(run_id)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.run.log({tag: self.wandb.Image(image.permute(1, 2, 0).numpy())}, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def hparams(self, params: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        self.run.config.update(params, allow_val_change=True)
        self.run.summary.update(metrics)

    def flush(self) -> None:
        pass

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


TRACKER_WRITERS = {"tensorboard": TensorBoardWriter, "mlflow": MLflowWriter, "wandb": WandbWriter}


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


# The HParams of a run: the same names for every run (TensorBoard describes all runs by one run's
# experiment config), identifying ones first. (name, what it is, identifies the run).
HPARAMS = (
    ("recipe", "recipe name", True),
    ("seed", "train.seed", True),
    ("components", "the loss components in recipe order, each with its weight (none: unweighted)", True),
    ("augment", "augmentation that differs from the defaults (flip on), per domain", True),
    ("schedule", "iterations, poly power, warm-up", True),
    ("stage", "what runs the recipe: train | translate | self_train", False),
    ("source", "source domain", False),
    ("target", "target domain, or the unseen val domains (domain generalization)", False),
    ("model", "model.name", False),
    ("options", "component options besides the weight", False),
    ("optim", "optimizer", False),
    ("lr", "optim.lr", False),
    ("batch_size", "data.batch_size, per domain and process", False),
    ("iters", "schedule.iters", False),
    ("identity", "hash of everything trained (runs with one identity are seeds of one experiment)", False),
)
HPARAM_METRICS = (
    ("hparam/last_mIoU", "last mIoU", "mIoU at the end on the target (DG: the mean over the val domains)"),
    ("hparam/best_mIoU", "best mIoU", "best evaluation's mIoU on the target (DG: the mean) - chosen on val"),
    ("hparam/source_mIoU", "source mIoU", "the source domain's val mIoU at the end"),
)


def _number(value: float) -> str:
    return f"{value:g}"


def run_hparams(recipe) -> dict[str, str | float]:
    """The run's HParams values (names and order of ``HPARAMS``). Integers are text, so that they
    print as integers; the learning rate stays a number (sortable, a range filter)."""
    from da_seg.config import AugmentConfig

    weights = {name: options["weight"] for name, options in recipe.components.items() if "weight" in options}
    options = {name: {k: v for k, v in opts.items() if k != "weight"} for name, opts in recipe.components.items()}
    defaults = AugmentConfig()
    augment = []
    for domain in ("source", "target"):
        config = getattr(recipe.augment, domain)
        changed = [f"{key}={_plain_value(getattr(config, key))}" for key in AugmentConfig.__dataclass_fields__
                   if getattr(config, key) != getattr(defaults, key)]
        augment.append(f"{domain}: {' '.join(changed) or 'defaults (flip)'}")
    schedule = recipe.schedule
    schedule_text = f"{schedule.iters} it, poly {_number(schedule.poly_power)}" + (
        f", warm-up {schedule.warmup_iters}" if schedule.warmup_iters else "")
    return {
        "recipe": recipe.name, "seed": str(recipe.train.seed),
        "components": " + ".join(f"{k} {_plain_value(weights[k])}" if k in weights else k for k in recipe.components),
        "augment": "; ".join(augment), "schedule": schedule_text, "stage": recipe.stage,
        "source": recipe.data.source, "target": recipe.data.target or " + ".join(recipe.val_domains),
        "model": recipe.model.name,
        "options": "; ".join(f"{k}: {' '.join(f'{o}={_plain_value(v)}' for o, v in opts.items())}"
                             for k, opts in options.items() if opts) or "-",
        "optim": recipe.optim.name, "lr": float(recipe.optim.lr), "batch_size": str(recipe.data.batch_size),
        "iters": str(recipe.schedule.iters), "identity": recipe_identity(recipe),
    }


def _plain_value(value: Any) -> str:
    if isinstance(value, (tuple, list)):  # (H, W) sizes as 512x512, ranges as 0.5-2, lists as [a,b,c]
        if len(value) == 2:
            return ("x" if all(isinstance(v, int) for v in value) else "-").join(map(_plain_value, value))
        return "[" + ",".join(map(_plain_value, value)) + "]"
    return _number(value) if isinstance(value, float) else str(value)


def hparams_summaries(params: dict[str, Any], metrics: dict[str, float]) -> list:
    """The three HParams plugin summaries of one run: its experiment config (every ``HPARAMS``
    name with its type, description and whether it identifies runs, then the ``HPARAM_METRICS``),
    the session start (the values) and the session end (success)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    descriptions = {name: (what, identifying) for name, what, identifying in HPARAMS}
    infos, start = [], plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for name, value in params.items():
        what, identifying = descriptions.get(name, (name, False))
        if isinstance(value, bool):
            start.hparams[name].bool_value, kind = value, api_pb2.DATA_TYPE_BOOL
        elif isinstance(value, (int, float)):
            start.hparams[name].number_value, kind = float(value), api_pb2.DATA_TYPE_FLOAT64
        else:
            start.hparams[name].string_value, kind = str(value), api_pb2.DATA_TYPE_STRING
        # `differs` puts the identifying hparams first: the dashboard shows the first five by default.
        infos.append(api_pb2.HParamInfo(name=name, description=what, type=kind, differs=identifying))
    metric_infos = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=shown, description=what)
                    for tag, shown, what in HPARAM_METRICS]
    metric_infos += [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=tag)
                     for tag in metrics if tag not in {m[0] for m in HPARAM_METRICS}]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metric_infos)
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())

    def summary(tag: str, **content) -> Summary:
        data = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **content)
        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
            plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString()))
        return Summary(value=[Summary.Value(tag=tag, metadata=meta)])

    return [summary(metadata.EXPERIMENT_TAG, experiment=experiment),
            summary(metadata.SESSION_START_INFO_TAG, session_start_info=start),
            summary(metadata.SESSION_END_INFO_TAG, session_end_info=end)]


def run_scores(metrics: dict[str, Any]) -> dict[str, float]:
    """The ``HPARAM_METRICS`` values of a run's ``metrics.json`` record (NaN where not scored)."""
    def miou(record, domain):
        value = ((record or {}).get("domains", {}).get(domain) or {}).get("miou") if domain else None
        return float("nan") if value is None else float(value)

    last, best, primary = metrics.get("last"), metrics.get("best"), metrics.get("primary_domain")
    return {"hparam/last_mIoU": miou(last, primary), "hparam/best_mIoU": miou(best, primary),
            "hparam/source_mIoU": miou(last, metrics.get("source"))}


def finish_run_log(logger: RunLogger, recipe, metrics: dict[str, Any]) -> dict[str, Any]:
    """A finished run's HParams record (who it is and its scores) in every tracker; returns
    ``metrics`` (the run's metrics.json record)."""
    logger.hparams(run_hparams(recipe), run_scores(metrics), step=int(metrics.get("iteration") or 0))
    logger.flush()
    return metrics


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
