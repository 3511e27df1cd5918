"""`da-seg export`: TorchScript, torch.export and ONNX files of a trained segmenter give the
logits PyTorch gives, on images of the exported size and any batch size."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from da_seg.cli import main
from da_seg.engine.checkpoint import load_trained
from da_seg.engine.export import export_segmenter, load_exported


def _images(root, batch: int = 2) -> torch.Tensor:
    """(batch, 3, 32, 48) float in [0, 1]: real tiny-domain images, the distribution the model saw."""
    paths = sorted((root / "tiny_src" / "val" / "images").glob("*.png"))[:batch]
    return torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in paths]).float() / 255


@pytest.mark.parametrize("fmt, suffix", [("torchscript", ".ts"), ("exported-program", ".pt2")])
def test_torchscript_and_exported_program_match_pytorch(fmt, suffix, tiny_checkpoint, tiny_domains, tmp_path):
    out = tmp_path / f"model{suffix}"
    result = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "--format", fmt, "--size", "32x48",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "max abs difference to PyTorch on 3 random images" in result.output
    model = load_trained(tiny_checkpoint)
    images = _images(tiny_domains["source"].parent)
    with torch.no_grad():
        expected = model(images).logits                                    # (2, 3, 4, 6) at stride 8
        got = load_exported(out, fmt)(images)
    diff = float((got - expected).abs().max())
    print(f"{fmt}: max abs diff to PyTorch {diff:.3g} (logits up to {float(expected.abs().max()):.3g})")
    assert got.shape == expected.shape == (2, 3, 4, 6) and diff < 1e-4
    sidecar = json.loads((tmp_path / f"model{suffix}.json").read_text())
    assert sidecar["input"] == {"name": "images", "shape": ["N", 3, 32, 48], "dtype": "float32",
                                "values": "RGB in [0, 1]", "normalization_inside": {
                                    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                    "bgr": False, "scale": 1.0}}
    assert sidecar["output"]["shape"] == ["N", 3, 4, 6] and sidecar["output"]["output_stride"] == 8
    assert sidecar["class_names"] == ["red", "green", "blue"] and sidecar["check"]["max_abs_diff"] < 1e-4


def test_raw_input_takes_uint8_pixels(tiny_checkpoint, tiny_domains, tmp_path):
    model = load_trained(tiny_checkpoint)
    report = export_segmenter(model, "exported-program", (32, 48), tmp_path / "raw.pt2", raw_input=True)
    pixels = (_images(tiny_domains["source"].parent, 1) * 255).round().to(torch.uint8)
    with torch.no_grad():
        diff = float((load_exported(report.path, "exported-program")(pixels) - model(pixels.float() / 255).logits)
                     .abs().max())
    print(f"exported-program --raw-input: max abs diff {diff:.3g}")
    assert diff < 1e-4 and report.max_abs_diff < 1e-4
    assert json.loads((tmp_path / "raw.pt2.json").read_text())["input"]["dtype"] == "uint8"


def test_onnx_matches_pytorch_in_onnxruntime(tiny_checkpoint, tiny_domains, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "--format", "onnx", "--size", "32x48",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    images = _images(tiny_domains["source"].parent, 3)
    with torch.no_grad():
        expected = load_trained(tiny_checkpoint)(images).logits.numpy()
    got = session.run(["logits"], {"images": images.numpy()})[0]
    diff = float(np.abs(got - expected).max())
    print(f"onnx (onnxruntime): max abs diff to PyTorch {diff:.3g}")
    assert got.shape == expected.shape and diff < 1e-4


def test_onnx_without_its_packages_says_what_to_install(tiny_checkpoint, tmp_path, monkeypatch):
    import da_seg.engine.export as export

    monkeypatch.setattr(export, "missing_onnx_packages", lambda: ["onnxscript"])
    with pytest.raises(ValueError, match=r"needs the onnxscript package\(s\): pip install 'da-seg\[export\]'"):
        export_segmenter(load_trained(tiny_checkpoint), "onnx", (32, 48), tmp_path / "m.onnx")
