"""Domain generalization: SAN/SAW and ISW blocks, their losses, and runs evaluated on unseen domains.

Everything on CPU at <= 48x64 with the small DeepLab (one ResNet-50 forward at 33x49).
"""
from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from da_seg.engine.trainer import component_setup
from da_seg.config import ConfigError, load_recipe, recipe_from_dict
from da_seg.engine.compare import collect_runs, compare_table, summarize
from da_seg.methods import METHODS, build_components
from da_seg.methods.base import DomainBatch, StepContext, parse_options
from da_seg.methods.common import instance_covariance
from da_seg.methods.isw import InstanceSelectiveWhitening, isw_loss, sensitive_mask
from da_seg.methods.san_saw import saw_loss
from da_seg.methods.source import CrossEntropyOptions, batch_class_weights, segmentation_ce
from da_seg.models import build_model
from da_seg.models.segmenter import SegmenterOutput
from da_seg.models.norm import feature_key, heatmap_region, kmeans_1d, region_normalize
from da_seg.runs import find_runs, train

NUM_CLASSES = 4
SAN = {"kind": "san_saw", "stages": [1, 2], "classes": [0, 2, 3]}
ISW = {"kind": "isw", "stages": [0, 1, 2]}


def _small(dg_norm, seed: int = 0):
    torch.manual_seed(seed)
    return build_model("deeplab_small", NUM_CLASSES, width=8, aspp_channels=16, dg_norm=dg_norm)


def _setup(model, components: dict | None = None):
    recipe = recipe_from_dict({"name": "unit", "data": {"source": "a"}, "components": components or {}})
    return component_setup(recipe, model, torch.device("cpu"))


def _batch(seed: int = 0, n: int = 2, size=(32, 48)) -> DomainBatch:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n, size[0] // 8, size[1] // 8), generator=g)
    labels = labels.repeat_interleave(8, 1).repeat_interleave(8, 2)
    labels[:, :2, :3] = 255
    return DomainBatch(torch.rand(n, 3, *size, generator=g), labels)


def _ctx(model, iteration: int = 0, batch: DomainBatch | None = None) -> StepContext:
    return StepContext(model=model, iteration=iteration, max_iters=10, source=batch or _batch(),
                       target=None, autocast=nullcontext)


