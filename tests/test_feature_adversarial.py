"""feature_adversarial (FCAN's RAN): the ASPP discriminator's shape, where gradients go, the terms."""
from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from da_seg.config import ConfigError, recipe_from_dict
from da_seg.engine.trainer import component_setup
from da_seg.methods import build_components
from da_seg.methods.base import DomainBatch, StepContext
from da_seg.models.discriminator import ASPPDiscriminator
from da_seg.models.small import build_deeplab_small

NUM_CLASSES = 5


def _setup():
    torch.manual_seed(0)
    model = build_deeplab_small(NUM_CLASSES, width=4, aspp_channels=8)
    recipe = recipe_from_dict({"name": "unit", "data": {"source": "a", "target": "b"}, "schedule": {"iters": 10}})
    return model, component_setup(recipe, model, torch.device("cpu"))


def _context(model):
    source = DomainBatch(torch.rand(2, 3, 32, 48), torch.randint(0, NUM_CLASSES, (2, 32, 48)))
    target = DomainBatch(torch.rand(3, 3, 40, 40))
    return StepContext(model=model, iteration=5, max_iters=10, source=source, target=target, autocast=nullcontext)


def test_aspp_discriminator_predicts_one_score_per_feature_cell_with_dilated_branches():
    d = ASPPDiscriminator(2048)
    assert [b.dilation for b in d.branches] == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert [b.padding for b in d.branches] == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert all(b.out_channels == 128 and b.kernel_size == (3, 3) for b in d.branches)
    assert d.classifier.in_channels == 512 and d.classifier.out_channels == 1
    expected = 4 * (2048 * 128 * 9 + 128) + 512 + 1
    assert sum(p.numel() for p in d.parameters()) == expected
    small = ASPPDiscriminator(16, channels=8, rates=(1, 6))
    for size in [(1, 1), (8, 16), (65, 129)]:
        assert small(torch.rand(2, 16, *size)).shape == (2, 1, *size)


def _grads(module):
    return [p.grad for p in module.parameters()]


@pytest.mark.parametrize("generator_loss", ["minimax", "flipped"])
def test_generator_term_trains_only_the_segmenter_and_the_update_only_the_discriminator(generator_loss):
    model, setup = _setup()
    (component,) = build_components({"feature_adversarial": {"channels": 8, "generator_loss": generator_loss}}, setup)
    discriminator = component.networks["discriminator"]
    assert discriminator.branches[0].in_channels == 32          # layer4 of width-4 deeplab_small: 8 * 4
    ctx = _context(model)
    terms = component.losses(ctx)
    assert set(terms) == {"adv"}
    terms["adv"].backward()
    assert all(g is None for g in _grads(discriminator)), "the segmenter's term reached the discriminator"
    assert all(p.requires_grad for p in discriminator.parameters()), "requires_grad was not restored"
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(model.backbone))
    # the features are the encoder's: the classifier head gets nothing from this term
    assert all(g is None or g.abs().sum() == 0 for g in _grads(model.head))

    model.zero_grad(set_to_none=True)
    side = component.side_losses(ctx)
    assert set(side) == {"d"}
    side["d"].backward()
    assert all(g is None for g in _grads(model)), "the discriminator update reached the segmenter"
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in _grads(discriminator))
    stats = component.after_step(ctx)
    assert set(stats) == {"d_accuracy"} and 0 <= float(stats["d_accuracy"]) <= 1


def test_terms_match_the_paper_formulas():
    model, setup = _setup()
    minimax, flipped = build_components({"feature_adversarial": {"channels": 8, "weight": 0.2}}, setup) + \
        build_components({"feature_adversarial": {"channels": 8, "weight": 0.5, "generator_loss": "flipped"}}, setup)
    ctx = _context(model)
    with torch.no_grad():
        f_s, f_t = ctx.source_out.features["backbone"], ctx.target_out.features["backbone"]
        d = minimax.networks["discriminator"]
        p_t, p_s = torch.sigmoid(d(f_t)), torch.sigmoid(d(f_s))
        assert p_t.shape == (3, 1, *f_t.shape[-2:])
        l_adv = -torch.log(p_t).mean() - torch.log(1 - p_s).mean()              # FCAN eq. 5
        assert minimax.losses(ctx)["adv"].item() == pytest.approx(-0.2 * l_adv.item(), rel=1e-5)
        assert minimax.side_losses(ctx)["d"].item() == pytest.approx(l_adv.item(), rel=1e-5)
        d2 = flipped.networks["discriminator"]
        scores = d2(f_t)
        assert flipped.losses(ctx)["adv"].item() == pytest.approx(
            0.5 * F.binary_cross_entropy_with_logits(scores, torch.zeros_like(scores)).item(), rel=1e-5)


def test_the_width_probe_keeps_batchnorm_statistics_and_a_missing_feature_names_the_valid_ones():
    model, setup = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    build_components({"feature_adversarial": {"feature": "layer2", "channels": 4}}, setup)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match=r"feature = 'res5c'.*backbone, layer1, layer2, layer3, layer4"):
        build_components({"feature_adversarial": {"feature": "res5c"}}, setup)
    with pytest.raises(ConfigError, match=r"rates"):
        build_components({"feature_adversarial": {"rates": [0, 2]}}, setup)
