"""Prediction on image files: what ``da-seg predict`` and ``da_seg.predict`` run.

Images of any size are predicted at their own resolution (or resized to ``input_size`` for the
network and the prediction upsampled back), one at a time, by :func:`da_seg.engine.evaluate.predict`
(whole image or sliding windows, optional flip, one model or a softmax ensemble), exactly as
``da-seg eval`` scores them. For each input three PNGs are written under the output folder, in
three parallel trees that keep the input's path relative to what was named on the command line:

    index/<rel>.png    train ids, 8-bit greyscale (what an evaluation script reads)
    color/<rel>.png    the ids in the checkpoint's class colours
    overlay/<rel>.png  the colours blended over the image

A file that cannot be decoded is skipped and reported; the others are still written.
"""
from __future__ import annotations

import glob
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from da_seg.engine.checkpoint import load_checkpoint, restore_model
from da_seg.engine.evaluate import PREDICT_MODES, SoftmaxEnsemble, predict
from da_seg.utils.files import save_image_atomic
from da_seg.utils.visualize import colorize, overlay
from da_seg.utils.windows import check_windows

# What a folder or a glob contributes; a file named explicitly is tried whatever its suffix.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
OUTPUT_KINDS = ("index", "color", "overlay")
_GLOB_CHARS = set("*?[")


class UnreadableImageError(ValueError):
    """An input file that is missing or cannot be decoded as an image."""


@dataclass(frozen=True)
class ImageInput:
    """An image file and where its outputs go: ``<out>/<kind>/<relative>`` (suffix ``.png``)."""

    path: Path
    relative: Path


@dataclass
class PredictionReport:
    """written: the inputs whose three PNGs were written; skipped: (input, reason) for the rest."""

    out_dir: Path
    written: list[ImageInput] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def outputs(self, item: ImageInput) -> dict[str, Path]:
        return output_paths(self.out_dir, item)


def output_paths(out_dir: Path, item: ImageInput) -> dict[str, Path]:
    return {kind: Path(out_dir) / kind / item.relative for kind in OUTPUT_KINDS}


# ---------------------------------------------------------------------------------------------
# Models