def _hadamard(n: int) -> torch.Tensor:
    """(n, n) +-1 with orthogonal rows (Sylvester), n a power of 2."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


# ------------------------------------------------------------------ the blocks in the segmenter

def test_san_blocks_replace_stage_outputs_with_shapes_and_aux_logits():
    model = _small(SAN)
    out = model(torch.rand(2, 3, 32, 48))
    assert out.logits.shape == (2, NUM_CLASSES, 4, 6)
    for stage, channels, size in (("layer1", 8, (8, 12)), ("layer2", 16, (4, 6))):
        output = out.features[feature_key(stage, "output")]
        assert output.shape == (2, channels, *size)
        assert out.features[stage] is output                       # the next stage reads SAN's output
        assert out.features[feature_key(stage, "input")].shape == output.shape
        assert out.features[feature_key(stage, "aux_logits")].shape == (2, NUM_CLASSES, *size)
        assert (output >= 0).all()                                 # ReLU(sum_c out_c)
    assert feature_key("layer3", "output") not in out.features
    assert model.dg_norm.classes == (0, 2, 3)
    # Paper: one affine per selected class; release: one shared.
    assert model.dg_norm.blocks["layer1"].affine_weight.shape == (3, 8)
    release = _small({**SAN, "release_behaviour": True})
    assert release.dg_norm.blocks["layer1"].affine_weight.shape == (1, 8)
    assert release(torch.rand(1, 3, 32, 48)).logits.shape == (1, NUM_CLASSES, 4, 6)


def test_dg_blocks_in_resnet50_deeplabs_and_encoder_lr_group():
    torch.manual_seed(0)
    model = build_model("deeplabv2_r50", 19, dg_norm={"kind": "san_saw", "stages": [1, 2], "classes": [0, 10, 2, 1, 8]})
    with torch.no_grad():
        out = model(torch.rand(1, 3, 33, 49))
    assert out.features[feature_key("layer1", "output")].shape == (1, 256, 9, 13)
    assert out.features[feature_key("layer2", "aux_logits")].shape == (1, 19, 5, 7)
    groups = {g["name"]: {id(p) for p in g["params"]} for g in model.param_groups(1.0, 10.0)}
    dg_ids = {id(p) for p in model.dg_norm.parameters()}
    assert dg_ids <= groups["backbone"] and not dg_ids & groups["head"]   # SAN-SAW trains SAN at 1x
    with torch.device("meta"):
        v3 = build_model("deeplabv3plus_r50", 19, dg_norm={"kind": "isw", "stages": [0, 1, 2]})
    assert list(v3.dg_norm.blocks) == ["stem", "layer1", "layer2"]


def test_dg_norm_options_fail_clearly():
    with pytest.raises(ConfigError, match=r"unknown key 'model.options.dg_norm.stagse'; did you mean 'model.options.dg_norm.stages'"):
        _small({"kind": "san_saw", "stagse": [1]})
    with pytest.raises(ConfigError, match="kind = 'san'; valid"):
        _small({"kind": "san"})
    with pytest.raises(ConfigError, match="stages = \\[5\\]"):
        _small({"kind": "isw", "stages": [5]})
    with pytest.raises(ConfigError, match="classes = \\[7\\]"):
        _small({"kind": "san_saw", "classes": [7]})
    with pytest.raises(KeyError, match="dg_norm"):
        build_model("segformer_b0", 3, dg_norm=SAN)


# ------------------------------------------------------------------ SAN's normalization

def test_region_normalization_gives_zero_mean_unit_variance_inside_each_class_region():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, 16) * torch.tensor([1.0, 3.0, 0.5, 2.0, 7.0]).view(1, 5, 1, 1) + 4.0
    labels = torch.randint(0, 3, (2, 12, 16))
    for c in range(3):
        region = (labels == c).unsqueeze(1).float()
        out = region_normalize(x * region, region)
        for i in range(2):
            inside = out[i][:, labels[i] == c]                               # (C, pixels of c)
            torch.testing.assert_close(inside.mean(1), torch.zeros(5), atol=1e-4, rtol=0)
            torch.testing.assert_close(inside.var(1, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)
            assert out[i][:, labels[i] != c].abs().max() < 1e-4            # zeros stay zeros
        both = region_normalize(x, region)                                  # the rest standardized on its own
        outside = both[0][:, labels[0] != c]
        torch.testing.assert_close(outside.mean(1), torch.zeros(5), atol=1e-4, rtol=0)
    torch.testing.assert_close(region_normalize(x, None), F.instance_norm(x, eps=1e-5))
    torch.testing.assert_close(region_normalize(x, torch.ones(2, 1, 12, 16)), F.instance_norm(x, eps=1e-5),
                               atol=1e-4, rtol=0)


def test_san_target_uses_per_class_affine_inside_each_ground_truth_region():
    model = _small(SAN)
    block = model.dg_norm.blocks["layer1"]
    with torch.no_grad():
        block.affine_weight.copy_(torch.tensor([1.0, 2.0, 3.0]).view(3, 1).expand(3, 8))
        block.affine_bias.copy_(torch.full((3, 8), 5.0))          # large: nothing is cut by the ReLU
    torch.manual_seed(1)
    x = torch.rand(2, 8, 8, 12) * 4
    labels = torch.randint(0, NUM_CLASSES, (2, 8, 12))
    target = block.normalized_target(x, labels)
    for index, c in enumerate(block.classes):
        inside = target[0][:, labels[0] == c]
        # class c: gamma_c * RN + beta_c, plus beta of the other classes (their regions are empty here)
        torch.testing.assert_close(inside.mean(1), torch.full((8,), 15.0), atol=1e-3, rtol=0)
        torch.testing.assert_close(inside.std(1, unbiased=False), torch.full((8,), index + 1.0), atol=1e-3, rtol=0)
    unselected = target[0][:, labels[0] == 1]                     # class 1 is not selected: only the betas
    torch.testing.assert_close(unselected, torch.full_like(unselected, 15.0))


def test_kmeans_regions_find_the_bright_blob():
    values = torch.tensor([[0.0, 0.1, 0.05, 5.0, 5.2, 9.0, 0.02, 4.9]])
    assign, centroids = kmeans_1d(values, 3)
    assert centroids[0].sort().values.tolist() == pytest.approx([0.0425, 5.033333, 9.0], abs=1e-4)
    assert assign[0].tolist() == [0, 0, 0, 1, 1, 2, 0, 1]
    heat = torch.zeros(2, 1, 6, 8)
    heat[0, 0, 1:3, 2:5] = 1.0 + 0.1 * torch.rand(2, 3)
    heat[1, 0, 4:, :] = 2.0
    region = heatmap_region(heat + 0.01 * torch.rand_like(heat), clusters=5)
    assert torch.equal(region, (heat > 0).float())


# ------------------------------------------------------------------ SAW and ISW losses

def test_saw_loss_is_zero_for_whitened_and_positive_for_correlated_channels():
    k, groups, h, w = 4, 3, 8, 8
    classes = (0, 2, 3, 5)
    # Class j's g-th most important channel is g * k + j: every group holds k distinct channels.
    # (Where two classes share a ranked channel, its variance counts as a covariance, as in the release.)
    weight = torch.zeros(6, k * groups)
    for j, cls in enumerate(classes):
        for g in range(groups):
            weight[cls, g * k + j] = -(10.0 - g) if g % 2 else 10.0 - g    # the sign must not matter
    white = _hadamard(h * w)[1:k * groups + 1].view(1, k * groups, h, w) * 2.0  # orthogonal, unit+ scale
    assert saw_loss(white, weight, classes, relax_denom=0).item() == pytest.approx(0.0, abs=1e-6)
    assert saw_loss(torch.randn(2, k * groups, 16, 16), weight, classes).item() == 0.0  # within the margin
    shared = torch.randn(2, 1, h, w) * 3
    correlated = shared.expand(2, k * groups, h, w) + 0.01 * torch.randn(2, k * groups, h, w)
    assert saw_loss(correlated, weight, classes).item() > 1.0


def test_saw_loss_equals_a_direct_computation():
    torch.manual_seed(0)
    k, c, h, w = 3, 7, 5, 6
    weight, classes = torch.randn(4, c, 1, 1), (1, 3, 0)
    x = torch.rand(2, c, h, w) * 3
    expected = 0.0
    groups = c // k
    importance = weight.view(4, c).abs()
    for i in range(2):
        for g in range(groups):
            rows = []
            for cls in classes:
                channel = importance[cls].argsort(descending=True)[g]
                rows.append(torch.sigmoid(importance[cls, channel]) * x[i, channel].flatten())
            m = torch.stack(rows)
            cov = m @ m.T / (h * w - 1) + 1e-5 * torch.eye(k)
            upper = sum(cov[a, b].abs() for a in range(k) for b in range(a + 1, k))
            expected += max(float(upper - 3 // 2) / 3, 0.0)     # margin floor(3 / 2)
    assert expected > 0 and saw_loss(x, weight, classes, relax_denom=2).item() == pytest.approx(expected / 2, rel=1e-5)


def test_isw_loss_and_sensitive_mask():
    white = F.instance_norm(_hadamard(64)[1:9].view(1, 8, 8, 8))
    upper = torch.ones(8, 8).triu(1)
    assert isw_loss(white, upper).item() == pytest.approx(0.0, abs=1e-6)
    correlated = F.instance_norm(torch.randn(2, 1, 8, 8).expand(2, 8, 8, 8) + 0.05 * torch.randn(2, 8, 8, 8))
    assert isw_loss(correlated, upper).item() == pytest.approx(1.0, abs=0.05)  # |corr| ~ 1 everywhere
    assert isw_loss(correlated, torch.zeros(8, 8)).item() == 0.0
    cov = instance_covariance(correlated)
    assert cov.shape == (2, 8, 8) and torch.allclose(cov, cov.transpose(1, 2))
    variance = torch.full((6, 6), 0.01)
    variance[0, 3] = variance[2, 5] = variance[1, 4] = 1.0
    variance[3, 0] = 5.0                                         # below the diagonal: never chosen
    mask = sensitive_mask(variance, clusters=3)
    assert mask.nonzero().tolist() == [[0, 3], [1, 4], [2, 5]]


def test_isw_learns_its_mask_in_the_window_then_whitens():
    model = _small(ISW)
    (isw,) = build_components({"isw": {"mask_iter": 2, "stat_iters": 2, "weight": 0.6}}, _setup(model))
    assert isw.losses(_ctx(model, 0))["isw"].item() == 0.0
    assert isw.after_step(_ctx(model, 0)) == {"sensitive_fraction": 0.0}
    assert model.training and not isw.masks and isw.pairs == 2
    stats = isw.after_step(_ctx(model, 1, _batch(1)))
    assert set(isw.masks) == {"stem", "layer1", "layer2"} and 0 < stats["sensitive_fraction"] < 1
    assert isw.masks["layer1"].shape == (8, 8) and torch.equal(isw.masks["layer1"].tril(), torch.zeros(8, 8))
    ctx = _ctx(model, 2, _batch(2))
    loss = isw.losses(ctx)["isw"]
    expected = 0.6 * sum(isw_loss(ctx.source_out.features[feature_key(s, "normalized")], isw.masks[s])
                         for s in ("stem", "layer1", "layer2")) / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and loss.item() > 0
    loss.backward()
    assert model.backbone.layer1[0].conv1.weight.grad.abs().sum() > 0
    again = InstanceSelectiveWhitening(isw.options, _setup(model))
    again.load_state_dict(isw.state_dict())
    assert again.sensitive_fraction == isw.sensitive_fraction and torch.equal(again.masks["stem"], isw.masks["stem"])


# ------------------------------------------------------------------ SAN-SAW component and gradients

def test_san_saw_losses_and_gradients_reach_only_the_right_modules():
    model = _small(SAN)
    (san_saw,) = build_components({"san_saw": {}}, _setup(model))
    ctx = _ctx(model)
    terms = san_saw.losses(ctx)
    assert set(terms) == {f"{t}_{s}" for t in ("ce", "san", "saw") for s in ("layer1", "layer2")}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in terms.values())
    # The aux CE alone trains the aux classifiers and nothing else: their input is detached.
    terms["ce_layer1"].backward(retain_graph=True)
    blocks = model.dg_norm.blocks
    assert blocks["layer1"].aux_classifier.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())
    assert blocks["layer1"].attention.weight.grad is None and blocks["layer2"].aux_classifier.weight.grad is None
    model.zero_grad(set_to_none=True)
    total = sum(segmentation_ce(ctx.source_out, ctx.source.labels, CrossEntropyOptions(), 255).values()) \
        + sum(terms.values())
    total.backward()
    for stage in ("layer1", "layer2"):
        block = blocks[stage]
        for param in (block.aux_classifier.weight, block.affine_weight, block.affine_bias, block.attention.weight):
            assert param.grad is not None and param.grad.abs().sum() > 0
        per_class = block.attention.weight.grad.flatten(1).abs().sum(1)    # (K,): every class's attention
        assert (per_class > 0).all()
    assert model.backbone.layer1[0].conv1.weight.grad.abs().sum() > 0


def test_san_saw_options_and_missing_blocks_fail_with_the_recipe_key():
    with pytest.raises(ConfigError, match=r"components.san_saw needs the model's san_saw blocks; set model.options.dg_norm"):
        build_components({"san_saw": {}}, _setup(_small(None)))
    with pytest.raises(ConfigError, match=r"components.isw needs .* has dg_norm.kind = 'san_saw'"):
        build_components({"isw": {}}, _setup(_small(SAN)))
    with pytest.raises(ConfigError, match="stat_iters"):
        build_components({"isw": {"mask_iter": 5, "stat_iters": 6}}, _setup(_small(ISW)))
    with pytest.raises(ConfigError, match="did you mean 'components.san_saw.saw_weight'"):
        parse_options(METHODS["san_saw"], {"saw_wieght": 0.1})
    (release,) = build_components({"san_saw": {"saw_weight": 0.0}}, _setup(_small({**SAN, "release_behaviour": True})))
    assert not any(name.startswith("saw") for name in release.losses(_ctx(release.setup.model)))


def test_batch_class_weights_and_weighted_ce():
    labels = torch.tensor([[[0, 0, 0, 1], [2, 255, 0, 1]]])
    torch.testing.assert_close(batch_class_weights(labels, 4, 255), torch.tensor([1 - 4 / 8, 1 - 2 / 8, 1 - 1 / 8, 1.0]))
    logits = torch.randn(1, 4, 2, 4)
    out = SegmenterOutput(logits=logits)
    plain = segmentation_ce(out, labels, CrossEntropyOptions(), 255)["ce"]
    weighted = segmentation_ce(out, labels, CrossEntropyOptions(class_weighted=True), 255)["ce"]
    expected = F.cross_entropy(logits, labels, weight=batch_class_weights(labels, 4, 255), ignore_index=255)
    assert weighted.item() == pytest.approx(expected.item()) and weighted.item() != pytest.approx(plain.item())


# ------------------------------------------------------------------ training runs on unseen domains

@pytest.fixture(scope="module")
def third_domain(tmp_path_factory) -> Path:
    from conftest import write_tiny_domain

    palette = [(150, 110, 100), (110, 150, 90), (100, 100, 140)]
    return write_tiny_domain(tmp_path_factory.mktemp("tiny_fog"), "tiny_fog", palette, n_train=2, seed=3)


def _dg_recipe(tmp_path, tiny_domains, third_domain, dg_norm: str, components: str) -> Path:
    text = f'''name = "tiny_dg"
[data]
source = "{tiny_domains['source']}"
target = ""
val_domains = ["{tiny_domains['target']}", "{third_domain}"]
batch_size = 2
num_workers = 0
[model]
name = "deeplab_small"
options = {{ width = 8, aspp_channels = 16, dg_norm = {dg_norm} }}
[optim]
name = "adam"
lr = 1e-3
weight_decay = 0.0
[schedule]
iters = 2
[train]
log_every = 1
eval_every = 2
checkpoint_every = 2
{components}'''
    path = tmp_path / f"tiny_dg_{len(components)}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("dg_norm, components", [
    ('{ kind = "san_saw", stages = [1, 2], classes = [0, 2] }',
     "[components.source_ce]\nclass_weighted = true\n[components.san_saw]\n"),
    ('{ kind = "isw", stages = [0, 1] }', "[components.source_ce]\n[components.isw]\nmask_iter = 1\nstat_iters = 1\n"),
])
def test_two_step_run_evaluates_every_unseen_domain_and_their_mean(tmp_path, tiny_domains, third_domain,
                                                                 dg_norm, components):
    recipe = load_recipe(_dg_recipe(tmp_path, tiny_domains, third_domain, dg_norm, components))
    train(recipe, tmp_path / "runs", progress=False)
    (run_dir,) = find_runs(tmp_path / "runs", recipe)
    assert run_dir.parent.name == "tiny_src_to_unseen"
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["finished"] and saved["target"] == "" and saved["primary_domain"] == "mean"
    assert saved["val_domains"] == ["tiny_tgt", "tiny_fog"]
    domains = saved["last"]["domains"]
    assert {"tiny_tgt", "tiny_fog", "mean", "tiny_src"} <= set(domains)
    assert domains["mean"]["miou"] == pytest.approx((domains["tiny_tgt"]["miou"] + domains["tiny_fog"]["miou"]) / 2)
    # The table: last/best score the mean; each unseen domain has its own column.
    (row,) = summarize(collect_runs([tmp_path / "runs"]))
    assert row.pair == "tiny_src->unseen" and row.domain == "mean"
    assert row.unseen["tiny_fog"].mean == pytest.approx(domains["tiny_fog"]["miou"])
    header = compare_table(collect_runs([tmp_path / "runs"])).splitlines()[0]
    assert "DG mean" in header and "tiny_tgt" in header and "tiny_fog" in header
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"eval/tiny_tgt/mIoU", "eval/tiny_fog/mIoU", "eval/mean/mIoU"} <= scalars
    method = "san_saw" if "san_saw" in components else "isw"
    assert any(tag.startswith(f"loss/{method}/") for tag in scalars)
    if method == "isw":
        assert acc.Scalars("loss/isw/isw")[-1].value > 0        # the mask was set after step 1


def test_shipped_dg_recipes_build_their_models_and_components():
    root = Path(__file__).parents[1] / "recipes"
    paths = sorted(root.glob("synthetic/streets/dg_*.toml")) + sorted(root.glob("gta5_to_cityscapes/*_deeplab*.toml"))
    checked = 0
    for path in paths:
        recipe = load_recipe(path)
        if not recipe.data.target and recipe.data.source in ("gta5", "synth_streets_game"):
            expected = (["cityscapes", "bdd100k", "mapillary"] if recipe.data.source == "gta5" else
                        ["synth_streets_real", "synth_streets_dusk", "synth_streets_fog"])
            assert list(recipe.val_domains) == expected, path
            num_classes = 19 if recipe.data.source == "gta5" else 8
            with torch.device("meta"):
                model = build_model(recipe.model.name, num_classes, **recipe.model.options)
            setup = component_setup(recipe, model, torch.device("cpu"))
            build_components(recipe.components, setup, source=str(path))
            checked += 1
    assert checked == 7
    assert math.isclose(load_recipe(root / "synthetic/streets/dg_san_saw.toml").optim.lr,
                        load_recipe(root / "synthetic/streets/source_only.toml").optim.lr)
