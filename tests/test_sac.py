"""SAC: view warps and their inverse, the view pooling, the class prior, thresholds, the loss, the
slow teacher's update interval, the frozen student BatchNorm, and the warm_start stage end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from da_seg.config import ConfigError, load_recipe
from da_seg.engine.trainer import Trainer
from da_seg.methods.base import parse_options
from da_seg.methods.common import freeze_batchnorm_statistics
from da_seg.methods.sac import (SACOptions, SelfAugmentationConsistency, class_thresholds, focal_confidence_ce,
                                pseudo_labels, update_class_prior)
from da_seg.methods.teacher import ema_due
from da_seg.methods.views import compose_affine, pool_views, random_views, view_matrices, warp

H, W = 16, 24


def pixel_centres(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, w) normalized x and y of the pixel centres (align_corners=False)."""
    ys = -1 + (2 * torch.arange(h, dtype=torch.float64) + 1) / h
    xs = -1 + (2 * torch.arange(w, dtype=torch.float64) + 1) / w
    return xs[None, :].expand(h, w), ys[:, None].expand(h, w)


def apply(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = theta.double()
    return t[0, 0] * x + t[0, 1] * y + t[0, 2], t[1, 0] * x + t[1, 1] * y + t[1, 2]


def inside(x: torch.Tensor, y: torch.Tensor, margin_x: float = 0.0, margin_y: float = 0.0) -> torch.Tensor:
    """Points whose bilinear samples use only pixels of the image (between the outer pixel centres)."""
    return ((x.abs() <= 1 - 1 / W - margin_x) & (y.abs() <= 1 - 1 / H - margin_y))


def ramp_image(n: int = 1) -> torch.Tensor:
    """(n, 3, H, W): each channel an affine function of the normalized coordinates (bilinear
    resampling reproduces such a function exactly wherever it samples between pixel centres)."""
    x, y = pixel_centres(H, W)
    channels = [0.5 + 0.3 * x - 0.1 * y, 0.2 * x + 0.4 * y + 0.1, 0.7 - 0.25 * y]
    return torch.stack(channels).float()[None].expand(n, 3, H, W).contiguous()


def test_view_matrices_are_exact_inverses_and_follow_the_definition():
    flip = torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
    scale = torch.tensor([1.0, 0.5, 0.8], dtype=torch.float64)
    centre = torch.tensor([[0.0, 0.0], [0.3, -0.4], [-0.2, 0.1]], dtype=torch.float64)
    to_view, to_reference = view_matrices(flip, scale, centre)
    eye = torch.eye(2, 3).expand(3, 2, 3)
    assert torch.allclose(compose_affine(to_view, to_reference), eye, atol=1e-6)
    assert torch.allclose(compose_affine(to_reference, to_view), eye, atol=1e-6)
    # view pixel q shows the image at (f (s q_x + c_x), s q_y + c_y)
    q = torch.tensor([0.25, -0.5], dtype=torch.float64)
    for k in range(3):
        px, py = apply(to_view[k], q[0], q[1])
        assert math.isclose(px, flip[k] * (scale[k] * q[0] + centre[k, 0]), abs_tol=1e-6)
        assert math.isclose(py, scale[k] * q[1] + centre[k, 1], abs_tol=1e-6)


def test_warp_then_unwarp_is_the_identity_on_the_covered_region():
    torch.manual_seed(0)
    image = ramp_image(2)
    views = random_views(image, 4, (0.5, 1.0), True)
    assert views.images.shape == (8, 3, H, W)
    x, y = pixel_centres(H, W)
    for k in range(8):
        # each view pixel equals the image at its reference point (direct computation)
        px, py = apply(views.to_view[k], x, y)
        expected = torch.stack([0.5 + 0.3 * px - 0.1 * py, 0.2 * px + 0.4 * py + 0.1, 0.7 - 0.25 * py]).float()
        ok = inside(px, py)
        assert ok.float().mean() > 0.5
        assert torch.allclose(views.images[k][:, ok], expected[:, ok], atol=1e-5)
    back = warp(views.images, views.to_reference)
    for k in range(8):
        qx, qy = apply(views.to_reference[k], x, y)
        covered = inside(qx, qy)
        assert torch.allclose(back[k][:, covered], image[0][:, covered], atol=1e-5)
        assert back[k][:, ~inside(qx, qy, -2.0 / W, -2.0 / H)].abs().sum() == 0  # outside the crop: nothing
    # views 0 are never zoomed; flips alone invert exactly for any image, everywhere
    first = views.to_view[::4]
    assert torch.equal(first[:, 0, 0].abs(), torch.ones(2)) and torch.equal(first[:, 1, 1], torch.ones(2))
    assert torch.equal(first[:, :, 2], torch.zeros(2, 2))
    noise = torch.rand(2, 3, H, W)
    flipped = warp(noise, views.to_view[::4])
    assert torch.allclose(warp(flipped, views.to_reference[::4]), noise, atol=1e-5)


def test_pooled_teacher_equals_the_direct_average_over_covering_views():
    torch.manual_seed(1)
    views = 3
    flip = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    scale = torch.tensor([1.0, 0.6, 0.75], dtype=torch.float64)
    centre = torch.tensor([[0.0, 0.0], [0.3, 0.2], [-0.2, -0.15]], dtype=torch.float64)
    to_view, to_reference = view_matrices(flip, scale, centre)
    x, y = pixel_centres(H, W)
    coeffs = [(0.5, 0.2, 0.1), (0.3, -0.1, 0.15), (0.6, 0.05, -0.2)]   # p0_j(q) = a + b q_x + c q_y

    def p0(j, qx, qy):
        a, b, c = coeffs[j]
        return a + b * qx + c * qy

    probs = torch.stack([torch.stack([p0(j, x, y), 1 - p0(j, x, y)]) for j in range(views)]).float()
    pooled = pool_views(probs, to_view, to_reference, views)
    checked = 0
    for k in range(views):
        px, py = apply(to_view[k], x, y)                       # view k pixel -> reference point
        values, counts = torch.zeros(H, W, dtype=torch.float64), torch.zeros(H, W, dtype=torch.float64)
        safe = torch.ones(H, W, dtype=torch.bool)
        for j in range(views):
            qx, qy = apply(to_reference[j], px, py)            # -> view j's pixel coordinates
            # 1 reference pixel around the point is 1 / s_j view pixels: stay that far from view j's rim
            mx, my = (1 / scale[j] + 1.5) * 2 / W, (1 / scale[j] + 1.5) * 2 / H
            covered, clear = inside(qx, qy, mx, my), ~inside(qx, qy, -mx, -my)
            safe &= covered | clear
            values += torch.where(covered, p0(j, qx, qy), 0.0)
            counts += covered.double()
        ok = safe & (counts > 0) & inside(px, py, 2 / W, 2 / H)
        checked += int(ok.sum())
        assert torch.allclose(pooled[k, 0][ok].double(), (values / counts.clamp_min(1))[ok], atol=1e-4)
        assert torch.allclose(pooled[k].sum(0)[ok], torch.ones(int(ok.sum())), atol=1e-4)
    assert checked > 150  # the comparison covers a good part of the views
    # without zoom and flips every view is the whole image: the plain mean of the views
    same = torch.eye(2, 3).expand(views, 2, 3)
    plain = pool_views(probs, same, same, views)
    assert torch.allclose(plain, probs.mean(0, keepdim=True).expand_as(probs), atol=1e-5)


def test_class_prior_follows_the_official_recursion():
    beta, m = 1e-3, 0.99
    prior = torch.full((3,), beta)
    batches = [torch.tensor([0.7, 0.3, 0.0]), torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.4, 0.4, 0.2])]
    direct = [beta] * 3
    for mean in batches:
        update_class_prior(prior, mean, m, beta)
        direct = [(float(v) if (float(v) > 1e-8 and d == beta) else d) for d, v in zip(direct, mean)]
        direct = [m * d + (1 - m) * float(v) for d, v in zip(direct, mean)]
        assert torch.allclose(prior, torch.tensor(direct), atol=1e-7)
    assert math.isclose(float(prior[0]), 0.7 * m ** 2 + 0.01 * (m * 0.5 + 0.4), rel_tol=1e-5)
    # class 2 was absent at the first step: it does not take a later batch's value, it only averages
    assert float(prior[2]) < 0.01


