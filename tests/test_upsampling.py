"""The logits upsampling convention (align_corners) is the segmenter's, set by the recipe, used by
every loss and by evaluation, and kept in checkpoints."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from da_seg.config import load_recipe
from da_seg.engine.checkpoint import load_checkpoint, restore_model
from da_seg.engine.evaluate import predict
from da_seg.methods.source import CrossEntropyOptions, segmentation_ce
from da_seg.runs import find_runs, train

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_reproduction_recipes_use_their_codes_convention():
    for name in ("advent", "adaptsegnet", "dacs", "minent", "fda_beta0.05"):
        assert load_recipe(ROOT / "recipes" / "gta5_to_cityscapes" / f"{name}_deeplabv2_r101.toml").model.align_corners
    assert not load_recipe(ROOT / "recipes" / "gta5_to_cityscapes" / "daformer_segformer_b5.toml").model.align_corners
    assert not load_recipe(ROOT / "recipes" / "synthetic" / "streets" / "advent.toml").model.align_corners


def test_losses_and_prediction_follow_the_models_convention(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe(iters=2, extra="eval_every = 2"), ["model.align_corners=true"])
    train(recipe, tmp_path / "runs", progress=False)
    (run_dir,) = find_runs(tmp_path / "runs", recipe)
    model = restore_model(load_checkpoint(run_dir / "last.pt")).eval()
    assert model.align_corners is True
    images = torch.rand(2, 3, 32, 48)
    labels = torch.randint(0, 3, (2, 32, 48))
    with torch.no_grad():
        out = model(images)
        assert out.align_corners is True
        ce = segmentation_ce(out, labels, CrossEntropyOptions(aux_weight=0.0), 255)["ce"]
        for corners in (True, False):
            direct = F.cross_entropy(F.interpolate(out.logits, size=(32, 48), mode="bilinear",
                                                   align_corners=corners), labels)
            assert torch.equal(ce, direct) == corners  # the same computation with True; another with False
        probs = predict(model, images)
        expected = F.interpolate(out.logits, size=(32, 48), mode="bilinear", align_corners=True).softmax(1)
        assert torch.allclose(probs, expected, atol=1e-6)
