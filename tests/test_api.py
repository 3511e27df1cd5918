"""The public Python API of da_seg/__init__.py: cheap to import, the README's example runs as
written, and train / load_model / predict agree with the engine they wrap."""
from __future__ import annotations

import configparser
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import da_seg
from da_seg.cli import main
from da_seg.engine.evaluate import SoftmaxEnsemble, predict

ROOT = Path(__file__).resolve().parents[1]
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("DA_SEG_")}, "PYTHONPATH": str(ROOT),
       "OMP_NUM_THREADS": "1"}


def _setup_cfg_version() -> str:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser["metadata"]["version"]


def test_import_is_cheap_and_the_version_is_setup_cfgs():
    code = "import sys, da_seg; print('torch' in sys.modules, da_seg.__version__)"
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False", _setup_cfg_version()], done.stderr
    assert da_seg.__version__ == _setup_cfg_version()
    assert CliRunner().invoke(main, ["--version"]).output == f"da-seg, version {_setup_cfg_version()}\n"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        da_seg.nope


def test_readme_python_api_example_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    (example,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    (tmp_path / "example.py").write_text(example)
    # From a directory without recipes/: the shipped recipe is found by its listed name.
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"da_seg \S+: 0-\S+ predicts \(64, 128\) uint8, classes \[[0-7 ]+\]", done.stdout), done.stdout
    (metrics,) = (tmp_path / "api_demo_runs").rglob("metrics.json")
    assert json.loads(metrics.read_text())["iteration"] == 20


def test_train_a_recipe_object_with_overrides_and_seed(write_recipe, tmp_path):
    recipe = da_seg.load_recipe(write_recipe(iters=6, extra="eval_every = 2"))
    changed = dataclasses.replace(recipe, name="changed")
    run = da_seg.train(changed, runs_root=tmp_path / "runs", seed=3, device="cpu", progress=False,
                       overrides=["schedule.iters=2", "train.checkpoint_every=2"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["recipe"], metrics["seed"], metrics["iteration"], metrics["finished"]) == ("changed", 3, 2, True)
    assert run.parent.parent.name == "changed" and (run / "last.pt").is_file()
    with pytest.raises(ValueError, match="components.minent.weight"):
        da_seg.train(recipe, tmp_path / "runs", overrides=["components.minent.weight=-1"])


def test_predict_takes_paths_arrays_pil_images_and_tensors(tiny_checkpoint, tmp_path):
    model = da_seg.load_model(tiny_checkpoint)
    assert not model.training
    rgb = np.random.default_rng(0).integers(0, 256, (37, 45, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    image = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        expected = predict(model, image[None], flip=True).argmax(1)[0].numpy()
    for given in (tmp_path / "x.png", str(tmp_path / "x.png"), rgb, Image.fromarray(rgb), image):
        ids = da_seg.predict(model, given, flip=True)
        assert ids.dtype == np.uint8 and ids.shape == (37, 45)
        np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(da_seg.predict(tiny_checkpoint, rgb, flip=True), expected)
    assert isinstance(da_seg.load_model([tiny_checkpoint, tiny_checkpoint]), SoftmaxEnsemble)
    # A model in train mode is predicted in eval mode and handed back in train mode.
    model.train()
    np.testing.assert_array_equal(da_seg.predict(model, rgb, flip=True), expected)
    assert model.training
