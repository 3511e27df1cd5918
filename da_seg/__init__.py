"""da_seg: domain adaptation and generalization for semantic segmentation, in one PyTorch loop.

The Python API, the functions behind ``da-seg train`` and ``da-seg predict``:

    load_recipe(path, overrides=())                  -> Recipe (validated, as `da-seg check` does)
    train(recipe_or_path, runs_root="runs", seed=None, overrides=(), device="auto")   -> run folder
    load_model(checkpoint, device="cpu")             -> trained segmenter, eval mode (a list: ensemble)
    predict(model_or_checkpoint, image_or_path, ...) -> (H, W) uint8 train ids

``import da_seg`` stays cheap: torch and the rest are imported by the functions when called.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # for readers and type checkers only; nothing heavy is imported at run time
    import numpy as np
    from torch import nn

    from da_seg.config import Recipe

__all__ = ["__version__", "load_model", "load_recipe", "predict", "train"]

_version: str | None = None


def _read_version() -> str:
    import configparser

    # In a checkout, its setup.cfg is the truth: an editable install's metadata is a copy made at
    # install time, and a checkout on PYTHONPATH may sit beside another install's metadata.
    setup_cfg = Path(__file__).resolve().parents[1] / "setup.cfg"
    if setup_cfg.is_file():
        parser = configparser.ConfigParser()
        parser.read(setup_cfg)
        if parser.get("metadata", "name", fallback="") == "da-seg":
            return parser.get("metadata", "version")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("da-seg")
    except PackageNotFoundError:  # neither a checkout nor installed (a copied folder)
        return "0+unknown"


def __getattr__(name: str) -> Any:
    # __version__ is read on first use, so that importing da_seg reads no file.
    global _version
    if name == "__version__":
        if _version is None:
            _version = _read_version()
        return _version
    raise AttributeError(f"module 'da_seg' has no attribute {name!r}")


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> "Recipe":
    """A recipe file (``extends`` resolved, ``overrides`` such as ``"optim.lr=1e-3"`` applied),
    checked like ``da-seg check`` checks it, without data or networks. A shipped
    ``recipes/...`` path works from any directory (``da-seg list recipes``)."""
    from da_seg.stages import load
    from da_seg.utils.resources import find_recipe

    return load(find_recipe(path), tuple(overrides))


def train(recipe_or_path: "str | Path | Recipe", runs_root: str | Path = "runs", seed: int | None = None,
          overrides: Sequence[str] = (), device: str = "auto", progress: bool = True) -> Path:
    """Train a recipe as ``da-seg train`` does (a new run folder each time) and return the folder
    holding its ``last.pt``, ``best.pt`` and ``metrics.json``.

    recipe_or_path: a recipe file, or a ``Recipe`` (from :func:`load_recipe`, possibly changed
    with ``dataclasses.replace``). A file whose stage is not ``train`` (translate, self_train)
    runs that stage, which returns its result folder. ``seed``: shortcut for
    ``train.seed=N``; ``overrides``: ``"key=value"`` strings, as ``--set``.
    """
    from da_seg.config import Recipe, apply_override, recipe_from_dict
    from da_seg.runs import train_in_folder
    from da_seg.stages import stage_of, validated

    overrides = tuple(overrides) + ((f"train.seed={seed}",) if seed is not None else ())
    if isinstance(recipe_or_path, Recipe):
        raw = recipe_or_path.to_dict()
        for assignment in overrides:
            apply_override(raw, assignment)
        recipe = validated(recipe_from_dict(raw, source=recipe_or_path.name))
        if recipe.stage != "train":
            raise ValueError(f"recipe {recipe.name!r} is a {recipe.stage} stage, which reads files relative to "
                             "its recipe: pass the recipe's path to da_seg.train")
    else:
        from da_seg.utils.resources import find_recipe

        path = find_recipe(recipe_or_path)
        recipe = load_recipe(path, overrides)
        stage = stage_of(recipe, str(path))
        if stage.name != "train":
            return stage.run(path, overrides=overrides, runs_root=Path(runs_root), device=device, progress=progress)
    folder, _ = train_in_folder(recipe, Path(runs_root), device=device, progress=progress)
    return folder


def load_model(checkpoint: "str | Path | Sequence[str | Path]", device: str = "cpu") -> "nn.Module":
    """The trained segmenter of a ``last.pt`` / ``best.pt``, in eval mode, on ``device``
    (``"auto"``: CUDA when available). Several checkpoints: their softmax ensemble, as
    ``da-seg eval`` and ``da-seg predict`` build it. The model takes (N, 3, H, W) RGB in [0, 1]."""
    from da_seg.engine.inference import load_models
    from da_seg.engine.trainer import pick_device

    paths = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    model, _ = load_models(paths, pick_device(device))
    return model


def predict(model_or_checkpoint: "nn.Module | str | Path", image_or_path: Any, *, mode: str = "whole",
            input_size: tuple[int, int] | None = None, crop: tuple[int, int] | None = None,
            stride: tuple[int, int] | None = None, flip: bool = False, device: str = "cpu") -> "np.ndarray":
    """Train ids (H, W) uint8 of one image at its own resolution, as ``da-seg predict`` writes them.

    model_or_checkpoint: a model from :func:`load_model`, or a checkpoint path (loaded on ``device``).
    image_or_path: an image file, a PIL image, an (H, W, 3) uint8 RGB array, or a (3, H, W) float
    tensor in [0, 1]. ``mode``, ``input_size``, ``crop``, ``stride``, ``flip``: as ``da-seg predict``.
    """
    import numpy as np

    from da_seg.engine.inference import predict_labels, read_rgb

    model = model_or_checkpoint
    if isinstance(model_or_checkpoint, (str, Path)):
        model = load_model(model_or_checkpoint, device)
    image = image_or_path
    if isinstance(image_or_path, (str, Path)):
        image = read_rgb(image_or_path)
    elif hasattr(image_or_path, "convert"):  # a PIL image
        image = np.array(image_or_path.convert("RGB"))
    return predict_labels(model, image, mode=mode, input_size=input_size, crop=crop, stride=stride, flip=flip)
