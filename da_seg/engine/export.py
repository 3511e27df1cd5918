"""A trained segmenter as a file other runtimes load: ONNX, TorchScript or a torch.export program.

The exported graph is :class:`LogitsOnly`: images in, logits out, with the segmenter's own input
normalization inside (ImageNet mean/std, or Caffe BGR 0-255), so a consumer feeds plain RGB:

    images: (N, 3, H, W) float32 RGB in [0, 1]   (raw_input: uint8 RGB in 0..255)
    logits: (N, C, h, w) float32 at the network's output stride, not upsampled; the argmax of
            their bilinear upsampling to (H, W), with the model's align_corners, is what
            ``da-seg predict`` writes.

H and W are fixed at export (``size``); the batch dimension is dynamic. Every export is loaded
back and compared with PyTorch on random images, and a JSON file beside it records the input and
output conventions, classes and colours.

ONNX goes through the dynamo exporter (torch.export, opset 18), not the TorchScript-based one:
the latter at opsets 9 and 10 writes bilinear interpolation as Upsample/Resize with asymmetric
coordinates, which is not PyTorch's half-pixel convention (a random-weight DeepLabV2-R50 with its
logits upsampled in the graph differed by 10.9, logits up to 39; by 6e-5 from opset 11 on, where
Resize has coordinate_transformation_mode), and refuses align_corners=True.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from da_seg.models.segmenter import Segmenter
from da_seg.utils.files import write_json_atomic

EXPORT_FORMATS = ("onnx", "torchscript", "exported-program")
ONNX_PACKAGES = ("onnx", "onnxscript")
# The example batch is 2: torch.export specializes a dimension of size 1 to a constant.
_EXAMPLE_BATCH = 2


class LogitsOnly(nn.Module):
    """What is exported: (N, 3, H, W) images -> (N, C, h, w) logits of the wrapped segmenter.

    raw_input: the images are uint8 0..255 (as decoded from a file) and are scaled here; else
    float in [0, 1]. The segmenter normalizes either way (``Segmenter.forward``).
    """

    def __init__(self, segmenter: Segmenter, raw_input: bool = False):
        super().__init__()
        self.segmenter = segmenter
        self.raw_input = raw_input

    def forward(self, images: Tensor) -> Tensor:
        if self.raw_input:
            images = images.to(torch.float32) / 255
        return self.segmenter(images).logits


@dataclass
class ExportReport:
    """max_abs_diff: |exported - PyTorch| over the check images (None when not checked);
    reference_max: the largest |logit| of the reference, to read the difference against."""

    path: Path
    format: str
    input_shape: tuple
    output_shape: tuple
    max_abs_diff: float | None
    reference_max: float
    note: str = ""

    @property
    def tolerance(self) -> float:
        # float32 reassociation in a different runtime: relative to the size of the logits.
        return 1e-4 * max(1.0, self.reference_max)

    @property
    def matches(self) -> bool:
        return self.max_abs_diff is None or self.max_abs_diff <= self.tolerance


def missing_onnx_packages() -> list[str]:
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def _example_images(size: tuple[int, int], batch: int, raw_input: bool, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    if raw_input:
        return torch.randint(0, 256, (batch, 3, *size), generator=generator, dtype=torch.uint8)
    return torch.rand(batch, 3, *size, generator=generator)


@contextmanager
def _quiet_torchscript() -> Iterator[None]:
    # PyTorch deprecates TorchScript (FutureWarning) but it is still what many runtimes load; the
    # tracer's warning is about the input normalization's mean/std, which are constants indeed.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _write(module: LogitsOnly, fmt: str, example: Tensor, out: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = {"images": {0: batch}}
    if fmt == "torchscript":
        with _quiet_torchscript():
            torch.jit.save(torch.jit.trace(module, (example,)), str(out))
    elif fmt == "exported-program":
        torch.export.save(torch.export.export(module, (example,), dynamic_shapes=dynamic), str(out))
    elif fmt == "onnx":
        missing = missing_onnx_packages()
        if missing:
            raise ValueError(f"ONNX export needs the {' and '.join(missing)} package(s): "
                             "pip install 'da-seg[export]'")
        program = torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes=dynamic,
                                    input_names=["images"], output_names=["logits"], verbose=False)
        program.save(str(out))
    else:
        raise ValueError(f"unknown export format {fmt!r}; valid: {', '.join(EXPORT_FORMATS)}")


def load_exported(path: str | Path, fmt: str) -> Callable[[Tensor], Tensor] | None:
    """A function images -> logits running the exported file in its own runtime; None for ONNX
    without onnxruntime installed."""
    if fmt == "torchscript":
        with _quiet_torchscript():
            scripted = torch.jit.load(str(path), map_location="cpu")
        return lambda images: scripted(images)
    if fmt == "exported-program":
        program = torch.export.load(str(path)).module()
        return lambda images: program(images)
    if fmt == "onnx":
        if importlib.util.find_spec("onnxruntime") is None:
            return None
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda images: torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
    raise ValueError(f"unknown export format {fmt!r}; valid: {', '.join(EXPORT_FORMATS)}")


def export_segmenter(model: Segmenter, fmt: str, size: tuple[int, int], out: str | Path, *,
                     raw_input: bool = False, meta: dict[str, Any] | None = None,
                     check: bool = True) -> ExportReport:
    """Write ``model`` (a trained segmenter) as ``fmt`` to ``out``, for (N, 3, *size) images, plus
    ``out + ".json"`` describing it (``meta``: the checkpoint's model_meta, for classes and
    colours). ``check``: load the file back and compare with PyTorch on three random images."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid: {', '.join(EXPORT_FORMATS)}")
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"export size must be a positive (H, W), got {tuple(size)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    module = LogitsOnly(model.cpu(), raw_input).eval()
    with torch.no_grad():
        example = _example_images(size, _EXAMPLE_BATCH, raw_input, seed=0)
        _write(module, fmt, example, out)
        probe = _example_images(size, 3, raw_input, seed=1)  # another batch size than the example's
        reference = module(probe)
        run = load_exported(out, fmt) if check else None
        diff = float((run(probe).float() - reference).abs().max()) if run is not None else None
    note = "" if diff is not None or not check else "onnxruntime is not installed: the export was not run"
    report = ExportReport(out, fmt, ("N", 3, *size), ("N", *reference.shape[1:]), diff,
                          float(reference.abs().max()), note)
    meta = meta or {}
    write_json_atomic({
        "format": fmt,
        "input": {"name": "images", "shape": list(report.input_shape),
                  "dtype": "uint8" if raw_input else "float32",
                  "values": "RGB 0..255" if raw_input else "RGB in [0, 1]",
                  # ((x * scale)[in BGR order if bgr] - mean) / std, applied by the model itself
                  "normalization_inside": dataclasses.asdict(model.input_norm)},
        "output": {"name": "logits", "shape": list(report.output_shape),
                   "output_stride": getattr(model, "output_stride", None),
                   "upsample": {"mode": "bilinear", "align_corners": bool(model.align_corners)}},
        "model": meta.get("name"), "model_options": meta.get("options", {}),
        "class_names": meta.get("class_names", []), "colors": meta.get("colors", []),
        "check": {"max_abs_diff": diff, "reference_max_abs": report.reference_max},
    }, out.with_name(out.name + ".json"))
    return report


def _shape(dims: tuple) -> str:
    return "(" + ", ".join(map(str, dims)) + ")"


def describe(report: ExportReport) -> str:
    """One line for the console."""
    line = (f"exported {report.format} to {report.path}: images {_shape(report.input_shape)} -> logits "
            f"{_shape(report.output_shape)}")
    if report.max_abs_diff is not None:
        line += (f"; max abs difference to PyTorch on 3 random images {report.max_abs_diff:.3g} "
                 f"(logits up to {report.reference_max:.3g})")
    return line + (f"; {report.note}" if report.note else "")
