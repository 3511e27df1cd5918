"""AdaptSegNet / AdvEnt: the discriminator, where gradients go, the losses, and checkpoint/resume."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from da_seg.engine.trainer import component_setup
from da_seg.config import ConfigError, load_recipe, recipe_from_dict
from da_seg.engine.checkpoint import load_checkpoint
from da_seg.engine.trainer import Trainer
from da_seg.methods import METHODS, build_components
from da_seg.methods.adversarial import SOURCE_LABEL, TARGET_LABEL, adversarial_loss
from da_seg.methods.base import DomainBatch, StepContext
from da_seg.methods.entropy import weighted_self_information
from da_seg.models.discriminator import FCDiscriminator
from da_seg.models.small import build_deeplab_small
from da_seg.runs import find_runs, train

NUM_CLASSES = 5


def test_discriminator_output_is_one_32nd_and_parameter_count():
    d = FCDiscriminator(19)
    assert d(torch.rand(2, 19, 64, 128)).shape == (2, 1, 2, 4)
    assert d(torch.rand(1, 19, 512, 1024)).shape == (1, 1, 16, 32)
    widths = [19, 64, 128, 256, 512, 1]
    expected = sum(c_in * c_out * 16 + c_out for c_in, c_out in zip(widths[:-1], widths[1:]))
    assert sum(p.numel() for p in d.parameters()) == expected == 2_781_121
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)) for m in d.modules())
    small = FCDiscriminator(3, ndf=8)
    assert [m.out_channels for m in small.modules() if isinstance(m, torch.nn.Conv2d)] == [8, 16, 32, 64, 1]
    assert small(torch.rand(1, 3, 32, 40)).shape == (1, 1, 1, 1)        # the smallest map it takes
    with pytest.raises(ValueError, match=r"at least 32x32 .* got \(24, 40\).*augment"):
        small(torch.rand(1, 3, 24, 40))


def test_bce_and_lsgan_values_on_known_scores():
    zeros, twos = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0)
    assert adversarial_loss(zeros, SOURCE_LABEL, "bce").item() == pytest.approx(math.log(2))
    assert adversarial_loss(twos, SOURCE_LABEL, "bce").item() == pytest.approx(math.log(1 + math.e ** 2))
    assert adversarial_loss(twos, TARGET_LABEL, "bce").item() == pytest.approx(math.log(1 + math.e ** -2))
    assert adversarial_loss(zeros, TARGET_LABEL, "lsgan").item() == pytest.approx(1.0)
    assert adversarial_loss(twos, SOURCE_LABEL, "lsgan").item() == pytest.approx(4.0)
    assert adversarial_loss(twos, TARGET_LABEL, "lsgan").item() == pytest.approx(1.0)


def _setup(multi_level=True, schedule=None):
    torch.manual_seed(0)
    model = build_deeplab_small(NUM_CLASSES, width=4, multi_level=multi_level, aspp_channels=8)
    recipe = recipe_from_dict({"name": "unit", "data": {"source": "a", "target": "b"},
                               "schedule": schedule or {"iters": 10}})
    return model, component_setup(recipe, model, torch.device("cpu"))


def _context(model, iteration=5):
    source = DomainBatch(torch.rand(2, 3, 64, 64), torch.randint(0, NUM_CLASSES, (2, 64, 64)))
    target = DomainBatch(torch.rand(2, 3, 64, 96))
    from contextlib import nullcontext
    return StepContext(model=model, iteration=iteration, max_iters=10, source=source, target=target,
                       autocast=nullcontext)


def _grads(module):
    return [p.grad for p in module.parameters()]


@pytest.mark.parametrize("name,loss", [("adaptsegnet", "bce"), ("adaptsegnet", "lsgan"), ("advent", "bce")])
def test_generator_term_trains_only_the_segmenter_and_the_update_only_the_discriminator(name, loss):
    model, setup = _setup()
    (component,) = build_components({name: {"multi_level": True, "loss": loss}}, setup)
    assert set(component.networks) == {"discriminator_main", "discriminator_aux"}
    ctx = _context(model)
    terms = component.losses(ctx)
    assert set(terms) == {"adv", "adv_aux"}
    sum(terms.values()).backward()
    for net in component.networks.values():
        assert all(g is None for g in _grads(net)), "the generator term reached the discriminator"
        assert all(p.requires_grad for p in net.parameters()), "requires_grad was not restored"
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(model.head))
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(model.aux_head))

    model.zero_grad(set_to_none=True)
    side = component.side_losses(ctx)
    assert set(side) == {"d", "d_aux"}
    sum(side.values()).backward()
    assert all(g is None for g in _grads(model)), "the discriminator update reached the segmenter"
    for net in component.networks.values():
        assert all(g is not None and torch.isfinite(g).all() for g in _grads(net))
    stats = component.after_step(ctx)
    assert set(stats) == {"d_accuracy", "d_accuracy_aux"} and all(0 <= v <= 1 for v in stats.values())


def test_terms_match_the_formulas():
    model, setup = _setup(multi_level=False)
    adaptsegnet, advent = build_components({"adaptsegnet": {}, "advent": {"weight": 0.5}}, setup)
    ctx = _context(model)
    with torch.no_grad():
        prob = F.softmax(F.interpolate(ctx.target_out.logits, size=(64, 96), mode="bilinear",
                                       align_corners=False), dim=1)
        d_plain = adaptsegnet.networks["discriminator_main"]
        expected = 1e-3 * F.binary_cross_entropy_with_logits(d_plain(prob), torch.zeros(2, 1, 2, 3))
        assert adaptsegnet.losses(ctx)["adv"].item() == pytest.approx(expected.item(), rel=1e-5)
        d_ent = advent.networks["discriminator_main"]
        scores = d_ent(-prob * torch.log2(prob + 1e-30) / math.log2(NUM_CLASSES))
        assert advent.losses(ctx)["adv"].item() == pytest.approx(
            0.5 * F.binary_cross_entropy_with_logits(scores, torch.zeros_like(scores)).item(), rel=1e-5)
        src = F.softmax(F.interpolate(ctx.source_out.logits, size=(64, 64), mode="bilinear",
                                      align_corners=False), dim=1)
        s_src, s_tgt = d_ent(weighted_self_information(src)), d_ent(weighted_self_information(prob))
        expected_d = 0.5 * (F.binary_cross_entropy_with_logits(s_src, torch.zeros_like(s_src))
                            + F.binary_cross_entropy_with_logits(s_tgt, torch.ones_like(s_tgt)))
    assert advent.side_losses(ctx)["d"].item() == pytest.approx(expected_d.item(), rel=1e-5)


def test_warmup_ramps_the_weight_and_schedule_decays_the_discriminator_lr():
    model, setup = _setup(multi_level=False, schedule={"iters": 10, "poly_iters": 20, "poly_power": 0.9})
    (component,) = build_components({"adaptsegnet": {"warmup_iters": 4}}, setup)
    ctx = _context(model)
    with torch.no_grad():
        weight_at = {}
        for iteration in (0, 2, 8):
            ctx.iteration = iteration
            weight_at[iteration] = component.losses(ctx)["adv"].item()
    assert weight_at[0] == 0.0 and weight_at[2] == pytest.approx(weight_at[8] / 2, rel=1e-6)
    optimizer = component.optimizers["discriminator_main"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    for _ in range(5):
        optimizer.step()
        component.schedulers["discriminator_main"].step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * (1 - 5 / 20) ** 0.9)


def test_bad_options_fail_with_the_key():
    model, setup = _setup(multi_level=False)
    with pytest.raises(ConfigError, match=r"components.advent.loss = 'wgan'; valid: bce, lsgan"):
        build_components({"advent": {"loss": "wgan"}}, setup)
    with pytest.raises(ConfigError, match=r"components.adaptsegnet.weight = -1"):
        build_components({"adaptsegnet": {"weight": -1}}, setup)
    with pytest.raises(ConfigError, match=r"did you mean 'components.advent.aux_weight'"):
        build_components({"advent": {"aux_wieght": 1}}, setup)
    (component,) = build_components({"advent": {"multi_level": True}}, setup)
    with pytest.raises(ValueError, match="multi_level = true, but the model returns no aux_logits"):
        component.losses(_context(model))


def test_registered():
    assert {"adaptsegnet", "advent", "minent"} <= set(METHODS)


def test_end_to_end_with_minent_and_resume_restores_discriminators(write_recipe, tmp_path):
    components = ("[components.source_ce]\n[components.advent]\nweight = 0.01\n"
                  "[components.minent]\nweight = 0.01\n")
    path = write_recipe(components, iters=3)
    recipe = load_recipe(path)
    metrics = train(recipe, tmp_path / "runs", progress=False)
    assert metrics["finished"] and metrics["last"]["domains"]["tiny_tgt"]["miou"] is not None
    (run_dir,) = find_runs(tmp_path / "runs", recipe)
    saved = load_checkpoint(run_dir / "last.pt")["components"]
    assert set(saved) == {"source_ce", "advent", "minent"}
    fresh = FCDiscriminator(3).state_dict()
    trained = saved["advent"]["networks"]["discriminator_main"]
    assert any(not torch.equal(fresh[k], trained[k]) for k in fresh), "the discriminator never trained"
    opt_state = saved["advent"]["optimizers"]["discriminator_main"]
    assert all(s["step"].item() == 3 for s in opt_state["state"].values())
    assert saved["advent"]["schedulers"]["discriminator_main"]["last_epoch"] == 3

    resumed = Trainer(recipe, run_dir, resume=True, progress=False)
    (advent,) = [c for c in resumed.components if c.name == "advent"]
    for k, v in advent.networks["discriminator_main"].state_dict().items():
        assert torch.equal(v, trained[k])
    state = advent.optimizers["discriminator_main"].state_dict()
    assert state["param_groups"] == opt_state["param_groups"]
    for i, s in opt_state["state"].items():
        for k, v in s.items():
            assert torch.equal(state["state"][i][k], v)
    assert advent.schedulers["discriminator_main"].last_epoch == 3
    assert advent.optimizers["discriminator_main"].param_groups[0]["lr"] == pytest.approx(1e-4 * (1 - 3 / 3) ** 0.9)


def test_multi_level_lsgan_trains_through_the_loop(write_recipe, tmp_path):
    components = "[components.source_ce]\n[components.adaptsegnet]\nmulti_level = true\nloss = \"lsgan\"\n"
    path = write_recipe(components, iters=2, extra="eval_every = 2\ncheckpoint_every = 2")
    recipe = load_recipe(path, ["model.options.multi_level=true"])
    trainer = Trainer(recipe, None, progress=False)
    before = {k: v.clone() for k, v in trainer.components[1].networks["discriminator_aux"].state_dict().items()}
    trainer.step()
    trainer.step()
    logs = trainer.flush_logs()
    assert {"loss/adaptsegnet/adv", "loss/adaptsegnet/adv_aux", "side/adaptsegnet/d", "side/adaptsegnet/d_aux",
            "stats/adaptsegnet/d_accuracy", "lr/adaptsegnet/discriminator_aux"} <= set(logs)
    after = trainer.components[1].networks["discriminator_aux"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
