"""Every da_seg component runs a short training step on a DINOv2 ViT-S/14 segmenter (the real
timm ViT-S code path, one block kept, a 16-channel decoder, 32 x 48 images that are not
multiples of 14). The SAN-SAW / ISW blocks sit between CNN stages (``dg_norm`` of the ResNet
models), so on a ViT those components must refuse with a clear message; CycleGAN trains no
segmenter (translate stage) and is not listed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe_text
from da_seg.config import ConfigError, load_recipe
from da_seg.methods import METHODS
from da_seg.runs import find_runs, train

VIT_MODEL = '[model]\nname = "dinov2_vits14"\noptions = { depth = 1, decoder_dim = 16 }\n'
SMALL_MODEL = '[model]\nname = "deeplab_small"\noptions = { width = 8, aspp_channels = 16 }\n'

COMPONENTS = {
    "source_ce": "[components.source_ce]\n",
    "target_ce": "[components.target_ce]\n",
    "target_bn": "[components.source_ce]\n[components.target_bn]\n",
    "adaptsegnet": "[components.source_ce]\n[components.adaptsegnet]\n",
    "advent": "[components.source_ce]\n[components.advent]\n",
    "minent": "[components.source_ce]\n[components.minent]\n",
    "mean_teacher": "[components.source_ce]\n[components.mean_teacher]\n",
    "fda": "[components.fda]\nbeta = 0.1\n[components.source_ce]\n",
    "mic": "[components.source_ce]\n[components.mean_teacher]\n[components.mic]\nblock_size = 8\n",
    "sac": "[components.source_ce]\n[components.sac]\n",
    "feature_adversarial": "[components.source_ce]\n[components.feature_adversarial]\nfeature = \"block0\"\n",
}
NOT_FOR_VIT = {"san_saw", "isw"}          # need model.options.dg_norm (CNN stages)
OTHER_STAGE = {"cyclegan"}                # translate stage: no segmenter
COVERED_ELSEWHERE = {"pseudo_ce"}         # needs a pseudo-labelled target: test_cbst_round_on_a_vit below


def vit_recipe(tiny_domains, tmp_path: Path, components: str, name: str = "vit.toml", iters: int = 2,
               stage: str = "") -> Path:
    text = tiny_recipe_text(tiny_domains, components, iters=iters, stage=stage,
                            extra="eval_every = 2\ncheckpoint_every = 2").replace(SMALL_MODEL, VIT_MODEL)
    assert VIT_MODEL in text
    path = tmp_path / name
    path.write_text(text.replace('name = "tiny"', f'name = "{Path(name).stem}"'))
    return path


def test_the_list_covers_every_method():
    assert set(COMPONENTS) | NOT_FOR_VIT | OTHER_STAGE | COVERED_ELSEWHERE == set(METHODS)


@pytest.mark.parametrize("method", sorted(COMPONENTS))
def test_component_trains_a_dinov2_segmenter(method, tiny_domains, tmp_path):
    recipe = load_recipe(vit_recipe(tiny_domains, tmp_path, COMPONENTS[method]))
    torch.manual_seed(0)
    metrics = train(recipe, tmp_path / "runs", device="cpu", progress=False)
    (run,) = find_runs(tmp_path / "runs", recipe)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["finished"] and saved["iteration"] == 2
    assert 0 <= metrics["last"]["domains"]["tiny_tgt"]["miou"] <= 100


def test_mean_teacher_feature_distance_with_a_dinov2_reference(tiny_domains, tmp_path):
    from da_seg.models import build_model

    reference = build_model("dinov2_vits14", 3, depth=1, decoder_dim=16)
    weights = tmp_path / "dinov2_reference.pth"
    torch.save({k.removeprefix("backbone.vit."): v for k, v in reference.state_dict().items()
                if k.startswith("backbone.vit.")}, weights)          # a timm-layout encoder file
    components = (f"[components.source_ce]\n[components.mean_teacher]\nfeature_distance_weight = 0.005\n"
                  f'imagenet_weights = "{weights}"\n')
    recipe = load_recipe(vit_recipe(tiny_domains, tmp_path, components))
    assert train(recipe, tmp_path / "runs", device="cpu", progress=False)["last"] is not None


@pytest.mark.parametrize("method", sorted(NOT_FOR_VIT))
def test_cnn_normalization_blocks_refuse_a_vit(method, tiny_domains, tmp_path):
    recipe = load_recipe(vit_recipe(tiny_domains, tmp_path, f"[components.source_ce]\n[components.{method}]\n"))
    with pytest.raises(ConfigError, match=rf"components.{method} needs"):
        train(recipe, tmp_path / "runs", device="cpu", progress=False)


def test_cbst_round_on_a_vit(tiny_domains, unlabelled_target, tmp_path, monkeypatch):
    from da_seg.stages.self_train import run_rounds

    vit_recipe(tiny_domains, tmp_path, "[components.source_ce]\n", name="warm.toml")
    cbst = vit_recipe(tiny_domains, tmp_path, "[components.source_ce]\n[components.pseudo_ce]\n[self_train]\n"
                      'rounds = 1\nportion_start = 0.3\nwarmup_recipe = "warm.toml"\n',
                      name="cbst.toml", stage="self_train")
    monkeypatch.chdir(tmp_path)
    (summary,) = run_rounds(cbst, runs_root=Path("runs"), overrides=[f"data.target={unlabelled_target}"],
                            progress=False)
    assert summary["last_miou"] is not None
