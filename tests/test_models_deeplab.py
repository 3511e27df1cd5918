"""DeepLabV2 / DeepLabV3+: shapes, strides, dilations, parameter counts, gradients, norms.

Everything runs on CPU at 65x97 (odd on purpose) or on the meta device (shape-only, no memory).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn

from da_seg.models import MODELS, build_model, describe_models
from da_seg.models.deeplab import DeepLabV2, DeepLabV3Plus
from da_seg.models.segmenter import INPUT_NORMS, InputNorm

H, W = 65, 97
SMALL = (1, 3, 33, 49)  # for the costly forward/backward checks


def _ceil(size: int, stride: int) -> int:
    return math.ceil(size / stride)


@pytest.fixture(scope="module")
def v2_r50() -> DeepLabV2:
    torch.manual_seed(0)
    return build_model("deeplabv2_r50", 3)


def test_registry_names_and_unknown_option():
    for name in ("deeplabv2_r50", "deeplabv2_r101", "deeplabv3plus_r50", "deeplabv3plus_r101"):
        assert name in MODELS
    with pytest.raises(KeyError, match="aspp"):
        build_model("deeplabv3plus_r50", 3, aspp="full")
    with pytest.raises(ValueError, match="reduced"):
        build_model("deeplabv2_r50", 3, aspp="half")


def test_deeplabv2_shapes_and_features_odd_input(v2_r50):
    out = v2_r50(torch.rand(1, 3, H, W))
    assert out.logits.shape == (1, 3, _ceil(H, 8), _ceil(W, 8))
    assert out.aux_logits is not None and out.aux_logits.shape == out.logits.shape
    assert v2_r50.output_stride == 8
    assert out.features["layer1"].shape == (1, 256, _ceil(H, 4), _ceil(W, 4))
    for name, channels in (("layer2", 512), ("layer3", 1024), ("layer4", 2048)):
        assert out.features[name].shape == (1, channels, _ceil(H, 8), _ceil(W, 8))
    assert out.features["backbone"] is out.features["layer4"]


def test_deeplabv2_full_resolution_on_meta():
    # 512x1024 -> 65x129: the max-pool rounds up (ceil_mode), as in AdaptSegNet/ADVENT.
    with torch.device("meta"):
        model = build_model("deeplabv2_r101", 19)
        out = model(torch.rand(1, 3, 512, 1024))
    assert out.logits.shape == (1, 19, 65, 129) and out.aux_logits.shape == (1, 19, 65, 129)


def test_deeplabv2_multi_level_off_has_no_aux():
    with torch.device("meta"):
        model = build_model("deeplabv2_r50", 3, multi_level=False)
        out = model(torch.rand(2, 3, H, W))
    assert model.aux_classifier is None and out.aux_logits is None


def test_deeplabv2_caffe_strides_and_dilations():
    with torch.device("meta"):
        model = build_model("deeplabv2_r101", 19)
    bb = model.backbone
    assert bb.maxpool.ceil_mode and bb.maxpool.kernel_size == 3 and bb.maxpool.stride == 2 and bb.maxpool.padding == 1
    # Caffe style: the stride of layer2's first block sits on its 1x1 conv.
    assert bb.layer2[0].conv1.stride == (2, 2) and bb.layer2[0].conv2.stride == (1, 1)
    assert len(bb.layer3) == 23 and len(bb.layer4) == 3
    for layer, dilation in ((bb.layer1, 1), (bb.layer2, 1), (bb.layer3, 2), (bb.layer4, 4)):
        for block in layer:  # every block, the first included
            assert block.conv2.dilation == (dilation, dilation) and block.conv2.padding == (dilation, dilation)
    for layer in (bb.layer3, bb.layer4):
        assert all(m.stride == (1, 1) for m in layer.modules() if isinstance(m, nn.Conv2d))
    for head, in_ch in ((model.classifier, 2048), (model.aux_classifier, 1024)):
        assert [c.dilation[0] for c in head.branches] == [6, 12, 18, 24]
        assert [c.padding[0] for c in head.branches] == [6, 12, 18, 24]
        assert all(c.in_channels == in_ch and c.out_channels == 19 and c.kernel_size == (3, 3) for c in head.branches)
    with torch.device("meta"):
        reduced = build_model("deeplabv2_r101", 19, aspp="reduced")
    assert [c.dilation[0] for c in reduced.classifier.branches] == [6, 12]


def test_deeplabv2_torchvision_style_option():
    with torch.device("meta"):
        model = build_model("deeplabv2_r50", 19, caffe_style=False)
    assert model.backbone.layer2[0].conv1.stride == (1, 1) and model.backbone.layer2[0].conv2.stride == (2, 2)


def test_aspp_classifier_sums_branches_and_init():
    torch.manual_seed(0)
    model = DeepLabV2(4, 50, aspp="reduced", multi_level=False)
    weights = torch.cat([c.weight.flatten() for c in model.classifier.branches])
    assert abs(weights.std().item() - 0.01) < 0.001 and abs(weights.mean().item()) < 0.001
    x = torch.randn(1, 2048, 5, 6)
    expected = sum(c(x) for c in model.classifier.branches)
    torch.testing.assert_close(model.classifier(x), expected)


def test_deeplabv2_r101_backbone_equals_torchvision_resnet101():
    with torch.device("meta"):
        ours = build_model("deeplabv2_r101", 19).backbone.state_dict()
        reference = torchvision.models.resnet101(weights=None).state_dict()
    reference = {k: v for k, v in reference.items() if not k.startswith("fc.")}
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    with torch.device("meta"):
        backbone = build_model("deeplabv2_r101", 19).backbone
        tv = torchvision.models.resnet101(weights=None)
    tv_params = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith("fc."))
    assert sum(p.numel() for p in backbone.parameters()) == tv_params


@pytest.mark.parametrize("output_stride, dilate", [(16, [False, False, True]), (8, [False, True, True])])
def test_deeplabv3plus_encoder_matches_torchvision_forward(output_stride, dilate):
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=dilate).eval()
    model = DeepLabV3Plus(3, 50, output_stride=output_stride).eval()
    model.backbone.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(1, 3, H, W)
    body = nn.Sequential(*list(reference.children())[:-2])
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x)["layer4"], body(x))


def test_deeplabv3plus_shapes_rates_and_batch_one_training():
    torch.manual_seed(0)
    model = build_model("deeplabv3plus_r50", 5)
    assert model.aspp.rates == (6, 12, 18) and model.encoder_stride == 16 and model.output_stride == 4
    rates = [b[0].dilation[0] for b in model.aspp.branches[1:]]
    assert rates == [6, 12, 18]
    model.train()
    out = model(torch.rand(1, 3, H, W))  # batch 1 in train mode: the image-pool branch has no BN
    assert out.logits.shape == (1, 5, _ceil(H, 4), _ceil(W, 4))
    assert out.aux_logits is None
    assert out.features["decoder"].shape == (1, 256, _ceil(H, 4), _ceil(W, 4))
    assert out.features["layer4"].shape[-2:] == (_ceil(H, 16), _ceil(W, 16))
    with torch.device("meta"):
        os8 = build_model("deeplabv3plus_r101", 19, output_stride=8)
        out8 = os8(torch.rand(1, 3, 512, 1024))
    assert os8.aspp.rates == (12, 24, 36)
    assert out8.features["layer4"].shape[-2:] == (64, 128) and out8.logits.shape == (1, 19, 128, 256)


def test_frozen_bn_keeps_batch_statistics(v2_r50):
    bns = [m for m in v2_r50.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not p.requires_grad for bn in bns for p in bn.parameters())
    assert v2_r50.backbone_parameters() and all(p.ndim == 4 for p in v2_r50.backbone_parameters())  # convs only
    v2_r50.train()
    before = bns[0].running_mean.clone()
    v2_r50(torch.rand(*SMALL))
    assert not torch.equal(before, bns[0].running_mean)  # train mode still uses/moves batch stats
    with torch.device("meta"):
        trainable = build_model("deeplabv2_r50", 3, freeze_bn=False)
    assert all(p.requires_grad for p in trainable.parameters())


def test_gradients_reach_both_param_groups(v2_r50):
    v2_r50.train()
    v2_r50.zero_grad(set_to_none=True)
    out = v2_r50(torch.rand(*SMALL))
    (out.logits.square().mean() + out.aux_logits.square().mean()).backward()
    groups = {g["name"]: g for g in v2_r50.param_groups(lr=2.5e-4, head_lr_mult=10.0)}
    assert groups["head"]["lr"] == pytest.approx(2.5e-3)
    head_ids = {id(p) for p in groups["head"]["params"]}
    assert head_ids == {id(p) for p in [*v2_r50.classifier.parameters(), *v2_r50.aux_classifier.parameters()]}
    for name in ("backbone", "head"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in groups[name]["params"]), name


def test_channels_last_and_autocast(v2_r50):
    reference = v2_r50.eval()
    model = copy.deepcopy(v2_r50).to(memory_format=torch.channels_last)
    x = torch.rand(*SMALL)
    with torch.no_grad():
        expected = reference(x).logits
        out = model(x.contiguous(memory_format=torch.channels_last)).logits
        torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_input_norm_transforms():
    x = torch.tensor([0.2, 0.5, 0.8]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    caffe = InputNorm.named("caffe").apply(x)[0, :, 0, 0]
    # Caffe: BGR order, 0-255, minus the BGR means.
    torch.testing.assert_close(caffe, torch.tensor([0.8 * 255 - 104.008, 0.5 * 255 - 116.669, 0.2 * 255 - 122.675]))
    imagenet = InputNorm.named("imagenet").apply(x)[0, :, 0, 0]
    torch.testing.assert_close(imagenet, torch.tensor([(0.2 - 0.485) / 0.229, (0.5 - 0.456) / 0.224,
                                                       (0.8 - 0.406) / 0.225]))
    with torch.device("meta"):
        assert build_model("deeplabv2_r50", 3).input_norm == INPUT_NORMS["imagenet"]  # no weights
        assert build_model("deeplabv2_r50", 3, input_norm="caffe").input_norm == INPUT_NORMS["caffe"]
        assert build_model("deeplabv3plus_r50", 3).input_norm == INPUT_NORMS["imagenet"]


def test_describe_models_lists_every_model():
    rows = {name: (params, text) for name, params, text in describe_models()}
    assert set(rows) == set(MODELS)
    assert rows["deeplabv2_r101"][0] == pytest.approx(44.6, abs=0.1)
    assert all(text for _, text in rows.values())
