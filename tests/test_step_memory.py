"""A step does the work of the official loops and no more: per-domain backward, shared upsampling."""
from __future__ import annotations

import pytest
import torch

from da_seg.config import load_recipe
from da_seg.engine.trainer import Trainer
from da_seg.methods.base import Component, StepContext, loss_groups


class _Declares(Component):
    def __init__(self, domains):
        self.loss_domains = domains


def test_loss_groups_cut_at_domain_changes_and_fall_back_to_one_backward():
    source, target, none, unknown = _Declares(("source",)), _Declares(("target",)), _Declares(()), _Declares(None)
    assert loss_groups([source, target]) == [[source], [target]]
    assert loss_groups([none, source, source, target, none]) == [[none], [source, source], [target, none]]
    assert loss_groups([source, target], per_domain=False) == [[source, target]]
    assert loss_groups([source, unknown, target]) == [[source, unknown, target]]      # undeclared
    assert loss_groups([source, target, source]) == [[source, target, source]]        # source read again
    both = _Declares(("source", "target"))
    assert loss_groups([both, target]) == [[both, target]]


@pytest.mark.parametrize("components", [
    "[components.source_ce]\n[components.advent]\nndf = 4\nmulti_level = true\n[components.minent]\nmulti_level = true\n",
    "[components.source_ce]\n[components.adaptsegnet]\nndf = 4\n",
])
def test_per_domain_backward_gives_the_joint_backward_gradients(write_recipe, components):
    recipe = load_recipe(write_recipe(components.replace("[components.source_ce]\n",
                                                         "[components.source_ce]\naux_weight = 0.1\n")),
                         ("model.options.multi_level=true",))
    trainers = {}
    for mode in ("per_domain", "joint"):
        trainer = Trainer(recipe, run_dir=None, device="cpu", progress=False)
        if mode == "joint":
            trainer.loss_groups = [list(trainer.components)]
        assert len(trainer.loss_groups) == (2 if mode == "per_domain" else 1)
        trainer.step()
        trainers[mode] = trainer
    per_domain, joint = trainers["per_domain"], trainers["joint"]
    grads = [(n, p.grad) for n, p in per_domain.model.named_parameters() if p.grad is not None]
    assert grads, "no gradient reached the segmenter"
    joint_grads = dict((n, p.grad) for n, p in joint.model.named_parameters())
    for name, grad in grads:
        torch.testing.assert_close(grad, joint_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    for a, b in zip(per_domain.model.parameters(), joint.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for c_a, c_b in zip(per_domain.components, joint.components):  # the discriminators too
        for key in c_a.networks:
            for a, b in zip(c_a.networks[key].parameters(), c_b.networks[key].parameters()):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_source_graph_is_freed_before_the_target_forward(write_recipe, monkeypatch):
    """With per-domain groups the source loss is backpropagated before the target is forwarded."""
    recipe = load_recipe(write_recipe("[components.source_ce]\n[components.minent]\n"))
    trainer = Trainer(recipe, run_dir=None, device="cpu", progress=False)
    events = []
    original_forward = StepContext.forward

    def forward(self, images):
        events.append(("forward", images.shape[0]))
        return original_forward(self, images)

    monkeypatch.setattr(StepContext, "forward", forward)
    first_weight = next(p for p in trainer.model.parameters() if p.requires_grad)
    hook = first_weight.register_post_accumulate_grad_hook(lambda p: events.append(("backward", None)))
    trainer.step()
    hook.remove()
    assert [e[0] for e in events] == ["forward", "backward", "forward", "backward"]


def test_upsampled_logits_are_computed_once_and_never_handed_without_gradient_where_one_is_needed():
    ctx = StepContext(model=None, iteration=0, max_iters=1, source=None, target=None, autocast=None)
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    with torch.no_grad():
        no_grad = ctx.upsampled(logits, (8, 10), True)
    assert not no_grad.requires_grad
    with_grad = ctx.upsampled(logits, (8, 10), True)
    assert with_grad.requires_grad                                  # recomputed: the cached one had none
    assert ctx.upsampled(logits, (8, 10), True) is with_grad         # computed once
    with torch.no_grad():
        again = ctx.upsampled(logits, (8, 10), True)
    assert not again.requires_grad and again.data_ptr() == with_grad.data_ptr()  # detached, shared
    direct = torch.nn.functional.interpolate(logits, size=(8, 10), mode="bilinear", align_corners=True)
    torch.testing.assert_close(with_grad, direct)
    assert ctx.upsampled(logits, (8, 10), False) is not with_grad   # another convention, another map
