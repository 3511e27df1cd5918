"""HRDA: the detail crop's place, the fusion formula, the masked attention, the 0.9 / 0.1 loss,
sliding detail windows, batched evaluation windows and a short run of the synthetic recipe."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from da_seg.engine.evaluate import predict
from da_seg.methods.source import CrossEntropyOptions, segmentation_ce
from da_seg.models import build_model
from da_seg.models.hrda import HRDASegmenter
from da_seg.models.segmenter import InputNorm, Segmenter, SegmenterOutput

REPO = Path(__file__).resolve().parents[1]


class PointwiseSegmenter(Segmenter):
    """Average-pool by the output stride, then 1x1 convs: a cell's logits depend on its own pixels
    only, so a crop's prediction is exactly the crop of the whole image's prediction."""

    def __init__(self, num_classes: int = 3, stride: int = 4):
        super().__init__()
        self.num_classes, self.output_stride = num_classes, stride
        self.input_norm = InputNorm.named("imagenet")
        self.backbone = nn.Sequential(nn.AvgPool2d(stride), nn.Conv2d(3, 6, 1), nn.Tanh())
        self.head = nn.Conv2d(6, num_classes, 1)

    def forward_normalized(self, x):
        features = self.backbone(x)
        return SegmenterOutput(logits=self.head(features), features={"backbone": features})


def tiny_hrda(**options) -> HRDASegmenter:
    torch.manual_seed(0)
    return build_model("hrda", 3, base="deeplab_small", base_options={"width": 8, "aspp_channels": 16},
                       detail_crop=(32, 32), attention_channels=8, **options)


def test_detail_crop_lies_inside_the_context_crop_on_the_context_grid():
    model = tiny_hrda()
    assert model.crop_divisible == 16          # deeplab_small stride 8 / context scale 0.5
    seen = set()
    for _ in range(200):
        top, bottom, left, right = model.random_box(64, 96)
        assert 0 <= top < bottom <= 64 and 0 <= left < right <= 96
        assert (bottom - top, right - left) == (32, 32)
        assert top % 16 == 0 and left % 16 == 0
        seen.add((top, left))
    assert seen == {(t, l) for t in (0, 16, 32) for l in (0, 16, 32, 48, 64)}    # every aligned place
    mit = build_model("hrda", 3, base="segformer_b0", detail_crop=(64, 64), attention_features=["stage1", "stage4"])
    assert mit.crop_divisible == 8              # the official crop_coord_divisible for MiT (stride 4)
    with pytest.raises(ValueError, match="multiple of output stride / context scale = 16"):
        tiny_hrda(crop_divisible=8)
    with pytest.raises(ValueError, match="does not fit"):
        model.random_box(16, 64)


def _train_forward_with_box(model, images, box):
    model.train()
    model.random_box = lambda h, w: box
    torch.manual_seed(1)
    return model(images)


def test_fused_output_is_the_formula_and_attention_is_zero_outside_the_crop():
    model = tiny_hrda()
    images = torch.rand(2, 3, 64, 96)
    box = (16, 48, 32, 64)
    out = _train_forward_with_box(model, images, box)
    # Recompute every piece directly from the base network and the attention head.
    torch.manual_seed(1)
    x = model.input_norm.apply(images)
    context = model.base.forward_normalized(F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False))
    attention = torch.sigmoid(model.attention([context.features["backbone"]]))            # (2, 3, 4, 6)
    mask = torch.zeros(1, 1, 4, 6)
    mask[:, :, 1:3, 2:4] = 1                                                              # box / 16
    attention = attention * mask
    detail = model.base.forward_normalized(x[:, :, 16:48, 32:64]).logits                  # (2, 3, 4, 4)
    placed = torch.zeros(2, 3, 8, 12)
    placed[:, :, 2:6, 4:8] = detail                                                       # box / 8
    up = lambda t: F.interpolate(t, size=(8, 12), mode="bilinear", align_corners=False)   # noqa: E731
    expected = up(attention) * placed + up((1 - attention) * context.logits)
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(out.detail.logits, detail)
    assert out.detail.box == box and out.detail.weight == pytest.approx(0.1)
    att = out.features["attention"]
    assert att.shape == (2, 3, 4, 6)
    assert (att[:, :, 1:3, 2:4] > 0).all()
    outside = torch.ones(4, 6, dtype=torch.bool)
    outside[1:3, 2:4] = False
    assert (att[:, :, outside] == 0).all()
    # Far from the crop the prediction is the upsampled context alone.
    torch.testing.assert_close(out.logits[..., :, :2], up(context.logits)[..., :, :2])


def test_loss_is_point_nine_fused_plus_point_one_detail_on_the_cropped_labels():
    model = tiny_hrda()
    images, labels = torch.rand(2, 3, 64, 96), torch.randint(0, 3, (2, 64, 96))
    labels[0, :5] = 255
    out = _train_forward_with_box(model, images, (32, 64, 0, 32))
    terms = segmentation_ce(out, labels, CrossEntropyOptions(), 255)
    fused = F.cross_entropy(F.interpolate(out.logits, size=(64, 96), mode="bilinear"), labels, ignore_index=255)
    detail = F.cross_entropy(F.interpolate(out.detail.logits, size=(32, 32), mode="bilinear"),
                             labels[:, 32:64, 0:32], ignore_index=255)
    torch.testing.assert_close(terms["ce"], 0.9 * fused)
    torch.testing.assert_close(terms["ce_detail"], 0.1 * detail)
    sum(terms.values()).backward()
    assert model.attention.classifier.weight.grad.abs().sum() > 0     # the attention learns from the fused loss
    assert model.base.backbone.stem[0].weight.grad.abs().sum() > 0


def test_sliding_detail_windows_equal_the_direct_full_resolution_prediction():
    base = PointwiseSegmenter(stride=4)
    model = HRDASegmenter(base, detail_crop=(16, 16), attention_channels=4)
    images = torch.rand(2, 3, 40, 56)                     # windows every 8 px, the last shifted back
    x = model.input_norm.apply(images)
    direct = base.forward_normalized(x).logits            # (2, 3, 10, 14)
    torch.testing.assert_close(model.detail_slide(x), direct)
    model.detail_batch = 4                                 # windows in passes of 4: the same
    torch.testing.assert_close(model.detail_slide(x), direct)
    # The teacher's pseudo-labels (train mode, no gradients) fuse the context with those windows.
    model.train()
    with torch.no_grad():
        out = model(images)
        context, attention = model._context(x)
        expected = model.fuse(context.logits, attention, direct)
    assert out.detail is None
    torch.testing.assert_close(out.logits, expected)


def test_batched_evaluation_windows_give_the_same_probabilities():
    model = tiny_hrda().eval()
    images = torch.rand(2, 3, 64, 128)
    with torch.no_grad():
        one = predict(model, images, mode="slide", crop=(64, 64), stride=(32, 32))
        three = predict(model, images, mode="slide", crop=(64, 64), stride=(32, 32), window_batch=3)
    assert one.shape == (2, 3, 64, 128)
    torch.testing.assert_close(three, one, rtol=1e-4, atol=1e-5)   # BatchNorm in eval mode: windows independent


def test_listed_with_the_models_and_rebuilt_from_its_options():
    from da_seg.models import MODELS, describe_models

    assert "hrda" in MODELS and "hrda" in {row[0] for row in describe_models()}
    model = tiny_hrda()
    again = tiny_hrda()
    again.load_state_dict(model.state_dict())
    with pytest.raises(KeyError, match="valid bases"):
        build_model("hrda", 3, base="hrda")
    with pytest.raises(ValueError, match="feature maps are"):
        tiny_hrda(attention_features=["stage9"])
    groups = {g["name"]: g for g in model.param_groups(1e-3, 10.0)}
    encoder = {id(p) for p in model.base.backbone.parameters()}
    assert {id(p) for p in groups["backbone"]["params"]} == encoder
    assert {id(p) for p in model.attention.parameters()} <= {id(p) for p in groups["head"]["params"]}


@pytest.mark.parametrize("name", ["hrda", "hrda_mic"])
def test_the_synthetic_hrda_recipes_run_end_to_end(name, tmp_path, monkeypatch):
    from da_seg.config import load_recipe
    from da_seg.data.synthetic import generate
    from da_seg.engine.trainer import Trainer

    generate(tmp_path / "synth", benchmarks=("streets_hr",), n_train=2, n_val=1, workers=1, log=None)
    monkeypatch.setenv("DA_SEG_DATA", str(tmp_path))
    recipe = load_recipe(REPO / "recipes" / "synthetic" / "streets_hr" / f"{name}.toml", [
        "schedule.iters=2", "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1",
        "data.num_workers=0", "data.batch_size=2", "eval.alignment_images=0", "eval.max_panels=0",
        "model.options.base_options.width=8", "model.options.base_options.aspp_channels=16"])
    assert recipe.model.name == "hrda" and recipe.eval.mode == "slide"
    metrics = Trainer(recipe, tmp_path / "run", device="cpu", progress=False).fit()
    assert metrics["finished"] and 0 <= metrics["last"]["domains"]["synth_streets_hr_real"]["miou"] <= 100


# ---------------------------------------------------------------------------------------------
# What the loop gives HRDA's crops: pseudo-label margins cut with the crop, rare-class re-crops

def test_a_mask_goes_through_the_same_crop_flip_and_scale_as_the_labels():
    from da_seg.data.augment import random_geometry

    torch.manual_seed(0)
    images, labels = torch.rand(6, 3, 40, 60), torch.randint(0, 4, (6, 40, 60))
    labels[:, :3] = 255
    mask = labels == 1
    _, moved_labels, moved_mask = random_geometry(images, labels, (32, 32), (0.8, 1.5), True, mask=mask)
    assert moved_labels.shape == moved_mask.shape == (6, 32, 32)
    assert torch.equal(moved_mask, moved_labels == 1)           # the same pixels, padding False
    assert (moved_labels == 255).any() and set(moved_labels.unique().tolist()) <= {0, 1, 2, 3, 255}
    generator = torch.Generator().manual_seed(3)
    _, no_labels, alone = random_geometry(images, None, (32, 32), (0.8, 1.5), True, generator, mask=mask)
    assert no_labels is None
    generator = torch.Generator().manual_seed(3)
    _, as_labels = random_geometry(images, mask.long(), (32, 32), (0.8, 1.5), True, generator)
    assert torch.equal(alone, as_labels == 1)


def test_pseudo_label_margins_give_weight_zero_where_the_crop_touches_them():
    from contextlib import nullcontext

    from da_seg.engine.batches import _inside_margins
    from da_seg.methods.base import ComponentSetup, DomainBatch, StepContext
    from da_seg.methods.self_training import MeanTeacher, MeanTeacherOptions

    valid = _inside_margins((2, 3, 20, 30), (3, 6, 2, 4), "cpu")
    assert valid[:, 3:14, 2:26].all() and valid.sum() == 2 * 11 * 24
    model = build_model("deeplab_small", 3, width=8, aspp_channels=16)
    teacher = MeanTeacher(MeanTeacherOptions(mix="none", color_jitter=0.0, blur_p=0.0, threshold=0.0),
                          ComponentSetup(num_classes=3, device=torch.device("cpu"), model=model))
    source = DomainBatch(torch.rand(2, 3, 20, 30), torch.randint(0, 3, (2, 20, 30)))
    target = DomainBatch(torch.rand(2, 3, 20, 30), None, None, valid)
    ctx = StepContext(model=model, iteration=0, max_iters=10, source=source, target=target, autocast=nullcontext)
    teacher.prepare_batches(ctx)
    teacher.losses(ctx)
    weights = teacher._last["weights"]
    assert (weights[~valid[0]] == 0).all() and (weights[valid[0]] == 1).all()     # q = 1 at threshold 0


class _FixedClassSampler:
    """A stand-in for RareClassSampler: every sample was drawn for class 1."""

    def class_at(self, position):
        return 1

    def position_of(self, consumed):
        return consumed


def test_rare_class_crops_are_redrawn_until_they_hold_the_class():
    from da_seg.config import AugmentConfig
    from da_seg.data.augment import BatchAugment
    from da_seg.engine.batches import AugmentedStream

    torch.manual_seed(0)
    raw_labels = torch.zeros(8, 32, 64, dtype=torch.long)
    raw_labels[:, :, 32:] = 1                                   # class 1 only in the right half
    raw_images = torch.randint(0, 255, (8, 3, 32, 64), dtype=torch.uint8)
    augment = BatchAugment(AugmentConfig(crop=(32, 32), flip=False))
    stream = AugmentedStream.__new__(AugmentedStream)
    stream.augment, stream.min_class_pixels, stream._consumed = augment, 400.0, 0
    stream._sampler = _FixedClassSampler()
    images, labels = augment(raw_images, raw_labels)
    before = ((labels == 1).sum((1, 2)) > 400).sum()
    images, labels = stream._recrop_rare(raw_images, raw_labels, images, labels)
    after = ((labels == 1).sum((1, 2)) > 400)
    assert before < 8 and after.all()        # a crop holds > 400 px of class 1 at 61% of its offsets
    assert images.shape == (8, 3, 32, 32)


def test_the_class_a_rare_class_sample_was_drawn_for():
    import numpy as np

    from da_seg.data.rare_class import ClassStats, RareClassSampler

    counts = np.array([[9000, 3500, 0], [9000, 0, 0], [5000, 0, 3200], [8000, 10, 3100]])
    sampler = RareClassSampler(ClassStats("toy", "train", ("a", "b", "c", "d"), counts), seed=2,
                               min_pixels=3000, rank=1, world_size=2, temperature=1.0)   # every class drawn
    stream = iter(sampler)
    for consumed in range(300):
        index = next(stream)
        position = sampler.position_of(consumed)
        assert position == 1 + 2 * consumed and sampler.index_at(position) == index
        assert counts[index, sampler.class_at(position)] >= 3000    # the image holds the drawn class
    assert {sampler.class_at(sampler.position_of(k)) for k in range(300)} == {0, 1, 2}