def test_thresholds_and_pseudo_labels_against_a_direct_computation():
    torch.manual_seed(2)
    probs = torch.softmax(3 * torch.randn(2, 3, 4, 5), 1)
    prior = torch.tensor([0.3, 1e-3, 5e-4])
    thresholds = class_thresholds(probs, prior, 0.75, 0.2, 1e-3)
    labels, confidence = pseudo_labels(probs, thresholds)
    for n in range(2):
        for c in range(3):
            mask = probs[n].argmax(0) == c
            peak = float(probs[n].max(0).values[mask].max()) if mask.any() else 0.0
            expected = max(0.75 * peak * (1 - math.exp(-float(prior[c]) / 1e-3)), 0.2)
            assert math.isclose(float(thresholds[n, c]), expected, rel_tol=1e-5)
        for i in range(4):
            for j in range(5):
                c = int(probs[n, :, i, j].argmax())
                conf = float(probs[n, c, i, j])
                assert float(confidence[n, i, j]) == conf
                assert int(labels[n, i, j]) == (c if conf > float(thresholds[n, c]) else 255)
    # the rare class is discounted: its threshold is lower than 0.75 x its peak
    assert (thresholds[:, 2] <= 0.75 * 0.4 + 1e-6).all()
    assert 0 < (labels == 255).float().mean() < 1


