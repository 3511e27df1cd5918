"""Dual Path Learning: fused inference, DPIT terms, dual-path pseudo-labels, both translated
directions, and the dual_path stage end to end (sweep, resume, eval of the fused checkpoint)."""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image as PILImage

from da_seg.config import ConfigError, recipe_from_dict
from da_seg.data.domains import load_domain
from da_seg.engine.checkpoint import restore_model
from da_seg.engine.evaluate import predict
from da_seg.engine.inference import predict_labels
from da_seg.methods import build_components
from da_seg.methods.base import DomainBatch, StepContext
from da_seg.methods.dual_path import dpit_semantic_terms, instance_normalized_mse, quantile_thresholds, select_labels
from da_seg.models import build_model
from da_seg.models.cyclegan import ResnetGenerator
from da_seg.models.dual_path import DualPathSegmenter
from da_seg.models.small import build_deeplab_small

NUM_CLASSES = 3
SMALL = {"width": 4, "aspp_channels": 8}


def _paths(seed: int = 0):
    torch.manual_seed(seed)
    return (ResnetGenerator(4, 1).eval(), build_deeplab_small(NUM_CLASSES, **SMALL).eval(),
            build_deeplab_small(NUM_CLASSES, **SMALL).eval())


# --------------------------------------------------------------------------------- fused inference

@torch.no_grad()
def test_fused_dual_path_prediction_equals_the_formula():
    translator, model_s, model_t = _paths()
    dual = DualPathSegmenter(translator, model_s, model_t, alpha=0.55).eval()
    x = torch.rand(2, 3, 32, 48)
    styled = ((translator(x * 2 - 1) + 1) / 2).clamp(0, 1)      # G_ts(x), back in [0, 1]
    p_t = F.interpolate(model_t(x).logits, size=(32, 48), mode="bilinear", align_corners=False).softmax(1)
    p_s = F.interpolate(model_s(styled).logits, size=(32, 48), mode="bilinear", align_corners=False).softmax(1)
    expected = 0.55 * p_t + 0.45 * p_s
    torch.testing.assert_close(dual(x).logits.softmax(1), expected, atol=1e-6, rtol=1e-5)
    # The evaluator's probabilities (the whole image at label size) are the same fused map ...
    torch.testing.assert_close(predict(dual, x), expected, atol=1e-6, rtol=1e-5)
    # ... and alpha = 1 is M_T alone (DPL), alpha = 0 M_S on the translated image.
    torch.testing.assert_close(DualPathSegmenter(translator, model_s, model_t, 1.0)(x).logits.softmax(1), p_t,
                               atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="alpha"):
        DualPathSegmenter(translator, model_s, model_t, 1.5)


