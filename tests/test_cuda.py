"""The GPU features of the loop: AMP bf16 / fp16 steps, channels_last, torch.compile.

On CUDA by default (skipped without a GPU); ``DA_SEG_TEST_DEVICE=cpu`` runs the same checks on the
CPU, where AMP resolves to full precision (``amp_dtype_for``) and torch.compile is skipped unless
``DA_SEG_TEST_COMPILE=1`` (it needs a C++ toolchain and tens of seconds). This is the first step
of ``benchmarks/gpu_acceptance.sh``.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from da_seg.config import load_recipe
from da_seg.engine.trainer import Trainer

DEVICE = os.environ.get("DA_SEG_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                reason="no CUDA device (DA_SEG_TEST_DEVICE=cpu runs these on the CPU)")
COMPONENTS = ("[components.source_ce]\n[components.advent]\nndf = 8\n[components.minent]\n"
              "[components.mean_teacher]\nmix = \"classmix\"\n")


def _trainer(write_recipe, *overrides: str) -> Trainer:
    recipe = load_recipe(write_recipe(COMPONENTS, iters=4), overrides)
    return Trainer(recipe, run_dir=None, device=DEVICE, progress=False)


def _train(trainer: Trainer, steps: int) -> dict[str, float]:
    """Run right after the trainer is built (which seeds the global RNG): two trainers built one
    after the other and trained in turn see the same random draws."""
    for _ in range(steps):
        trainer.step()
    return trainer.flush_logs()


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_steps_are_finite_and_follow_the_full_precision_step(write_recipe, amp):
    ref_logs = _train(_trainer(write_recipe, 'train.amp="off"'), 2)
    mixed = _trainer(write_recipe, f'train.amp="{amp}"')
    on_cuda = mixed.device.type == "cuda"
    assert mixed.amp_dtype == ({"bf16": torch.bfloat16, "fp16": torch.float16}[amp] if on_cuda else None)
    assert mixed.scaler.is_enabled() == (on_cuda and amp == "fp16")  # the loss scaler only for fp16
    before = [p.detach().clone() for p in mixed.model.parameters()]
    logs = _train(mixed, 2)
    assert all(math.isfinite(v) for k, v in logs.items() if k.startswith(("loss/", "side/")))
    assert any(not torch.equal(a, p) for a, p in zip(before, mixed.model.parameters()))
    # Same weights and batches: the mixed-precision losses stay close to the fp32 ones.
    assert logs["loss/source_ce/ce"] == pytest.approx(ref_logs["loss/source_ce/ce"], rel=0.05)


def test_channels_last_step_matches_the_contiguous_one(write_recipe):
    ref_logs = _train(_trainer(write_recipe, 'train.amp="off"'), 2)
    channels_last = _trainer(write_recipe, 'train.amp="off"', "model.channels_last=true")
    conv = next(m for m in channels_last.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    logs = _train(channels_last, 2)
    assert logs["loss/total"] == pytest.approx(ref_logs["loss/total"], rel=1e-3)


@pytest.mark.skipif(not DEVICE.startswith("cuda") and os.environ.get("DA_SEG_TEST_COMPILE") != "1",
                    reason="torch.compile on the CPU: set DA_SEG_TEST_COMPILE=1")
def test_compiled_segmenter_trains_like_the_eager_one(write_recipe):
    ref_logs = _train(_trainer(write_recipe, 'train.amp="off"'), 2)
    compiled = _trainer(write_recipe, 'train.amp="off"', "train.compile=true")
    assert compiled.net is not compiled.model  # the wrapper runs the step, the bare model is saved
    logs = _train(compiled, 2)
    assert logs["loss/total"] == pytest.approx(ref_logs["loss/total"], rel=1e-3)
