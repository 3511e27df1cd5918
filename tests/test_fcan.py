"""FCAN: the AAN statistics, losses and update rule, the ImageNet feature network's key map, and the
fcan stage end to end (warm-up -> adapted domain -> RAN) with its resume."""
from __future__ import annotations

import json

import pytest
import torch

from da_seg.data.domains import load_domain
from da_seg.methods.appearance import (GramAverage, ImageNetResNet50, SegmenterFeatures, adapt_images, content_loss,
                                       gram_matrix, style_loss)
from da_seg.models.small import build_deeplab_small
from da_seg.models.weights import WeightsError
from da_seg.stages import STAGES, load, sweep
from da_seg.stages.translate import MARKER


def _direct_gram(maps):
    """G_ij = sum over cells of M_i * M_j, one image at a time, with explicit loops over channels."""
    n, c = maps.shape[:2]
    flat = maps.reshape(n, c, -1)
    return torch.stack([torch.tensor([[float((flat[k, i] * flat[k, j]).sum()) for j in range(c)] for i in range(c)])
                        for k in range(n)])


@pytest.mark.parametrize("normalize", [False, True])
def test_gram_loss_is_zero_for_identical_statistics_and_a_direct_computation_otherwise(normalize):
    torch.manual_seed(0)
    a, b = torch.rand(2, 3, 4, 5), torch.rand(2, 3, 4, 5)
    cells = 20 if normalize else 1
    assert torch.allclose(gram_matrix(a, normalize), _direct_gram(a) / cells, atol=1e-5)
    target = {"x": gram_matrix(a, normalize)[0]}
    # identical statistics: the first image has exactly the target's Gram matrix (and so does any
    # permutation of its cells: style ignores where things are)
    shuffled = a[:1].flatten(2)[..., torch.randperm(20)].reshape(1, 3, 4, 5)
    assert style_loss({"x": a[:1]}, target, {"x": 1.0}, normalize).item() == pytest.approx(0.0, abs=1e-6)
    assert style_loss({"x": shuffled}, target, {"x": 1.0}, normalize).item() == pytest.approx(0.0, abs=1e-5)
    diff = (_direct_gram(b) / cells - target["x"]) ** 2                         # (2, 3, 3)
    expected = 2.5 * (diff.mean((1, 2)) if normalize else diff.sum((1, 2)))
    assert torch.allclose(style_loss({"x": b}, target, {"x": 2.5}, normalize), expected, rtol=1e-5)
    content = (a - b) ** 2
    expected = 0.5 * (content.mean((1, 2, 3)) if normalize else content.sum((1, 2, 3)))
    assert torch.allclose(content_loss({"x": a}, {"x": b}, {"x": 0.5}, normalize), expected, rtol=1e-5)


def test_target_style_is_the_mean_gram_over_images_in_any_batching():
    torch.manual_seed(0)
    maps = torch.rand(5, 4, 3, 3)
    average = GramAverage(normalize=True)
    average.add({"x": maps[:2]})
    average.add({"x": maps[2:]})
    direct = torch.stack([_direct_gram(maps[k:k + 1])[0] / 9 for k in range(5)]).mean(0)
    assert torch.allclose(average.mean()["x"], direct, atol=1e-5)
    with pytest.raises(ValueError, match="no target image"):
        GramAverage(True).mean()


def _features():
    torch.manual_seed(0)
    return SegmenterFeatures(build_deeplab_small(3, width=4), ("layer1", "layer4")).freeze()


def test_update_rule_is_the_papers_normalized_step_and_the_style_distance_falls():
    features = _features()
    source = 0.25 + 0.5 * torch.rand(2, 3, 32, 32)            # far from 0 and 1: no pixel clipped in one step
    target_grams = {k: gram_matrix(v, True).mean(0) for k, v in features(torch.rand(4, 3, 32, 32)).items()}
    weights = {"layer1": 1.0, "layer4": 1.0}
    # one step of I = 4: w = beta * (I - 1) / I in 0..255 units, then g / mean|g| per image
    once = adapt_images(features, source, target_grams, content_weights=weights, style_weights=weights, alpha=1.0,
                        iterations=4, beta=10.0, init="source", normalize=True)
    one_step = adapt_images(features, source, target_grams, content_weights=weights, style_weights=weights,
                            alpha=1.0, iterations=1, beta=10.0, init="source", normalize=True)
    assert torch.equal(one_step, source)                       # I = 1: w = beta * (1 - 1) / 1 = 0
    steps = [10.0 / 255 * (4 - i) / 4 for i in (1, 2, 3)]
    moved = (once - source).abs().mean(dim=(1, 2, 3))
    assert float(moved.max()) <= sum(steps) + 1e-6 and float(moved.min()) > 0
    first = adapt_images(features, source, target_grams, content_weights=weights, style_weights=weights, alpha=1.0,
                         iterations=4, beta=10.0, init="source", normalize=True)
    assert torch.equal(first, once)                            # deterministic
    # the style distance to the target falls; without the style term the source is a fixed point
    with torch.no_grad():
        before = style_loss(features(source), target_grams, weights, True)
        after = style_loss(features(adapt_images(features, source, target_grams, content_weights=weights,
                                                 style_weights=weights, alpha=100.0, iterations=20, beta=10.0,
                                                 init="source", normalize=True)), target_grams, weights, True)
    assert (after < before).all()
    still = adapt_images(features, source, target_grams, content_weights=weights, style_weights=weights, alpha=0.0,
                         iterations=5, beta=10.0, init="source", normalize=True)
    assert torch.equal(still, source)
    noise = adapt_images(features, source, target_grams, content_weights=weights, style_weights=weights, alpha=1.0,
                         iterations=2, beta=10.0, init="noise", generator=torch.Generator().manual_seed(3))
    assert noise.min() >= 0 and noise.max() <= 1 and not torch.allclose(noise, source, atol=0.1)


