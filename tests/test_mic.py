"""MIC (masked image consistency): the block mask, the masked value, gradients, sharing the teacher."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from da_seg.config import ConfigError, load_recipe
from da_seg.engine.trainer import Trainer
from da_seg.methods import validate
from da_seg.methods.base import StepContext, parse_options
from da_seg.methods.masking import MaskedImageConsistency, block_mask, mask_images, normalized_zero
from da_seg.methods.self_training import weighted_pixel_ce
from da_seg.models.segmenter import INPUT_NORMS

MT = "[components.source_ce]\n[components.mean_teacher]\nthreshold = 0.6\n"
MIC = "[components.mic]\nblock_size = 8\n"
ROOT = Path(__file__).resolve().parents[1]


def test_block_mask_is_the_cell_grid_upsampled_for_a_fixed_generator():
    keep = block_mask(2, 16, 24, 8, 0.7, generator=torch.Generator().manual_seed(5))
    cells = torch.rand((2, 1, 2, 3), generator=torch.Generator().manual_seed(5)) > 0.7
    expected = cells.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3).float()
    assert keep.shape == (2, 1, 16, 24) and torch.equal(keep, expected)
    # round(H / b) cells when b does not divide H: 10 / 4 -> 2 cells (banker's rounding, as MIC's round)
    keep = block_mask(1, 10, 13, 4, 0.5, generator=torch.Generator().manual_seed(1))
    cells = (torch.rand((1, 1, 2, 3), generator=torch.Generator().manual_seed(1)) > 0.5).float()
    rows, cols = torch.arange(10) * 2 // 10, torch.arange(13) * 3 // 13            # nearest: floor(i * cells / H)
    assert torch.equal(keep[0, 0], cells[0, 0][rows][:, cols])


def test_block_mask_keeps_three_tenths_of_the_cells_as_whole_blocks():
    keep = block_mask(64, 512, 512, 64, 0.7, generator=torch.Generator().manual_seed(0))
    per_cell = F.avg_pool2d(keep, 64)                                          # (64, 1, 8, 8): 4096 cells
    assert torch.equal(per_cell, per_cell.round())                             # each cell all kept or all masked
    kept = float(per_cell.mean())
    assert abs(kept - 0.3) < 4 * (0.3 * 0.7 / per_cell.numel()) ** 0.5        # binomial, 4 sigma
    assert float(block_mask(1, 64, 64, 8, 0.0).min()) == 1.0                    # ratio 0 masks nothing


@pytest.mark.parametrize("norm", ["imagenet", "caffe"])
def test_masked_pixels_are_the_normalized_zero(norm):
    model = torch.nn.Module()
    model.input_norm = INPUT_NORMS[norm]
    images = torch.rand(2, 3, 16, 16)
    keep = block_mask(2, 16, 16, 4, 0.7, generator=torch.Generator().manual_seed(2))
    normalized = INPUT_NORMS[norm].apply(mask_images(images, keep, normalized_zero(model)))
    masked = keep.expand_as(images) == 0
    assert masked.any() and (~masked).any()
    assert normalized[masked].abs().max() < 1e-4
    assert torch.allclose(normalized[~masked], INPUT_NORMS[norm].apply(images)[~masked], atol=1e-4)


def test_options_are_checked():
    for bad in ({"mask_ratio": 1.0}, {"block_size": 0}, {"teacher": "ema"}, {"weight": -1.0}):
        with pytest.raises(ConfigError, match=f"components.mic.{next(iter(bad))}"):
            parse_options(MaskedImageConsistency, bad)


def test_a_shared_teacher_needs_a_self_training_component(write_recipe):
    with pytest.raises(ConfigError, match="add \\[components.mean_teacher\\]"):
        validate(load_recipe(write_recipe("[components.source_ce]\n" + MIC)))
    validate(load_recipe(write_recipe(MT + MIC)))
    validate(load_recipe(write_recipe("[components.source_ce]\n" + MIC + 'teacher = "own"\n')))


def _context(trainer: Trainer) -> StepContext:
    source, target = trainer.next_batches()
    return StepContext(model=trainer.net, iteration=0, max_iters=6, source=source, target=target,
                       autocast=trainer.autocast)


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_with_mean_teacher_the_teacher_runs_once_and_mic_learns_its_pseudo_labels(write_recipe):
    trainer = Trainer(load_recipe(write_recipe(MT + MIC)), None, progress=False)
    mean_teacher, mic = trainer.components[1], trainer.components[2]
    assert "teacher" not in mic.networks                                      # no second teacher
    teacher_calls, student_calls = _count_calls(mean_teacher.teacher), _count_calls(trainer.model)
    ctx = _context(trainer)
    for component in trainer.components:
        component.prepare_batches(ctx)
    terms = {c.name: c.losses(ctx) for c in trainer.components}
    assert teacher_calls[0] == 1 and student_calls[0] == 3                    # source, mixed, masked
    assert set(terms["mic"]) == {"masked_ce"}
    # The masked term: weighted CE of the student on the jittered, masked target against the shared labels.
    pseudo = ctx.target_pseudo
    assert not pseudo.labels.requires_grad and not pseudo.weights.requires_grad
    torch.manual_seed(4)
    with torch.no_grad():
        images = mic.strong(ctx.target.images)
    keep = block_mask(2, *images.shape[-2:], 8, 0.7)
    out = trainer.model(mask_images(images, keep, mic.zero))
    expected = weighted_pixel_ce(out.logits, pseudo.labels, pseudo.weights)
    torch.manual_seed(4)
    again = mic.losses(ctx)["masked_ce"]
    assert torch.allclose(again, expected, rtol=1e-5)
    assert teacher_calls[0] == 1                                              # still cached


@pytest.mark.parametrize("teacher", ["shared", "own"])
def test_the_masked_loss_sends_no_gradient_to_the_teacher(write_recipe, teacher):
    text = (MT if teacher == "shared" else "[components.source_ce]\n") + MIC + f'teacher = "{teacher}"\n'
    text = text.replace("threshold = 0.6", "threshold = 0.0") + ("threshold = 0.0\n" if teacher == "own" else "")
    trainer = Trainer(load_recipe(write_recipe(text)), None, progress=False)
    mic = trainer.components[-1]
    teacher_net = mic.networks["teacher"] if teacher == "own" else trainer.components[1].teacher
    ctx = _context(trainer)
    for component in trainer.components:
        component.prepare_batches(ctx)
    mic.losses(ctx)["masked_ce"].backward()
    assert all(p.grad is None for p in teacher_net.parameters())
    assert not any(p.requires_grad for p in teacher_net.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.parameters())


def test_an_own_teacher_follows_the_student_by_the_ema(write_recipe):
    trainer = Trainer(load_recipe(write_recipe("[components.source_ce]\n" + MIC + 'teacher = "own"\n')), None,
                      progress=False)
    teacher, student = trainer.components[1].networks["teacher"], trainer.model
    trainer.step()                                                            # alpha_0 = 0: a copy
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))
    before = [p.clone() for p in teacher.parameters()]
    trainer.step()                                                            # alpha_1 = 0.5
    assert all(torch.allclose(t, 0.5 * b + 0.5 * s, atol=1e-6)
               for t, b, s in zip(teacher.parameters(), before, student.parameters()))
    assert "loss/mic/masked_ce" in trainer.flush_logs()
    assert trainer.components[1].visuals(trainer._last_ctx)["masked"].shape == (3, 32, 2 * 48)


def test_the_synthetic_mic_recipe_runs_end_to_end(tmp_path, monkeypatch):
    from da_seg.data.synthetic import generate
    from da_seg.runs import train

    generate(tmp_path / "synth", benchmarks=("streets",), n_train=4, n_val=2, seed=0, workers=1, log=None)
    monkeypatch.setenv("DA_SEG_DATA", str(tmp_path))
    recipe = load_recipe(ROOT / "recipes/synthetic/streets/mean_teacher_aug_mic.toml",
                         ["schedule.iters=2", "train.eval_every=2", "data.batch_size=2", "data.num_workers=0",
                          "model.options={width = 8, aspp_channels = 16}"])
    assert recipe.components["mic"]["block_size"] == 4
    metrics = train(recipe, tmp_path / "runs", progress=False)
    assert metrics["finished"]
