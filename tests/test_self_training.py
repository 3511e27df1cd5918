"""The mean-teacher component (DACS / DAFormer) on tiny domains: EMA, q, losses, resume, no target labels."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from da_seg.config import ConfigError, load_recipe
from da_seg.engine.checkpoint import load_checkpoint
from da_seg.engine.trainer import Trainer
from da_seg.methods.base import parse_options
from da_seg.methods.feature_distance import downscale_labels, feature_distance
from da_seg.methods.self_training import MeanTeacher, border_rows, confidence_weight, weighted_pixel_ce
from da_seg.methods.teacher import ema_alpha, ema_update, set_teacher_mode
from da_seg.runs import find_runs, train

MT = "[components.source_ce]\n[components.mean_teacher]\nthreshold = 0.6\n"


def test_ema_alpha_is_a_plain_average_first_then_alpha():
    assert ema_alpha(0, 0.99) == 0.0          # after the first step the teacher is the student
    assert ema_alpha(1, 0.99) == 0.5
    assert ema_alpha(9, 0.99) == pytest.approx(0.9)
    assert ema_alpha(99, 0.99) == pytest.approx(0.99)
    assert ema_alpha(5000, 0.99) == 0.99 and ema_alpha(5000, 0.999) == 0.999


def test_ema_update_equals_the_formula():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    teacher = copy.deepcopy(student)
    for p in student.parameters():
        p.data.normal_()
    student[1].running_mean.normal_()
    student[1].num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.9)
    for name, p in teacher.named_parameters():
        expected = 0.9 * before[name] + 0.1 * dict(student.named_parameters())[name]
        assert torch.allclose(p, expected, atol=1e-6), name
    assert torch.equal(teacher[1].running_mean, before["1.running_mean"])      # buffers untouched by default
    ema_update(teacher, student, 0.5, buffers=True)
    assert torch.allclose(teacher[1].running_mean, 0.5 * before["1.running_mean"] + 0.5 * student[1].running_mean)
    assert int(teacher[1].num_batches_tracked) == 7                           # integer buffers copied


def test_teacher_train_mode_only_switches_off_dropout_and_droppath():
    from da_seg.models.segformer import DropPath

    net = nn.Sequential(nn.BatchNorm2d(2), nn.Dropout2d(0.1), DropPath(0.1))
    set_teacher_mode(net, "train")
    assert net.training and net[0].training and not net[1].training and not net[2].training
    set_teacher_mode(net, "eval")
    assert not any(m.training for m in net.modules())


def test_q_is_the_share_of_confident_pixels_over_the_batch():
    confidence = torch.tensor([[[0.99, 0.5], [0.97, 0.968]], [[0.2, 0.3], [0.1, 0.9999]]])
    assert float(confidence_weight(confidence, 0.968)) == pytest.approx(4 / 8)
    assert border_rows(512, 15, 120, 0) == (15, 120)
    assert border_rows(1024, 15, 120, 512) == (30, 240)     # scaled to the batch's height
    assert border_rows(64, 15, 120, 512) == (2, 15)


def test_weighted_pixel_ce_is_the_mean_over_all_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    labels = torch.randint(0, 3, (2, 4, 5))
    labels[0, 0, 0] = 255
    weights = torch.rand(2, 4, 5)
    ce = F.cross_entropy(logits, labels.clamp(max=2), reduction="none")
    ce[0, 0, 0] = 0.0
    assert float(weighted_pixel_ce(logits, labels, weights)) == pytest.approx(float((ce * weights).sum() / 40))


def test_options_are_checked():
    with pytest.raises(ConfigError, match="teacher_mode = 'student'.*train, eval"):
        parse_options(MeanTeacher, {"teacher_mode": "student"})
    with pytest.raises(ConfigError, match="did you mean 'components.mean_teacher.threshold'"):
        parse_options(MeanTeacher, {"treshold": 0.9})
    options = parse_options(MeanTeacher, {"blur_sigma": [0.1, 2.0], "feature_distance_classes": [1, 2]})
    assert options.blur_sigma == (0.1, 2.0) and options.feature_distance_classes == (1, 2)


def test_after_step_moves_the_teacher_by_the_formula(write_recipe):
    trainer = Trainer(load_recipe(write_recipe(MT)), None, progress=False)
    (component,) = [c for c in trainer.components if c.name == "mean_teacher"]
    teacher, student = component.networks["teacher"], trainer.model
    assert not any(p.requires_grad for p in teacher.parameters())
    trainer.step()                                              # iteration 0: alpha_0 = 0
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s)
    before = [p.clone() for p in teacher.parameters()]
    trainer.step()                                              # iteration 1: alpha_1 = 0.5
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        assert torch.allclose(t, 0.5 * b + 0.5 * s, atol=1e-6)
    logs = trainer.flush_logs()
    assert {"loss/mean_teacher/mixed_ce", "stats/mean_teacher/q", "stats/mean_teacher/kept/red"} <= set(logs)
    assert 0.0 <= logs["stats/mean_teacher/q"] <= 1.0
    visuals = component.visuals(trainer._last_ctx)
    assert visuals["pseudo_labels"].shape == (3, 32, 4 * 48) and visuals["pseudo_labels"].dtype == torch.uint8
    assert visuals["mixed"].shape == (3, 32, 3 * 48)


def test_end_to_end_without_target_train_labels_logs_stats_and_panels(write_recipe, unlabelled_target, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    descriptor = unlabelled_target
    recipe = load_recipe(write_recipe(MT + 'mix_classes = "per_batch"\nignore_top = 2\n'),
                         [f"data.target={descriptor}"])
    metrics = train(recipe, tmp_path / "runs", progress=False)
    assert metrics["finished"]
    (run_dir,) = find_runs(tmp_path / "runs", recipe)
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert {"stats/mean_teacher/q", "stats/mean_teacher/kept/blue", "loss/mean_teacher/mixed_ce"} \
        <= set(acc.Tags()["scalars"])
    assert {"mean_teacher/pseudo_labels", "mean_teacher/mixed"} <= set(acc.Tags()["images"])


def test_resume_restores_the_teacher(write_recipe, tmp_path):
    path = write_recipe(MT, iters=6)
    runs = tmp_path / "runs"
    train(load_recipe(path, ["schedule.iters=3"]), runs, progress=False)
    (run_dir,) = find_runs(runs, load_recipe(path, ["schedule.iters=3"]))
    saved = load_checkpoint(run_dir / "last.pt")["components"]["mean_teacher"]["networks"]["teacher"]
    trainer = Trainer(load_recipe(path, ["schedule.iters=3"]), run_dir, resume=True, progress=False)
    (component,) = [c for c in trainer.components if c.name == "mean_teacher"]
    restored = component.networks["teacher"].state_dict()
    assert all(torch.equal(restored[k], saved[k]) for k in saved)
    # ... and it is the EMA, not a copy of the resumed student
    assert any(not torch.equal(restored[k], v) for k, v in trainer.model.state_dict().items()
               if v.is_floating_point())


def test_downscaled_labels_and_masked_feature_distance():
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :2, 2:] = 1                 # top-right cell: all class 1
    labels[0, 2:, :2] = 2
    labels[0, 3, 0] = 0                   # bottom-left cell: 3/4 class 2 -> still 2 at min_ratio 0.75
    labels[0, 2:, 2:] = torch.tensor([[1, 2], [0, 255]])   # bottom-right: no majority -> ignore
    cells = downscale_labels(labels, (2, 2), 3, 0.75)
    assert cells.tolist() == [[[0, 1], [2, 255]]]
    student = torch.zeros(1, 2, 2, 2)
    reference = torch.zeros(1, 2, 2, 2)
    reference[0, :, 0, 1] = torch.tensor([3.0, 4.0])     # distance 5 in the class-1 cell
    reference[0, :, 1, 0] = torch.tensor([0.0, 1.0])     # distance 1 in the class-2 cell
    assert float(feature_distance(student, reference, labels, (1,), 3, 0.75)) == pytest.approx(5.0)
    assert float(feature_distance(student, reference, labels, (1, 2), 3, 0.75)) == pytest.approx(3.0)
    assert float(feature_distance(student, reference, labels, (), 3, 0.75)) == pytest.approx(6.0 / 4)
    assert float(feature_distance(student, reference, labels, (0,), 3, 0.75)) == 0.0


def test_feature_distance_runs_against_the_frozen_imagenet_model(write_recipe, tmp_path, monkeypatch):
    from da_seg.models import MODELS, build_model

    weights = tmp_path / "imagenet.pt"
    torch.save(build_model("deeplab_small", 3, width=8, aspp_channels=16).state_dict(), weights)

    def with_weights(num_classes, pretrained="", **options):
        model = build_model("deeplab_small", num_classes, **options)
        if pretrained:
            model.load_state_dict(torch.load(pretrained, weights_only=True))
        return model

    monkeypatch.setitem(MODELS, "small_with_weights", with_weights)
    recipe = load_recipe(write_recipe(MT + f'imagenet_weights = "{weights}"\nfeature_distance_classes = [2]\n'),
                         ["model.name=small_with_weights", f'model.pretrained="{weights}"'])
    trainer = Trainer(recipe, None, progress=False)
    (component,) = [c for c in trainer.components if c.name == "mean_teacher"]
    assert component.imagenet is not None and not any(p.requires_grad for p in component.imagenet.parameters())
    for _ in range(2):
        trainer.step()
    logs = trainer.flush_logs()
    # eval-mode frozen network (as DAFormer's) vs a train-mode student: > 0 even at the start with BN
    assert 0.0 < logs["loss/mean_teacher/feature_distance"] < float("inf")
    frozen = torch.load(weights, weights_only=True)
    assert all(torch.equal(v, frozen[k]) for k, v in component.imagenet.state_dict().items())
    assert not torch.equal(next(trainer.model.parameters()), next(component.imagenet.parameters()))


def test_shipped_self_training_recipes_have_valid_options():
    from pathlib import Path

    from da_seg.methods import METHODS

    recipes = sorted((Path(__file__).parents[1] / "recipes").rglob("*.toml"))
    checked = 0
    for path in recipes:
        recipe = load_recipe(path)
        for name in ("mean_teacher", "pseudo_ce"):
            if name in recipe.components:
                parse_options(METHODS[name], dict(recipe.components[name]), str(path))
                checked += 1
    assert checked >= 9
