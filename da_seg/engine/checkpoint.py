"""Checkpoints: complete training state (models, optimizers, schedules, AMP scalers, RNG,
components, evaluations), written atomically, and the trained segmenter rebuilt from one."""
from __future__ import annotations

import dataclasses
import logging
import pickle
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from da_seg.config import RESUME_SAFE_KEYS, Recipe, recipe_differences
from da_seg.methods.base import Component
from da_seg.methods.common import bare
from da_seg.models import build_model
from da_seg.models.segmenter import InputNorm, Segmenter
from da_seg.utils.files import StorageError, atomic_write, remove_stale_temporaries

log = logging.getLogger(__name__)



class IncompatibleResumeError(ValueError):
    """The recipe given to --resume differs from the one the checkpoint was trained with."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable (empty, truncated, foreign), or not a
    da_seg checkpoint. The message names the file and what is wrong with it."""


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save through a temporary file that replaces ``path`` only once complete; a full disk
    is a StorageError ("no space left on ...") and leaves the previous file loadable."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch says "central directory" or nothing (EOFError): say what it means
        raise CheckpointError(f"cannot read checkpoint {path}: {_why_unreadable(path, err)}") from err


def _why_unreadable(path: Path, err: Exception) -> str:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    torch_says = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
    # torch.save writes a zip archive, whose index is at the end: a copy or a write that was cut
    # short starts like a checkpoint and has no index.
    if size == 0:
        return "the file is empty or truncated (0 bytes)"
    if isinstance(err, EOFError) or head == b"PK\x03\x04":
        return f"the file is empty or truncated ({size} bytes; torch: {torch_says.split('. ')[0]})"
    if isinstance(err, pickle.UnpicklingError):
        return "it holds objects other than tensors and containers, which a weights-only load refuses"
    return f"not a file that torch.save wrote ({type(err).__name__}: {torch_says[:200]})"