@torch.no_grad()
def test_a_dual_path_checkpoint_rebuilds_from_its_meta_for_eval_and_predict(tmp_path):
    translator, model_s, model_t = _paths()
    meta_path = {"name": "deeplab_small", "options": SMALL, "align_corners": False,
                 "input_norm": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "bgr": False,
                                "scale": 1.0}}
    options = {"alpha": 0.55, "translator": {"ngf": 4, "n_blocks": 1}, "source_model": meta_path,
               "target_model": meta_path}
    dual = build_model("dual_path", NUM_CLASSES, **options)
    dual.translator.load_state_dict(translator.state_dict())
    dual.source_model.load_state_dict(model_s.state_dict())
    dual.target_model.load_state_dict(model_t.state_dict())
    meta = {"name": "dual_path", "options": options, "num_classes": NUM_CLASSES,
            "input_norm": {"mean": [0, 0, 0], "std": [1, 1, 1], "bgr": False, "scale": 1.0},
            "align_corners": False, "class_names": ["a", "b", "c"], "colors": [[0, 0, 0]] * 3}
    path = tmp_path / "dual_path.pt"
    torch.save({"iteration": 1, "model_meta": meta, "model": dual.state_dict()}, path)
    restored = restore_model(torch.load(path, weights_only=True)).eval()
    direct = DualPathSegmenter(translator, model_s, model_t, 0.55)
    image = (np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    torch.testing.assert_close(restored(x).logits, direct(x).logits)
    np.testing.assert_array_equal(predict_labels(restored, image), direct(x).logits.argmax(1)[0].numpy())


# --------------------------------------------------------------------------------- DPIT

def test_dpit_terms_equal_the_instance_normalized_mse_and_reach_only_the_images():
    _, model_s, model_t = _paths(1)
    for model in (model_s, model_t):
        model.requires_grad_(False)
    torch.manual_seed(2)
    images = {k: (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(k not in ("real_s", "real_t"))
              for k in ("real_s", "real_t", "fake_t", "fake_s", "rec_s", "rec_t")}
    terms = dpit_semantic_terms(model_s, model_t, images, reconstruction_weight=10.0, translation_weight=0.1)
    norm = torch.nn.InstanceNorm2d(NUM_CLASSES, affine=False)          # the release's criterion

    def direct(model_a, a, model_b, b):
        return torch.mean((norm(model_a((images[a] + 1) / 2).logits) - norm(model_b((images[b] + 1) / 2).logits)) ** 2)

    torch.testing.assert_close(terms["dp_rec_sem_s"], 10.0 * direct(model_s, "rec_s", model_s, "real_s"))
    torch.testing.assert_close(terms["dp_rec_sem_t"], 10.0 * direct(model_t, "rec_t", model_t, "real_t"))
    torch.testing.assert_close(terms["dp_sem_s"], 0.1 * direct(model_t, "fake_t", model_s, "real_s"))
    torch.testing.assert_close(terms["dp_sem_t"], 0.1 * direct(model_s, "fake_s", model_t, "real_t"))
    sum(terms.values()).backward()
    assert all(images[k].grad is not None and images[k].grad.abs().sum() > 0
               for k in ("fake_t", "fake_s", "rec_s", "rec_t"))
    assert all(p.grad is None for m in (model_s, model_t) for p in m.parameters())
    same = torch.randn(2, NUM_CLASSES, 4, 4)
    assert instance_normalized_mse(same, 3 * same + 1) < 1e-8          # invariant to per-channel affine


def _checkpoint(tmp_path: Path, name: str, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_deeplab_small(NUM_CLASSES, **SMALL)
    meta = {"name": "deeplab_small", "options": SMALL, "num_classes": NUM_CLASSES,
            "input_norm": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "bgr": False, "scale": 1.0},
            "class_names": ["a", "b", "c"], "colors": [[0, 0, 0]] * 3}
    path = tmp_path / f"{name}.pt"
    torch.save({"iteration": 1, "model_meta": meta, "model": model.state_dict()}, path)
    return path


def test_cyclegan_with_dual_path_terms_steps_only_the_generators(tmp_path):
    from da_seg.engine.trainer import component_setup

    recipe = recipe_from_dict({"name": "unit", "data": {"source": "a", "target": "b"}, "schedule": {"iters": 10}})
    setup = component_setup(recipe, build_deeplab_small(NUM_CLASSES, **SMALL), torch.device("cpu"))
    options = {"ngf": 4, "n_blocks": 1, "ndf": 4, "dual_path_weight": 1.0,
               "source_path_checkpoint": str(_checkpoint(tmp_path, "m_s", 0)),
               "target_path_checkpoint": str(_checkpoint(tmp_path, "m_t", 1))}
    (component,) = build_components({"cyclegan": options}, setup)
    torch.manual_seed(1)
    ctx = StepContext(model=None, iteration=0, max_iters=10, source=DomainBatch(torch.rand(2, 3, 32, 32)),
                      target=DomainBatch(torch.rand(2, 3, 32, 32)), autocast=nullcontext)
    terms = component.side_losses(ctx)
    assert {"dp_rec_sem_s", "dp_rec_sem_t", "dp_sem_s", "dp_sem_t"} <= set(terms)
    (terms["dp_rec_sem_s"] + terms["dp_sem_t"]).backward()
    assert all(p.grad is not None for name in ("g_st", "g_ts") for p in component.networks[name].parameters())
    assert all(p.grad is None for name in ("d_s", "d_t") for p in component.networks[name].parameters())
    assert all(p.grad is None and not p.requires_grad for m in component.path_models for p in m.parameters())
    with pytest.raises(ConfigError, match="dual_path_weight"):
        build_components({"cyclegan": {"dual_path_weight": 1.0}}, setup)


# --------------------------------------------------------------------------------- pseudo-labels

@pytest.mark.parametrize("quantile", [0.3, 0.25])
def test_quantile_thresholds_equal_the_release_rule(quantile):
    rng = np.random.default_rng(0)
    values = [torch.from_numpy(rng.random(n).astype(np.float32)) for n in (1, 7, 1000)] + [torch.empty(0)]
    values.append(torch.full((10,), 0.95))                                  # above the cap
    thresholds = quantile_thresholds(values, quantile, cap=0.9)
    expected = []
    for v in values:  # DP_SSL.py: x = np.sort(x); thres = x[np.int(np.round(len(x) * threshlen))]; 0 if empty
        x = np.sort(v.numpy())
        expected.append(0.0 if len(x) == 0 else min(float(x[int(np.round(len(x) * quantile))]), 0.9))
    np.testing.assert_allclose(thresholds.numpy(), expected)
    label = torch.tensor([[0, 1, 2], [4, 4, 1]])
    confidence = torch.tensor([[0.1, 0.99, 0.5], [0.95, 0.89, 0.0]])
    selected = select_labels(label, confidence, thresholds)
    for (i, j), c in np.ndenumerate(label.numpy()):
        keep = confidence[i, j] >= thresholds[c]
        assert selected[i, j] == (c if keep else 255)


# --------------------------------------------------------------------------------- the translate stage

TINY_CYCLEGAN = "[components.cyclegan]\nngf = 4\nn_blocks = 1\nndf = 4\npool_size = 2\n"


def test_translate_stage_writes_both_directions_as_domains(write_recipe, unlabelled_target, tiny_domains, tmp_path):
    from da_seg.stages.translate import run_translate

    table = (f'[translate]\noutput_dir = "{tmp_path / "s2t"}"\ntarget_output_domain = "tiny_tgt_in_src"\n'
             f'target_output_dir = "{tmp_path / "t2s"}"\n')
    recipe = write_recipe(TINY_CYCLEGAN + table, iters=2, extra="eval_every = 2\ncheckpoint_every = 2",
                          name="translate.toml", stage="translate")
    overrides = (f"data.target={unlabelled_target}",)
    summary = run_translate(recipe, overrides=overrides, runs_root=tmp_path / "runs",
                            descriptor_dir=tmp_path / "descriptors", progress=False)
    source_style, target_style = load_domain(summary["descriptor"]), load_domain(summary["target_direction"]["descriptor"])
    assert source_style.name == "tiny_src_cyclegan" and target_style.name == "tiny_tgt_in_src"
    target = load_domain(unlabelled_target)
    assert summary["target_direction"]["counts"] == {"train": {"images": 12, "translated_now": 12},
                                                     "val": {"images": 4, "translated_now": 4}}
    # The target's adaptation split stays unlabelled; its val split keeps the target's labels.
    assert target_style.split_spec("train").labels is None
    val = target_style.samples("val", True)
    assert [s.label.resolve() for s in val] == [s.label.resolve() for s in target.samples("val", True)]
    image = target_style.read_image(val[0].image)
    assert image.shape == (32, 48, 3) and not (image == target.read_image(target.samples("val", True)[0].image)).all()
    again = run_translate(recipe, overrides=overrides, runs_root=tmp_path / "runs",
                          descriptor_dir=tmp_path / "descriptors", progress=False)
    assert again["target_direction"]["counts"]["train"]["translated_now"] == 0


# --------------------------------------------------------------------------------- the dual_path stage

def _pipeline_recipes(write_recipe, tmp_path) -> Path:
    def named(path: Path, name: str) -> Path:
        path.write_text(path.read_text().replace('name = "tiny"', f'name = "{name}"'))
        return path

    named(write_recipe(TINY_CYCLEGAN, iters=2, extra="eval_every = 2\ncheckpoint_every = 2", name="translator.toml",
                       stage="translate"), "translator")
    named(write_recipe(iters=2, extra="eval_every = 2", name="warm_s.toml"), "warm_s")
    named(write_recipe(iters=2, extra="eval_every = 2", name="warm_t.toml"), "warm_t")
    table = ('[components.source_ce]\n[components.pseudo_ce]\n[components.adaptsegnet]\nndf = 4\nweight = 0.001\n'
             '[dual_path]\ntranslator_recipe = "translator.toml"\nsource_warmup_recipe = "warm_s.toml"\n'
             'target_warmup_recipe = "warm_t.toml"\nrounds = 2\ndpit_iters = 2\ndpit_from_plain = true\n')
    return named(write_recipe(table, iters=2, extra="eval_every = 2", name="dpl.toml", stage="dual_path"), "dpl")


def test_dual_path_sweep_runs_every_step_resumes_after_a_kill_and_eval_scores_the_fused_pair(
        write_recipe, unlabelled_target, tmp_path, monkeypatch):
    import da_seg.stages.dual_path as stage
    from da_seg.cli import main
    from da_seg.stages import sweep

    dpl = _pipeline_recipes(write_recipe, tmp_path)
    runs, overrides = tmp_path / "runs", (f"data.target={unlabelled_target}",)
    real_label_round = stage.label_round

    def killed_in_round_2(checkpoints, recipe, translated, round_dir, *args, **kwargs):
        if round_dir.name == "round_2":
            raise KeyboardInterrupt("killed")
        return real_label_round(checkpoints, recipe, translated, round_dir, *args, **kwargs)

    monkeypatch.setattr(stage, "label_round", killed_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        sweep([dpl], seeds=1, runs_root=runs, overrides=overrides, progress=False)
    trained = {p: p.stat().st_mtime_ns for p in runs.rglob("last.pt")}
    assert len(trained) == 1 + 2 + 1 + 2        # translator, two warm-ups, DPIT, round 1's two paths
    monkeypatch.setattr(stage, "label_round", real_label_round)
    (seed_dir,) = sweep([dpl], seeds=1, runs_root=runs, overrides=overrides, progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in trained.items())   # nothing trained twice
    assert len(list(runs.rglob("last.pt"))) == len(trained) + 2

    metrics = json.loads((seed_dir / "metrics.json").read_text())
    assert metrics["finished"] and [e["round"] for e in metrics["evaluations"]] == [1, 2]
    assert metrics["target"] == "tiny_tgt" and metrics["last"]["domains"]["tiny_tgt"]["miou"] is not None
    round_2 = json.loads((seed_dir / "round_2" / "done").read_text())
    assert round_2["quantile"] == 0.25 and json.loads((seed_dir / "round_1" / "done").read_text())["quantile"] == 0.3
    thresholds = json.loads((seed_dir / "round_1" / "thresholds.json").read_text())["thresholds"]
    assert all(0.0 <= t <= 0.9 for t in thresholds)
    # Round 1's labels are the rule applied to the warm-ups' fused predictions, image by image.
    from da_seg.data.augment import to_float_images
    from da_seg.engine.checkpoint import load_trained
    from da_seg.methods.cbst import predict_probabilities
    from da_seg.methods.dual_path import fused_labels

    record = json.loads((seed_dir / "round_1" / "thresholds.json").read_text())
    model_s, model_t = (load_trained(c) for c in record["checkpoints"])
    real = load_domain(unlabelled_target)
    styled = load_domain(seed_dir / "domains" / "tiny_tgt_dpit.toml")
    for sample, styled_sample in list(zip(real.samples("train", False), styled.samples("train", False)))[:3]:
        x_t = to_float_images(torch.from_numpy(real.read_image(sample.image)).permute(2, 0, 1)[None])
        x_s = to_float_images(torch.from_numpy(styled.read_image(styled_sample.image)).permute(2, 0, 1)[None])
        with torch.no_grad():
            label, confidence = fused_labels(predict_probabilities(model_t, x_t, (32, 48))[0],
                                             predict_probabilities(model_s, x_s, (32, 48))[0], 0.5)
        expected = select_labels(label, confidence, torch.tensor(record["thresholds"]))
        written = np.asarray(PILImage.open(seed_dir / "round_1" / "labels" / f"{sample.name}.png"))
        np.testing.assert_array_equal(written, expected.numpy())
    # Each path trains on its own pseudo-labelled domain and source style.
    recipe_t = (seed_dir / "round_2" / "recipe_T.toml").read_text()
    assert "round_2/domains/target/tiny_tgt.toml" in recipe_t and "tiny_src_dpit.toml" in recipe_t
    recipe_s = (seed_dir / "round_2" / "recipe_S.toml").read_text()
    assert "round_2/domains/target_in_source_style" in recipe_s and "tiny_tgt_dpit.toml" in recipe_s

    # `da-seg eval` scores the fused checkpoint (translation at test time included) as the stage did.
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", str(seed_dir / "round_2" / "dual_path.pt"), "--domain",
                                       str(unlabelled_target), "--json-out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["miou"] == pytest.approx(round_2["dual"]["tiny_tgt"]["miou"], abs=1e-9)
    # Again: nothing left to do.
    before = sorted(runs.rglob("last.pt"))
    assert sweep([dpl], seeds=1, runs_root=runs, overrides=overrides, progress=False) == [seed_dir]
    assert sorted(runs.rglob("last.pt")) == before


def test_a_translation_keeps_the_generator_stamp_only_where_its_check_can_find_it(tiny_domains, tmp_path):
    from da_seg.data.synthetic import SYNTHETIC_VERSION, STAMP_FILE
    from da_seg.stages.translate import translated_descriptor

    descriptor = tmp_path / "tiny_src.toml"
    descriptor.write_text('generator = "synthetic"\n' + tiny_domains["source"].read_text())
    source = load_domain(descriptor)
    generated = tmp_path / "data"
    (generated / "streets" / "translated").mkdir(parents=True)
    (generated / STAMP_FILE).write_text(json.dumps({"version": SYNTHETIC_VERSION, "benchmarks": {"streets": {}}}))
    beside = translated_descriptor("t", source, ["train"], generated / "streets" / "translated", "")
    elsewhere = translated_descriptor("t", source, ["train"], tmp_path / "runs" / "translated", "")
    assert beside["generator"] == "synthetic" and "generator" not in elsewhere
