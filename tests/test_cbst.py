"""CBST: class-balanced thresholds, pseudo-label selection, and the resumable rounds driver."""
from __future__ import annotations

import json
import math

import numpy as np
from pathlib import Path

import pytest
import torch

from da_seg.config import ConfigError, load_recipe
from da_seg.data.domains import load_domain
from da_seg.engine.trainer import Trainer
from da_seg.data.pseudo_labels import MARKER
from da_seg.methods.cbst import (
    ClassConfidenceSample,
    predict_probabilities,
    select_pseudo_labels,
)
from da_seg.stages.self_train import portions, run_rounds


def _probs(seed: int, n: int = 5, c: int = 4, size=(6, 7), absent: int | None = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        logits = 3 * torch.randn(c, *size, generator=g)
        if absent is not None:
            logits[absent] -= 100.0      # never predicted
        out.append(torch.softmax(logits, 0))
    return out


def direct_thresholds(probs: list[torch.Tensor], portion: float) -> np.ndarray:
    """REFERENCE.md, written the obvious way: sort each class's confidences, index floor(n p) - 1."""
    c = probs[0].shape[0]
    conf = np.concatenate([p.max(0).values.numpy().ravel() for p in probs])
    pred = np.concatenate([p.argmax(0).numpy().ravel() for p in probs])
    k = np.ones(c, dtype=np.float32)
    for cls in range(c):
        values = np.sort(conf[pred == cls])[::-1]
        index = int(math.floor(len(values) * portion)) - 1
        if index >= 0:
            k[cls] = values[index]
    return k


@pytest.mark.parametrize("portion", [0.2, 0.35, 0.5, 1.0])
def test_thresholds_equal_the_direct_computation(portion):
    probs = _probs(0)
    sample = ClassConfidenceSample(4, cap=10_000)
    for p in probs:
        sample.add(p)
    assert sample.exact
    k = sample.thresholds(portion)
    assert k[3] == 1.0                                      # absent class
    np.testing.assert_array_equal(k.numpy(), direct_thresholds(probs, portion))


def test_a_class_too_rare_for_the_portion_gets_threshold_one():
    probs = torch.zeros(3, 1, 5)
    probs[0] = 0.9
    probs[1, 0, 0], probs[0, 0, 0] = 0.95, 0.05      # class 1: a single pixel; floor(1 * 0.5) - 1 < 0
    probs[2] = 1 - probs[:2].sum(0)                  # class 2: never predicted
    sample = ClassConfidenceSample(3)
    sample.add(probs)
    assert sample.thresholds(0.5).tolist() == pytest.approx([0.9, 1.0, 1.0])
    assert sample.thresholds(0.2).tolist() == pytest.approx([1.0, 1.0, 1.0])   # floor(4 * 0.2) = 0


def test_a_capped_sample_is_uniform_and_close_to_the_direct_thresholds():
    probs = _probs(1, n=40, size=(20, 20), absent=None)
    sample = ClassConfidenceSample(4, cap=500, seed=3)
    for p in probs:                       # ~4000 pixels per class, pruned several times
        sample.add(p)
    assert not sample.exact and all(sample.sample(c).numel() == 500 for c in range(4))
    assert int(sample.counts.sum()) == 40 * 400
    np.testing.assert_allclose(sample.thresholds(0.3).numpy(), direct_thresholds(probs, 0.3), atol=0.03)


def test_selection_is_argmax_of_scaled_probabilities_above_one():
    probs = _probs(2, n=1, absent=None)[0]
    k = torch.tensor([0.9, 0.5, 0.7, 1.0])
    labels = select_pseudo_labels(probs, k)
    for y in range(probs.shape[1]):
        for x in range(probs.shape[2]):
            scaled = [float(probs[c, y, x]) / float(k[c]) for c in range(4)]
            best = int(np.argmax(scaled))
            assert int(labels[y, x]) == (best if scaled[best] >= 1.0 else 255)
    # the pixel defining a threshold is kept (p / k == 1 exactly)
    sample = ClassConfidenceSample(4)
    sample.add(probs)
    k = sample.thresholds(0.5)
    kept = select_pseudo_labels(probs, k)
    assert ((kept != 255).sum() >= (k < 1).sum())
    assert select_pseudo_labels(probs.unsqueeze(0), k).shape == (1, 6, 7)


def test_multi_scale_flip_prediction_is_a_probability_map():
    from da_seg.models import build_model

    model = build_model("deeplab_small", 3, width=8, aspp_channels=16).eval()
    image = torch.rand(1, 3, 32, 48)
    probs = predict_probabilities(model, image, (40, 50), scales=(0.5, 1.0), flip=True)
    assert probs.shape == (1, 3, 40, 50)
    assert torch.allclose(probs.sum(1), torch.ones(1, 40, 50), atol=1e-5)


def test_portion_schedule():
    assert portions(5, 0.2, 0.05, 0.3) == [0.2, 0.25, 0.3, 0.3, 0.3]


def test_pseudo_ce_refuses_a_target_with_real_labels(write_recipe):
    with pytest.raises(ConfigError, match="not a pseudo-labelled domain.*da-seg self-train"):
        Trainer(load_recipe(write_recipe("[components.source_ce]\n[components.pseudo_ce]\n")), None, progress=False)


CBST = """[components.source_ce]
[components.pseudo_ce]
[self_train]
rounds = 2
portion_start = 0.3
portion_step = 0.2
flip = true
warmup_recipe = "warm.toml"
"""


def test_rounds_write_pseudo_labels_train_and_resume(write_recipe, unlabelled_target, tmp_path, monkeypatch):
    # The target's train labels are deleted: pseudo-labels must never read target ground truth.
    descriptor = unlabelled_target
    for name, components, iters, stage in (("warm", "[components.source_ce]\n", 3, ""), ("cbst", CBST, 2, "self_train")):
        path = write_recipe(components, iters=iters, name=f"{name}.toml", stage=stage)
        path.write_text(path.read_text().replace('name = "tiny"', f'name = "{name}"'))
    # A relative runs root, as `--runs runs` gives: the pseudo-labelled domains must still be found
    # (relative domain roots resolve against $DA_SEG_DATA, not the working directory).
    monkeypatch.chdir(tmp_path)
    runs = Path("runs")
    summaries = run_rounds(path, runs_root=runs, overrides=[f"data.target={descriptor}"], progress=False)
    assert [s["portion"] for s in summaries] == [0.3, 0.5]
    assert all(s["last_miou"] is not None for s in summaries)
    out = tmp_path / "runs" / "tiny_src_to_tiny_tgt" / "cbst_selftrain" / "seed0"
    assert (runs / "warm" / "tiny_src_to_tiny_tgt").is_dir()               # the warm-up is an ordinary run
    round1 = out / "round_1"
    pseudo = load_domain(str(round1 / "domain" / "tiny_tgt.toml"))
    samples = pseudo.samples("train", with_labels=True)
    assert len(samples) == 12 and all(s.image.parent == tmp_path / "tgt_copy" / "train" / "images" for s in samples)
    label = pseudo.read_label(samples[0].label)
    assert label.shape == (32, 48) and set(np.unique(label)) <= {0, 1, 2, 255}
    info = json.loads((round1 / "thresholds.json").read_text())
    assert info["exact"] and len(info["thresholds"]) == 3
    assert json.loads((round1 / "labels" / MARKER).read_text())["portion"] == 0.3
    # round 2 starts from round 1's model, and its recipe trains on round 2's pseudo-labels
    round2 = load_recipe(out / "round_2" / "recipe.toml")
    assert round2.model.init_checkpoint == summaries[0]["checkpoint"] and round2.stage == "train"
    assert round2.data.target == str(out / "round_2" / "domain" / "tiny_tgt.toml")
    assert round2.val_domains == (str(descriptor),)
    assert json.loads((out / "rounds.json").read_text())[1]["round"] == 2
    # The rounds as one run for `da-seg compare`: last = round 2's last evaluation, iterations counted on
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["finished"] and summary["recipe"] == "cbst" and summary["target"] == "tiny_tgt"
    assert [e["iteration"] for e in summary["evaluations"]] == [2, 4]
    assert summary["last"]["domains"]["tiny_tgt"]["miou"] == summaries[1]["last_miou"]

    # Resume within a round: a lost PNG and a lost marker are redone, nothing else is retrained.
    (round1 / "labels.done").unlink()
    samples[0].label.unlink()
    thresholds_before = (round1 / "thresholds.json").read_text()
    runs_before = sorted(p.name for p in (out / "round_2" / "runs").rglob("last.pt"))
    again = run_rounds(path, runs_root=runs, overrides=[f"data.target={descriptor}"], progress=False)
    assert samples[0].label.exists() and (round1 / "labels.done").exists()
    assert (round1 / "thresholds.json").read_text() == thresholds_before
    assert sorted(p.name for p in (out / "round_2" / "runs").rglob("last.pt")) == runs_before
    assert [s["run_dir"] for s in again] == [s["run_dir"] for s in summaries]