def load_segmenter_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint that rebuilds its segmenter (``model_meta`` and ``model``: a da_seg ``last.pt``
    or ``best.pt``), for evaluation and prediction."""
    state = load_checkpoint(Path(path))
    if not isinstance(state, dict) or "model_meta" not in state or "model" not in state:
        missing = "model_meta" if not isinstance(state, dict) or "model_meta" not in state else "model"
        raise CheckpointError(
            f"{path} is not a da_seg checkpoint (it has no {missing!r}, which says how to rebuild the model; "
            "train it with da-seg, whose last.pt and best.pt have it, or give a file of pretrained weights "
            "to a recipe as model.pretrained)")
    return state


# ---------------------------------------------------------------------------------------------
# The segmenter

def model_meta(model: Segmenter, recipe: Recipe, class_names: Sequence[str], colors: Sequence) -> dict[str, Any]:
    """What it takes to rebuild the model for evaluation, input normalization included."""
    return {"name": recipe.model.name, "options": dict(recipe.model.options), "num_classes": model.num_classes,
            "input_norm": dataclasses.asdict(model.input_norm), "align_corners": model.align_corners,
            "class_names": list(class_names),
            "colors": [list(c) for c in colors]}


def _set_input_norm(model: Segmenter, meta: dict[str, Any]) -> None:
    # The input normalization is not a tensor: it travels in the checkpoint's model_meta.
    norm = meta.get("input_norm")
    if norm is not None:
        model.input_norm = InputNorm(tuple(norm["mean"]), tuple(norm["std"]), norm["bgr"], norm["scale"])


def restore_model(checkpoint: dict[str, Any], device: torch.device | str = "cpu") -> Segmenter:
    """Rebuild a trained segmenter from a ``last.pt`` / ``best.pt`` dict (no pretrained file needed)."""
    meta = checkpoint["model_meta"]
    model = build_model(meta["name"], meta["num_classes"], **meta["options"])
    model.load_state_dict(checkpoint["model"])
    _set_input_norm(model, meta)
    model.align_corners = bool(meta.get("align_corners", False))  # older checkpoints: da_seg's default then
    return model.to(device)


def load_trained(path: str | Path, device: torch.device | str = "cpu") -> Segmenter:
    """A trained da_seg segmenter from a checkpoint file, in eval mode."""
    return restore_model(load_segmenter_checkpoint(path), device).eval()


def load_model_weights(model: nn.Module, checkpoint: str | Path) -> None:
    """Start ``model`` from the segmenter weights (and input norm) of a da_seg checkpoint
    (``[model] init_checkpoint``: the previous self-training round's model)."""
    state = load_checkpoint(Path(checkpoint))
    if "model" not in state:
        raise ValueError(f"model.init_checkpoint = {str(checkpoint)!r}: not a da_seg checkpoint (no 'model' entry)")
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise ValueError(f"model.init_checkpoint = {str(checkpoint)!r} does not fit the recipe's model: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    _set_input_norm(model, state.get("model_meta", {}))


# ---------------------------------------------------------------------------------------------
# Training state

def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, in weights_only-loadable types."""
    np_state = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(obj):
    if isinstance(obj, tuple):
        return [_to_lists(o) for o in obj]
    return obj


def components_state(components: Sequence[Component]) -> dict[str, Any]:
    return {c.name: {"networks": {k: bare(n).state_dict() for k, n in c.networks.items()},
                     "optimizers": {k: o.state_dict() for k, o in c.optimizers.items()},
                     "schedulers": {k: s.state_dict() for k, s in c.schedulers.items()},
                     "extra": c.state_dict()} for c in components}


def load_components_state(components: Sequence[Component], state: dict[str, Any]) -> None:
    for component in components:
        saved = state[component.name]
        for k, net in component.networks.items():
            bare(net).load_state_dict(saved["networks"][k])
        for k, opt in component.optimizers.items():
            opt.load_state_dict(saved["optimizers"][k])
        for k, sched in component.schedulers.items():
            sched.load_state_dict(saved["schedulers"][k])
        component.load_state_dict(saved["extra"])


def training_state(trainer) -> dict[str, Any]:
    """Everything a run needs to continue exactly: a ``Trainer``'s models, optimizers, schedules,
    AMP scalers, components, RNG, iteration (the loaders restart from it) and evaluations."""
    source = trainer.source_domain
    return {"iteration": trainer.iteration, "recipe": trainer.recipe.to_dict(),
            "model_meta": model_meta(trainer.model, trainer.recipe, source.class_names, source.colors),
            "model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(),
            "side_scaler": trainer.side_scaler.state_dict(), "components": components_state(trainer.components),
            "rng": rng_state(), "evaluations": trainer.evaluations, "best": trainer.best,
            "resume_changes": trainer.resume_changes}


def remove_stale_checkpoint_writes(run_dir: Path) -> None:
    """Delete the temporary ``.last.pt.*.tmp`` / ``.best.pt.*.tmp`` that a run killed while writing
    a checkpoint left in its folder: each is as large as a checkpoint, and the resumed run writes
    its own under new names, so they would only pile up. Called when the run resumes."""
    for tmp in remove_stale_temporaries(run_dir, ("last.pt", "best.pt")):
        log.info("removed %s, left by a checkpoint write that was interrupted", tmp)


def save_training_state(trainer, run_dir: Path, best: bool = False) -> None:
    """``last.pt`` (the whole state) and, when ``best``, ``best.pt`` (the model alone)."""
    state = training_state(trainer)
    try:
        save_atomic(state, Path(run_dir) / "last.pt")
        if best:
            save_atomic({k: state[k] for k in ("iteration", "recipe", "model_meta", "model")},
                        Path(run_dir) / "best.pt")
    except StorageError as err:
        raise StorageError(f"{err}; stopped at iteration {trainer.iteration}: make room, then continue "
                           f"with --resume {run_dir}") from err


def restore_training_state(trainer, state: dict[str, Any]) -> None:
    """The inverse of :func:`training_state`, into a freshly built ``Trainer``."""
    trainer.model.load_state_dict(state["model"])
    for name in ("optimizer", "scheduler", "scaler", "side_scaler"):
        getattr(trainer, name).load_state_dict(state[name])
    load_components_state(trainer.components, state["components"])
    set_rng_state(state["rng"])
    # Each rank continues its own stream: re-seed relative to the restored generator.
    if trainer.dist.rank:
        torch.manual_seed(torch.initial_seed() + trainer.dist.rank)
    trainer.iteration, trainer.best = state["iteration"], state["best"]
    trainer.evaluations = list(state["evaluations"])
    trainer.resume_changes = list(state.get("resume_changes", []))


def describe_last(run_dir: Path | None) -> str:
    """Which ``last.pt`` a stopped run keeps, and its iteration (for the stop message)."""
    if run_dir is not None and (Path(run_dir) / "last.pt").exists():
        return f"{Path(run_dir) / 'last.pt'} at iteration {load_checkpoint(Path(run_dir) / 'last.pt')['iteration']}"
    return "none was written yet"


def nonfinite_tensors(modules: dict[str, nn.Module], limit: int = 5) -> list[str]:
    """Names of (up to ``limit``) parameters and floating buffers holding NaN or inf; one host read."""
    named = [(f"{prefix}.{name}", t) for prefix, module in modules.items()
             for name, t in (*bare(module).named_parameters(), *bare(module).named_buffers()) if t.is_floating_point()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).cpu()
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok][:limit]




def check_resumable(state: dict[str, Any], recipe: Recipe, path: Path,
                    allow_changes: Sequence[str] = ()) -> dict[str, list]:
    """Refuse to resume a checkpoint with a recipe that trains something else, unless every key
    that differs is named in ``allow_changes``; returns {key: [checkpoint value, new value]}."""
    old, new = state["recipe"], recipe.to_dict()
    defaults = Recipe().to_dict()
    # A key the checkpoint's da_seg did not have yet, at its default now, trains the same thing.
    diffs = [k for k in recipe_differences(old, new) if k not in RESUME_SAFE_KEYS
             and not (_get(old, k) is None and _get(new, k) == _get(defaults, k))]
    unknown = [k for k in allow_changes if k not in diffs]
    refused = [k for k in diffs if k not in allow_changes]
    if refused:
        detail = "; ".join(f"{k}: checkpoint {_get(old, k)!r}, now {_get(new, k)!r}" for k in refused[:8])
        raise IncompatibleResumeError(f"cannot resume {path} with this recipe: it differs at {detail}. "
                                      "Start a new run, resume with the recipe the run was started with, or "
                                      f"name the keys to change: --allow-change {' --allow-change '.join(refused[:8])}")
    if unknown:
        raise IncompatibleResumeError(f"--allow-change {', '.join(unknown)}: the recipe does not change "
                                      f"{'it' if len(unknown) == 1 else 'them'} from {path}")
    return {k: [_get(old, k), _get(new, k)] for k in diffs}


def _get(d: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d