def load_models(checkpoints: Sequence[str | Path],
                device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """One checkpoint -> its segmenter; several -> their ``SoftmaxEnsemble``, in eval mode.

    Returns (model, meta) where meta is the first checkpoint's ``model_meta`` (class names,
    colours, ...). Members must share the label space: averaging the softmaxes of models whose
    class 3 means different things would be silently wrong.
    """
    if not checkpoints:
        raise ValueError("no checkpoint given")
    models, metas = [], []
    for checkpoint in checkpoints:
        state = load_checkpoint(Path(checkpoint))
        if "model_meta" not in state or "model" not in state:
            raise ValueError(f"{checkpoint} is not a da_seg segmenter checkpoint (no model_meta / model)")
        models.append(restore_model(state, device).eval())
        metas.append(state["model_meta"])
    names = [list(m.get("class_names") or []) for m in metas]
    for checkpoint, other in zip(checkpoints[1:], names[1:]):
        if other and names[0] and other != names[0]:
            raise ValueError(f"{checkpoint} predicts classes {other}, but {checkpoints[0]} predicts {names[0]}: "
                             "an ensemble needs one label space")
    model = models[0] if len(models) == 1 else SoftmaxEnsemble(models).eval()
    return model, dict(metas[0])


def palette_of(meta: dict[str, Any], num_classes: int) -> list[list[int]]:
    """The checkpoint's class colours; a fixed random palette for checkpoints that carry none."""
    colors = [list(c) for c in meta.get("colors") or []]
    if len(colors) >= num_classes:
        return colors
    generator = torch.Generator().manual_seed(0)
    return colors + torch.randint(0, 256, (num_classes - len(colors), 3), generator=generator).tolist()


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Callers keep their module modes (a model borrowed from a training script stays in train mode).
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


# ---------------------------------------------------------------------------------------------
# One image

def read_rgb(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file (greyscale, palette and RGBA converted)."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableImageError("not found" if not path.exists() else "not a file")
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(str(err) or type(err).__name__) from None


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def predict_labels(model: nn.Module, image: np.ndarray | torch.Tensor, *, mode: str = "whole",
                   input_size: tuple[int, int] | None = None, crop: tuple[int, int] | None = None,
                   stride: tuple[int, int] | None = None, flip: bool = False,
                   amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """Train ids of one image at its own resolution.

    image: (H, W, 3) uint8 RGB (as :func:`read_rgb` returns), or a (3, H, W) float tensor in [0, 1].
    input_size: the network sees the image resized to this (H, W); the prediction is upsampled back.
    Returns (H, W) uint8: the argmax of :func:`da_seg.engine.evaluate.predict`'s probabilities.
    """
    device = _device_of(model)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.dtype} {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
    else:
        tensor = image.float()
    batch = tensor[None].to(device)  # (1, 3, H, W)
    with _eval_mode(model), torch.inference_mode():
        probs = predict(model, batch, output_size=tuple(batch.shape[-2:]), mode=mode, input_size=input_size,
                        crop=crop, stride=stride, flip=flip, amp_dtype=amp_dtype)
    return probs.argmax(1)[0].to(torch.uint8).cpu().numpy()  # (H, W); at most 255 classes


# ---------------------------------------------------------------------------------------------
# Files

def _static_prefix(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard: ``data/*/x*.png`` -> ``data``."""
    parts = []
    for part in Path(pattern).parts:
        if _GLOB_CHARS & set(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _folder_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def collect_inputs(inputs: Sequence[str | Path]) -> tuple[list[ImageInput], list[tuple[str, str]]]:
    """Expand image files, folders (recursively: files with an image suffix) and glob patterns
    (``**`` for any depth) into images and their output paths.

    A folder's images keep their path below it, a glob's their path below its static prefix,
    files named one by one their path below the deepest folder they share (so a shell-expanded
    ``photos/*/*.jpg`` keeps the subfolders). Returns (images, [(input, reason)] for inputs
    that name nothing). Raises ValueError when two inputs would write the same output file.
    """
    found: list[ImageInput] = []
    missing: list[tuple[str, str]] = []
    loose: list[Path] = []
    for entry in map(str, inputs):
        path = Path(entry)
        if path.is_dir():
            found += [ImageInput(p, p.relative_to(path)) for p in _folder_images(path)]
        elif path.exists():
            loose.append(path)
        elif _GLOB_CHARS & set(entry):
            prefix = _static_prefix(entry)
            matches = sorted(Path(m) for m in glob.glob(entry, recursive=True))
            if not matches:
                missing.append((entry, "no file matches"))
            for match in matches:
                if match.is_dir():
                    found += [ImageInput(p, p.relative_to(prefix)) for p in _folder_images(match)]
                elif match.suffix.lower() in IMAGE_SUFFIXES:
                    found.append(ImageInput(match, match.relative_to(prefix)))
        else:
            missing.append((entry, "not found"))
    if loose:
        common = Path(os.path.commonpath([str(p.absolute().parent) for p in loose]))
        found += [ImageInput(p, p.absolute().relative_to(common)) for p in loose]
    unique: dict[Path, ImageInput] = {}
    for item in found:
        item = ImageInput(item.path, item.relative.with_suffix(".png"))
        seen = unique.setdefault(item.relative, item)
        if seen.path.resolve() != item.path.resolve():
            raise ValueError(f"{seen.path} and {item.path} would both write {item.relative}: predict them "
                             "into different --out folders")
    return list(unique.values()), missing


def predict_files(model: nn.Module, inputs: Sequence[str | Path], out_dir: str | Path, *,
                  colors: Sequence[Sequence[int]], mode: str = "whole", input_size: tuple[int, int] | None = None,
                  crop: tuple[int, int] | None = None, stride: tuple[int, int] | None = None,
                  flip: bool = False, alpha: float = 0.5, amp_dtype: torch.dtype | None = None,
                  progress: Callable[[int, int], None] | None = None) -> PredictionReport:
    """Predict every image that ``inputs`` name (see :func:`collect_inputs`) and write its index,
    colour and overlay PNGs under ``out_dir`` (module docstring). ``model``: a segmenter or a
    ``SoftmaxEnsemble`` (:func:`load_models`), on the device to run on; ``colors``: one (r, g, b)
    per class. Unreadable files are skipped and listed in the report; settings that cannot work
    (an unknown mode, slide without a crop) fail before any file is read."""
    if mode not in PREDICT_MODES:
        raise ValueError(f"unknown prediction mode {mode!r}; valid: {list(PREDICT_MODES)}")
    if mode == "slide":
        if crop is None:
            raise ValueError("mode 'slide' needs a crop (--crop HxW)")
        check_windows(tuple(crop), tuple(stride or crop))
    if not 0 <= alpha <= 1:
        raise ValueError(f"overlay alpha {alpha} must be in [0, 1]")
    images, missing = collect_inputs(inputs)
    report = PredictionReport(Path(out_dir), skipped=list(missing))
    for done, item in enumerate(images, start=1):
        try:
            rgb = read_rgb(item.path)
        except UnreadableImageError as err:
            report.skipped.append((str(item.path), str(err)))
        else:
            labels = predict_labels(model, rgb, mode=mode, input_size=input_size, crop=crop, stride=stride,
                                    flip=flip, amp_dtype=amp_dtype)
            color = colorize(labels, colors)                                   # (3, H, W) uint8
            blend = overlay(torch.from_numpy(rgb).permute(2, 0, 1), color, alpha)
            paths = report.outputs(item)
            save_image_atomic(Image.fromarray(labels), paths["index"])  # (H, W) uint8 -> mode L
            save_image_atomic(Image.fromarray(color.permute(1, 2, 0).numpy()), paths["color"])
            save_image_atomic(Image.fromarray(blend.permute(1, 2, 0).numpy()), paths["overlay"])
            report.written.append(item)
        if progress is not None:
            progress(done, len(images))
    return report