def test_imagenet_resnet50_loads_a_torchvision_file_by_its_key_map(tmp_path):
    torch.manual_seed(0)
    reference = ImageNetResNet50()
    state = dict(reference.backbone.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)   # torchvision's classifier
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(state, path)
    net = ImageNetResNet50.from_file(path)
    assert torch.equal(net.backbone.layer3[5].conv2.weight, reference.backbone.layer3[5].conv2.weight)
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    maps = net(torch.rand(1, 3, 64, 96))
    assert {k: tuple(v.shape[1:]) for k, v in maps.items()} == {                # conv1, res2c, res3d, res4f, res5c
        "stem": (64, 16, 24), "layer1": (256, 16, 24), "layer2": (512, 8, 12), "layer3": (1024, 4, 6),
        "layer4": (2048, 2, 3)}
    del state["layer4.2.conv3.weight"]
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"layer4\.2\.conv3\.weight"):
        ImageNetResNet50.from_file(path)


FCAN = """[fcan]
warmup_recipe = "warm.toml"
layers = ["layer1", "layer4"]
alpha = 1.0
normalize = true
init = "source"
iterations = 2
batch_size = 4
[components.source_ce]
[components.feature_adversarial]
channels = 4
"""


def test_stage_warms_up_writes_the_adapted_domain_trains_ran_and_resumes(write_recipe, tmp_path):
    write_recipe("[components.source_ce]\n", iters=2, name="warm.toml")
    path = write_recipe(FCAN, iters=2, name="fcan.toml", stage="fcan")
    path.write_text(path.read_text().replace('name = "tiny"', 'name = "fcan"', 1))
    recipe = load(path)
    assert STAGES[recipe.stage].per_seed
    runs = tmp_path / "runs"
    (ran,) = sweep([path], seeds=1, runs_root=runs, progress=False)
    assert ran.parent.name == "tiny_src_aan_to_tiny_tgt" and ran.parent.parent.name == "fcan"  # recipe first
    warm_runs = list((runs / "tiny" / "tiny_src_to_tiny_tgt").iterdir())      # the warm-up: an ordinary run
    assert len(warm_runs) == 1
    (appearance,) = (runs / "tiny_src_to_tiny_tgt" / "fcan_fcan").iterdir()
    marker = json.loads((appearance / "tiny_src_aan" / MARKER).read_text())
    assert marker["complete"] and marker["checkpoint"] == str(warm_runs[0] / "last.pt")
    assert marker["counts"] == {"train": {"images": 12, "adapted_now": 12}, "val": {"images": 4, "adapted_now": 4}}
    domain = load_domain(str(appearance / "tiny_src_aan.toml"))
    source = load_domain(str(recipe.data.source))
    adapted, original = domain.samples("train", with_labels=True), source.samples("train", with_labels=True)
    assert [s.label for s in adapted] == [s.label for s in original]          # the source's own label files
    assert domain.read_image(adapted[0].image).shape == source.read_image(original[0].image).shape
    assert (domain.read_image(adapted[0].image) != source.read_image(original[0].image)).any()
    saved = json.loads((ran / "metrics.json").read_text())
    assert saved["finished"] and "feature_adversarial" in saved["components"]
    from da_seg.config import load_recipe
    ran_recipe = load_recipe(ran / "recipe.toml")
    assert ran_recipe.model.init_checkpoint == str(warm_runs[0] / "last.pt")
    assert ran_recipe.data.source == str(appearance / "tiny_src_aan.toml")

    # Resume: a lost adapted image is rewritten (the domain's marker is redone), nothing retrained.
    adapted[0].image.unlink()
    (appearance / "tiny_src_aan" / MARKER).write_text(json.dumps({**marker, "complete": False}))
    (again,) = sweep([path], seeds=1, runs_root=runs, progress=False)
    assert again == ran and adapted[0].image.exists()
    assert json.loads((appearance / "tiny_src_aan" / MARKER).read_text())["counts"]["train"]["adapted_now"] == 1
    assert len(list((runs / "tiny" / "tiny_src_to_tiny_tgt").iterdir())) == 1
