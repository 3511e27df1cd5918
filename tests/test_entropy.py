"""MinEnt and the entropy maps: formulas, options, and one target forward shared with AdvEnt."""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from da_seg.engine.trainer import component_setup
from da_seg.config import load_recipe, recipe_from_dict
from da_seg.engine.trainer import Trainer
from da_seg.methods import build_components
from da_seg.methods.base import DomainBatch, StepContext
from da_seg.methods.entropy import entropy_loss, pixel_entropy, weighted_self_information
from da_seg.models.small import build_deeplab_small


def test_self_information_map_equals_the_formula():
    prob = torch.softmax(torch.randn(2, 7, 5, 6), dim=1)
    expected = -prob.numpy() * np.log(prob.numpy() + 1e-30) / np.log(2) / np.log2(7)
    assert weighted_self_information(prob).shape == (2, 7, 5, 6)
    np.testing.assert_allclose(weighted_self_information(prob).numpy(), expected, rtol=1e-5, atol=1e-7)


def test_entropy_is_zero_for_one_hot_and_one_for_uniform():
    one_hot = F.one_hot(torch.randint(0, 4, (2, 3, 3)), 4).permute(0, 3, 1, 2).float()
    assert torch.allclose(pixel_entropy(one_hot), torch.zeros(2, 3, 3))
    assert entropy_loss(one_hot).item() == 0.0
    uniform = torch.full((2, 4, 3, 3), 0.25)
    assert torch.allclose(pixel_entropy(uniform), torch.ones(2, 3, 3))
    assert entropy_loss(uniform).item() == pytest.approx(1.0)
    assert torch.isfinite(torch.autograd.functional.jacobian(lambda p: entropy_loss(p), one_hot)).all()


def test_entropy_loss_is_advents_normalization():
    prob = torch.softmax(torch.randn(3, 5, 4, 6), dim=1)
    n, c, h, w = prob.shape
    advent = -(prob * torch.log2(prob + 1e-30)).sum() / (n * h * w * np.log2(c))
    assert entropy_loss(prob).item() == pytest.approx(advent.item(), rel=1e-6)


def test_robust_and_class_balanced_variants():
    prob = torch.softmax(3 * torch.randn(2, 3, 4, 4), dim=1)
    ent = pixel_entropy(prob)
    assert entropy_loss(prob, robust_eta=2.0).item() == pytest.approx(((ent ** 2 + 1e-8) ** 2).mean().item(), rel=1e-6)
    predicted = prob.argmax(1)
    per_class = [ent[predicted == c].mean().item() for c in range(3) if (predicted == c).any()]
    assert entropy_loss(prob, class_balance=True).item() == pytest.approx(np.mean(per_class), rel=1e-6)
    # One predicted class on a single pixel weighs as much as one predicted on all the others.
    logits = torch.zeros(1, 2, 1, 10)
    logits[0, 0] = 1.0
    logits[0, 1, 0, 0] = 3.0
    skewed = torch.softmax(logits, dim=1)
    ent = pixel_entropy(skewed)[0, 0]
    assert entropy_loss(skewed, class_balance=True).item() == pytest.approx(
        (ent[0] + ent[1:].mean()).item() / 2, rel=1e-6)


def _setup():
    torch.manual_seed(0)
    model = build_deeplab_small(4, width=4, multi_level=True, aspp_channels=8)
    recipe = recipe_from_dict({"name": "unit", "data": {"source": "a", "target": "b"}})
    setup = component_setup(recipe, model, torch.device("cpu"))
    ctx = StepContext(model=model, iteration=3, max_iters=10, source=None,
                      target=DomainBatch(torch.rand(2, 3, 32, 48)), autocast=nullcontext)
    return model, setup, ctx


def test_minent_losses_on_upsampled_target_softmax_with_aux():
    model, setup, ctx = _setup()
    (minent,) = build_components({"minent": {"multi_level": True, "weight": 2.0, "aux_weight": 0.5}}, setup)
    terms = minent.losses(ctx)
    out = ctx.target_out
    up = lambda x: F.softmax(F.interpolate(x, size=(32, 48), mode="bilinear", align_corners=False), dim=1)
    assert terms["ent"].item() == pytest.approx(2.0 * entropy_loss(up(out.logits)).item(), rel=1e-5)
    assert terms["ent_aux"].item() == pytest.approx(0.5 * entropy_loss(up(out.aux_logits)).item(), rel=1e-5)
    sum(terms.values()).backward()
    assert model.head.classifier.weight.grad.abs().sum() > 0 and model.aux_head.classifier.weight.grad.abs().sum() > 0
    (ramped,) = build_components({"minent": {"weight": 2.0, "warmup_iters": 6}}, setup)
    assert ramped.losses(ctx)["ent"].item() == pytest.approx(terms["ent"].item() * 3 / 6, rel=1e-5)
    image = minent.visuals(ctx)["target_entropy"]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 96)


def test_minent_and_advent_cost_one_target_forward(write_recipe):
    components = "[components.source_ce]\n[components.advent]\n[components.minent]\n"
    trainer = Trainer(load_recipe(write_recipe(components, iters=2)), None, progress=False)
    batches = []
    trainer.model.register_forward_hook(lambda module, args, out: batches.append(args[0].shape))
    trainer.step()
    assert all(tuple(shape) == (2, 3, 32, 48) for shape in batches)  # tiny recipe: batch 2 of 32x48
    assert len(batches) == 2  # one source forward, one target forward, for three components


def test_target_bn_moves_batchnorm_statistics_without_a_loss_or_gradient():
    model, setup, ctx = _setup()
    (control,) = build_components({"target_bn": {}}, setup)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model.train()
    assert control.losses(ctx) == {}
    assert not torch.allclose(bn.running_mean, before)          # the statistics saw the target batch
    assert all(p.grad is None for p in model.parameters())
    assert "target" not in ctx._cache   # a gradient-free output must not be served to other components
