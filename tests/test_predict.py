"""`da-seg predict` and da_seg.engine.inference: index / colour / overlay PNGs of image files,
equal to what `predict` computes on the same images; unreadable files skipped and named."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from da_seg.cli import main
from da_seg.engine.checkpoint import load_checkpoint, restore_model, save_atomic
from da_seg.engine.evaluate import SoftmaxEnsemble, predict
from da_seg.engine.inference import collect_inputs, load_models, predict_files
from da_seg.utils.visualize import colorize


@pytest.fixture
def images(tmp_path) -> Path:
    """a.png (32x48), sub/b.png (41x57: not a multiple of the output stride), a corrupt c.png
    and a text file, which a folder search ignores."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (41, 57, 3), dtype=np.uint8)).save(folder / "sub" / "b.png")
    (folder / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not the rest of a PNG")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _expected_ids(model, path: Path, **options) -> np.ndarray:
    image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float()[None] / 255
    with torch.inference_mode():
        return predict(model, image, **options).argmax(1)[0].numpy()


def test_predict_writes_three_pngs_per_image_and_skips_the_corrupt_one(tiny_checkpoint, images, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["predict", str(images), "-c", str(tiny_checkpoint), "--out", str(out),
                                       "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "warning: skipped 1 of 3 inputs that could not be read: " + str(images / "c.png") in result.output
    assert "notes.txt" not in result.output
    state = load_checkpoint(tiny_checkpoint)
    model = restore_model(state).eval()
    colors = state["model_meta"]["colors"]
    for name, (height, width) in (("a.png", (32, 48)), ("sub/b.png", (41, 57))):
        index = Image.open(out / "index" / name)
        assert index.mode == "L" and index.size == (width, height)
        ids = np.array(index)
        np.testing.assert_array_equal(ids, _expected_ids(model, images / name))
        color = np.array(Image.open(out / "color" / name))
        np.testing.assert_array_equal(color, colorize(ids, colors).permute(1, 2, 0).numpy())
        blend = np.array(Image.open(out / "overlay" / name)).astype(int)
        source = np.array(Image.open(images / name)).astype(int)
        assert blend.shape == (height, width, 3)
        assert np.abs(blend - (source + color) / 2).max() <= 0.5 + 1e-6  # alpha 0.5, rounded
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(
        f"{kind}/{name}" for kind in ("color", "index", "overlay") for name in ("a.png", "sub/b.png"))


def test_slide_flip_input_size_and_ensemble_match_predict(tiny_checkpoint, images, tmp_path):
    state = load_checkpoint(tiny_checkpoint)
    # A second member that differs: the same weights, perturbed.
    torch.manual_seed(0)
    other = dict(state, model={k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                               for k, v in state["model"].items()})
    second = tmp_path / "other.pt"
    save_atomic(other, second)
    ensemble = SoftmaxEnsemble([restore_model(state).eval(), restore_model(other).eval()])
    cases = {
        "slide": (["--mode", "slide", "--crop", "24x24", "--stride", "16x16", "--flip"],
                  restore_model(state).eval(), dict(mode="slide", crop=(24, 24), stride=(16, 16), flip=True)),
        "resized": (["--input-size", "64x96"], restore_model(state).eval(), dict(input_size=(64, 96))),
        "ensemble": (["-c", str(second)], ensemble, {}),
    }
    for case, (options, model, kwargs) in cases.items():
        out = tmp_path / case
        result = CliRunner().invoke(main, ["predict", str(images / "sub" / "b.png"), "-c", str(tiny_checkpoint),
                                           *options, "--out", str(out), "--device", "cpu", "--no-progress"])
        assert result.exit_code == 0, (case, result.output)
        ids = np.array(Image.open(out / "index" / "b.png"))
        assert ids.shape == (41, 57), case
        np.testing.assert_array_equal(ids, _expected_ids(model, images / "sub" / "b.png", **kwargs), err_msg=case)


def test_nothing_readable_exits_2_and_a_checkpoint_as_input_is_refused(tiny_checkpoint, images, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["predict", str(images / "c.png"), str(images / "missing.png"),
                                  "-c", str(tiny_checkpoint), "--out", str(tmp_path / "out"), "--device", "cpu",
                                  "--no-progress"])
    assert result.exit_code == 2
    assert f"{images / 'missing.png'}: not found" in result.output and "error: no image could be read" in result.output
    assert not (tmp_path / "out").exists()
    result = runner.invoke(main, ["predict", str(tiny_checkpoint), str(images), "--out", str(tmp_path / "out2"),
                                  "-c", str(tiny_checkpoint)])
    assert result.exit_code == 2 and "looks like a checkpoint: name checkpoints with -c" in result.output


def test_inputs_keep_their_relative_paths(images, tmp_path, monkeypatch):
    monkeypatch.chdir(images.parent)
    found, missing = collect_inputs(["images/**/*.png", "nothing*.png"])
    assert {(i.path.as_posix(), i.relative.as_posix()) for i in found} == {
        ("images/a.png", "a.png"), ("images/c.png", "c.png"), ("images/sub/b.png", "sub/b.png")}
    assert missing == [("nothing*.png", "no file matches")]
    # Files named one by one keep their path below the folder they share (a shell-expanded glob).
    found, _ = collect_inputs(["images/a.png", "images/sub/b.png"])
    assert sorted(i.relative.as_posix() for i in found) == ["a.png", "sub/b.png"]
    Image.new("RGB", (4, 4)).save(images / "a.jpg")
    with pytest.raises(ValueError, match="would both write a.png"):
        collect_inputs(["images"])


def test_predict_files_api_reports_skipped_files(tiny_checkpoint, images, tmp_path):
    model, meta = load_models([tiny_checkpoint])
    report = predict_files(model, [images], tmp_path / "out", colors=meta["colors"])
    assert [i.relative.as_posix() for i in report.written] == ["a.png", "sub/b.png"]
    assert [name for name, _ in report.skipped] == [str(images / "c.png")]
    assert report.outputs(report.written[1])["overlay"] == tmp_path / "out" / "overlay" / "sub" / "b.png"
    with pytest.raises(ValueError, match="needs a crop"):
        predict_files(model, [images], tmp_path / "out", colors=meta["colors"], mode="slide")