def test_loss_equals_the_formula():
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 4, 5)
    labels = torch.randint(0, 3, (2, 4, 5))
    labels[0, 0, :2] = 255
    confidence = torch.rand(2, 4, 5)
    prior = torch.tensor([0.5, 0.1, 0.01])
    log_p = F.log_softmax(logits, 1)
    weight = (1 - prior) ** 3
    ce = torch.zeros(2, 4, 5)
    for n in range(2):
        for i in range(4):
            for j in range(5):
                y = int(labels[n, i, j])
                ce[n, i, j] = 0.0 if y == 255 else -weight[y] * log_p[n, y, i, j]
    own = (ce * confidence).sum() / ce.numel()
    # the official code: (N, H, W) CE x (N, 1, H, W) confidence broadcasts to (N, N, H, W)
    batch_mean = (ce[None] * confidence[:, None]).mean()
    assert torch.allclose(focal_confidence_ce(logits, labels, confidence, prior, 3.0, "own"), own, atol=1e-6)
    assert torch.allclose(focal_confidence_ce(logits, labels, confidence, prior, 3.0), batch_mean, atol=1e-6)


def test_options_are_checked():
    with pytest.raises(ConfigError, match="zoom = \\[0.5, 1.5\\]"):
        parse_options(SelfAugmentationConsistency, {"zoom": [0.5, 1.5]})
    with pytest.raises(ConfigError, match="confidence_weight = 'pixel'.*batch_mean, own"):
        parse_options(SelfAugmentationConsistency, {"confidence_weight": "pixel"})
    with pytest.raises(ConfigError, match="update_every = 0"):
        parse_options(SelfAugmentationConsistency, {"update_every": 0})
    assert SACOptions().weight == 5.0 and SACOptions().update_every == 100


def test_slow_teacher_updates_only_every_n_steps():
    assert [it for it in range(10) if ema_due(it, 4)] == [3, 7]
    assert all(ema_due(it, 1) for it in range(5))


SAC = """[components.source_ce]
[components.sac]
groups = 1
views = 2
momentum = 0.5
update_every = 3
"""


def test_trainer_steps_update_the_teacher_every_n_and_freeze_student_bn(write_recipe):
    trainer = Trainer(load_recipe(write_recipe(SAC)), None, progress=False)
    (component,) = [c for c in trainer.components if c.name == "sac"]
    teacher, student = component.networks["teacher"], trainer.model
    bn = [m for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in bn]
    bn_weights = [m.weight.clone() for m in bn]
    for it in range(6):
        before = [p.clone() for p in teacher.parameters()]
        student_before = [p.clone() for p in student.parameters()]
        trainer.step()
        moved = any(not torch.equal(t, b) for t, b in zip(teacher.parameters(), before))
        assert moved == (it in (2, 5)), it
        if moved:  # teacher <- m teacher + (1 - m) student (the student after this step)
            for t, b, s in zip(teacher.parameters(), before, student.parameters()):
                assert torch.allclose(t, 0.5 * b + 0.5 * s, atol=1e-6)
        assert any(not torch.equal(s, b) for s, b in zip(student.parameters(), student_before))
    # the student's BatchNorm statistics never moved (source and target passes), its affine did
    assert all(torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
               for m, (mean, var) in zip(bn, stats))
    assert any(not torch.equal(m.weight, w) for m, w in zip(bn, bn_weights))
    logs = trainer.flush_logs()
    assert {"loss/sac/consistency_ce", "stats/sac/labelled", "stats/sac/prior/red"} <= set(logs)
    assert component.state_dict()["teacher_updates"] == 2
    panel = component.visuals(trainer._last_ctx)["views"]      # 2 views: clean | student | labels | confidence
    assert panel.shape == (3, 2 * 32, 4 * 48) and panel.dtype == torch.uint8


def test_frozen_batchnorm_normalizes_with_running_statistics():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    net[1].running_mean.fill_(0.3)
    x = torch.randn(4, 3, 8, 8)
    expected = net.eval()(x)
    handles = freeze_batchnorm_statistics(net)
    net.train()
    out = net(x)
    assert torch.allclose(out, expected) and torch.equal(net[1].running_mean, torch.full((4,), 0.3))
    out.sum().backward()
    assert net[1].weight.grad is not None                      # scale and shift still train
    for handle in handles:
        handle.remove()
    net.train()
    net(x)
    assert not torch.equal(net[1].running_mean, torch.full((4,), 0.3))


def test_warm_start_stage_trains_the_abn_model_then_sac_from_it(write_recipe, unlabelled_target, tmp_path):
    from da_seg.stages import STAGES, sweep

    abn = write_recipe("[components.source_ce]\n[components.target_bn]\n", iters=3, name="abn.toml")
    abn.write_text(abn.read_text().replace('name = "tiny"', 'name = "abn"'))
    sac = write_recipe(SAC + '[warm_start]\nwarmup_recipe = "abn.toml"\nimportance_sampling = true\n', iters=3,
                       name="sac.toml", stage="warm_start")
    sac.write_text(sac.read_text().replace('name = "tiny"', 'name = "sac"'))
    assert "warm_start" in STAGES
    runs = tmp_path / "runs"
    overrides = [f"data.target={unlabelled_target}"]        # target train labels are never read
    (folder,) = sweep([sac], 1, runs, overrides=overrides, progress=False)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["finished"] and metrics["recipe"] == "sac" and metrics["last"] is not None
    (abn_last,) = (runs / "abn" / "tiny_src_to_tiny_tgt").rglob("last.pt")
    resolved = load_recipe(folder / "recipe.toml")
    assert resolved.stage == "train" and resolved.model.init_checkpoint == str(abn_last)
    # importance sampling: the ABN model's predicted class counts of the 12 target train images
    counts = json.loads((abn_last.parent / "target_class_counts.json").read_text())
    assert resolved.data.target_sample_weights == str(abn_last.parent / "target_class_counts.json")
    assert resolved.data.target_uniform_prior == 0.25 and len(counts["names"]) == 12
    assert all(sum(c) == 32 * 48 for c in counts["pixel_counts"])
    # a second sweep finds both runs finished and trains nothing
    mtime = (folder / "metrics.json").stat().st_mtime
    (again,) = sweep([sac], 1, runs, overrides=overrides, progress=False)
    assert again == folder and (folder / "metrics.json").stat().st_mtime == mtime


def test_importance_distributions_and_sampler_follow_the_formula(tmp_path):
    from da_seg.data.importance import ImportanceSampler, importance_distributions, read_counts, write_counts

    counts = np.array([[10, 0, 0], [5, 5, 0], [0, 15, 0], [5, 0, 0]])   # class 2 predicted nowhere
    dist = importance_distributions(counts, 0.25)
    assert dist.shape == (3, 4) and np.allclose(dist.sum(1), 1.0)
    assert np.allclose(dist[0], 0.25 / 4 + 0.75 * np.array([10, 5, 0, 5]) / 20)
    assert np.allclose(dist[1], 0.25 / 4 + 0.75 * np.array([0, 5, 15, 0]) / 20)
    assert np.allclose(dist[2], 0.25)                                  # no prediction: uniform
    sampler = ImportanceSampler(counts, prior=0.25, seed=3)
    it = iter(sampler)
    drawn = np.bincount([next(it) for _ in range(20000)], minlength=4) / 20000
    assert np.allclose(drawn, dist.mean(0), atol=0.015)               # a class drawn uniformly, then an image
    # resumable: a sampler started at position k yields what the first one yielded from k on
    again = iter(ImportanceSampler(counts, prior=0.25, seed=3, state=5000))
    first = iter(ImportanceSampler(counts, prior=0.25, seed=3))
    stream = [next(first) for _ in range(5100)]
    assert [next(again) for _ in range(100)] == stream[5000:]
    write_counts(tmp_path / "c.json", ["a", "b", "c", "d"], counts, "x.pt")
    assert np.array_equal(read_counts(tmp_path / "c.json", ["a", "b", "c", "d"]), counts)
    with pytest.raises(Exception, match="lists other images"):
        read_counts(tmp_path / "c.json", ["a", "b"])
