"""DINOv2 / EVA-02 segmenters on timm: shapes at any size, stride-4 resampling, sliding windows,
parameter counts, Rein (formula, gradients, trainable share), frozen / layer-decay / checkpointing."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from da_seg.engine.evaluate import predict
from da_seg.models import MODELS, build_model, describe_models
from da_seg.models.rein import Rein, rein_parameter_count
from da_seg.models.vit import VIT_SPECS, ViTSegmenter, build_timm_vit, resample_to_stride4

SMALL = {"depth": 2, "decoder_dim": 16}


def small(name="dinov2_vits14", num_classes=3, **options) -> ViTSegmenter:
    torch.manual_seed(0)
    return build_model(name, num_classes, **{**SMALL, **options})


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg", "eva02_vitb"])
@pytest.mark.parametrize("size", [(28, 42), (33, 50), (17, 9)])
def test_logits_are_stride_4_of_the_unpadded_image_at_any_size(name, size):
    model = small(name, depth=1).eval()
    out = model(torch.rand(2, 3, *size))
    assert out.logits.shape == (2, 3, math.ceil(size[0] / 4), math.ceil(size[1] / 4))
    grid = (math.ceil(size[0] / 14), math.ceil(size[1] / 14))
    assert out.features["backbone"].shape == (2, model.backbone.dim, *grid)
    assert out.features["decoder"].shape == (2, 16, *grid)
    assert torch.isfinite(out.logits).all()


def test_resampling_puts_each_logit_at_the_centre_of_its_stride_4_cell():
    # A map whose value is the image row of each stride-3.5 cell centre: bilinear resampling is
    # exact on linear functions, so row i of the result must read 4 i + 2 (away from the clamped border).
    h, w = 6, 5                                                   # token grid of an 84 x 70 padded image
    rows = (torch.arange(4 * h, dtype=torch.float32) + 0.5) * 3.5
    logits = rows.view(1, 1, -1, 1).expand(1, 1, 4 * h, 4 * w).contiguous()
    out = resample_to_stride4(logits, 79, 66)                      # unpadded 79 x 66
    assert out.shape == (1, 1, 20, 17)
    expected = torch.arange(20, dtype=torch.float32) * 4 + 2
    assert torch.allclose(out[0, 0, :, 0], expected, atol=1e-4)


def test_position_embeddings_follow_the_grid_and_the_padding_never_reaches_real_pixels_order():
    model = small(depth=1).eval()
    base = build_timm_vit("vit_small_patch14_dinov2", depth=1)
    assert base.pos_embed.shape == (1, 1 + 37 * 37, 384)           # DINOv2's 518 px pretraining grid
    x = torch.rand(1, 3, 30, 44)
    padded = F.pad(model.input_norm.apply(x), (0, 56 - 44, 0, 42 - 30))   # zeros after normalization
    direct = model.backbone(padded)["block0"]
    assert torch.equal(model(x).features["block0"], direct)


def test_sliding_windows_that_are_not_multiples_of_14():
    model = small(depth=1).eval()
    images = torch.rand(1, 3, 45, 61)
    with torch.no_grad():
        whole = predict(model, images, mode="whole")
        one_window = predict(model, images, mode="slide", crop=(45, 61))
        slid = predict(model, images, mode="slide", crop=(25, 33), stride=(20, 28))
    assert torch.allclose(one_window, whole, atol=1e-6)            # one window = the whole image
    assert slid.shape == whole.shape == (1, 3, 45, 61)
    assert torch.allclose(slid.sum(1), torch.ones(1, 45, 61), atol=1e-5)


def _dinov2_encoder_params(dim: int, depth: int, hidden: int, swiglu: bool, registers: int) -> int:
    """DINOv2's architecture counted by hand (timm's definition with its final norm, no head)."""
    patch = 3 * 14 * 14 * dim + dim
    tokens = dim + registers * dim + (37 * 37 + (0 if registers else 1)) * dim
    fc1 = dim * 2 * hidden + 2 * hidden if swiglu else dim * hidden + hidden
    block = 4 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + 2 * dim + fc1 + hidden * dim + dim
    return patch + tokens + depth * block + 2 * dim


@pytest.mark.parametrize("timm_name, dim, depth, hidden, swiglu, registers, published", [
    ("vit_small_patch14_dinov2", 384, 12, 1536, False, 0, 21e6),
    ("vit_base_patch14_dinov2", 768, 12, 3072, False, 0, 86e6),
    ("vit_large_patch14_dinov2", 1024, 24, 4096, False, 0, 300e6),
    ("vit_giant_patch14_dinov2", 1536, 40, 4096, True, 0, 1.1e9),
    ("vit_large_patch14_reg4_dinov2", 1024, 24, 4096, False, 4, 300e6),
])
def test_timm_definitions_have_dinov2s_exact_parameter_counts(timm_name, dim, depth, hidden, swiglu, registers,
                                                               published):
    import timm

    with torch.device("meta"):
        vit = timm.create_model(timm_name, pretrained=False, num_classes=0)
    count = sum(p.numel() for p in vit.parameters())
    assert count == _dinov2_encoder_params(dim, depth, hidden, swiglu, registers)
    # The DINOv2 README rounds: 22.06M "21M", 86.58M "86M", 304.37M "300M", 1136.48M "1,100M".
    assert abs(count - published) / published < 0.06


def test_list_models_shows_every_vit_with_its_count():
    rows = {name: params for name, params, _ in describe_models(19) if name in VIT_SPECS}
    assert set(rows) == set(VIT_SPECS) and set(VIT_SPECS) <= set(MODELS)
    assert rows["dinov2_vitl14"] == pytest.approx(304.37 - 0.002 + 1.2, abs=0.6)   # encoder + ~1.2M decoder
    assert 1134 < rows["dinov2_vitg14"] < 1140 and 85 < rows["eva02_vitb"] < 88


def test_rein_matches_the_official_formula():
    torch.manual_seed(0)
    rein = Rein(dim=8, layers=(0, 2), tokens=5, rank=3)
    with torch.no_grad():
        rein.scale.fill_(0.7)
    f = torch.randn(2, 6, 8)
    tokens = rein.tokens_a[1] @ rein.tokens_b[1]                                  # block 2 = second set
    attn = torch.einsum("nlc,mc->nlm", f, tokens).mul(8 ** -0.5).softmax(-1)
    delta = torch.einsum("nlm,mc->nlc", attn[:, :, 1:], rein.token_to_feature(tokens[1:]))
    expected = f + 0.7 * rein.delta_mlp(delta + f)
    assert torch.allclose(rein(f, 2), expected, atol=1e-6)
    assert torch.equal(rein(f, 1), f)                                            # a block without tokens
    assert sum(p.numel() for p in rein.parameters()) == rein_parameter_count(8, 2, 5, 3)


def test_rein_trains_only_rein_and_head_and_the_backbone_stays_in_eval_mode():
    model = small(depth=2, rein={"tokens": 6, "rank": 2, "layers": "all"}).train()
    assert not model.backbone.training and model.head.training
    model(torch.rand(2, 3, 28, 28)).logits.square().mean().backward()
    with_grad = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {"rein", "head"}
    assert all(not p.requires_grad and p.grad is None for p in model.backbone.parameters())
    names = {g["name"]: g for g in model.param_groups(1e-4, 1.0)}
    assert set(names) == {"head", "rein_tokens"} and names["rein_tokens"]["weight_decay"] == 0.0


def test_rein_on_dinov2_large_is_about_one_percent_of_the_encoder():
    with torch.device("meta"):
        model = build_model("dinov2_vitl14", 19, rein={"tokens": 100, "rank": 16, "layers": "all"})
    rein = sum(p.numel() for p in model.rein.parameters())
    encoder = sum(p.numel() for p in model.backbone.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rein == rein_parameter_count(1024, 24, 100, 16) == 2_530_817
    assert encoder == 304_365_568                                   # timm ViT-L/14 without its final norm
    assert 0.008 < rein / encoder < 0.009
    assert 0.01 < trainable / sum(p.numel() for p in model.parameters()) < 0.02   # Rein + our head
    assert "Rein 2,530,817 = 0.83%" in model.trainable_summary()


def test_rein_options_are_checked():
    with pytest.raises(ValueError, match="unknown key"):
        small(rein={"tokens": 4, "ranks": 2})
    with pytest.raises(ValueError, match=r"layers must be \"all\" or a list of block indices in \[0, 2\)"):
        small(rein={"layers": [5]})


def test_frozen_backbone_gets_no_gradient_and_no_group():
    model = small(backbone="frozen").train()
    model(torch.rand(1, 3, 28, 28)).logits.mean().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert [g["name"] for g in model.param_groups(1e-4, 10.0)] == ["head"]


def test_layer_decay_scales_each_block_and_covers_every_parameter_once():
    model = small(depth=3, layer_decay=0.5)
    groups = model.param_groups(1.0, 10.0)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {"head": 10.0, "backbone.layer0": 0.125, "backbone.layer1": 0.25, "backbone.layer2": 0.5,
                   "backbone.layer3": 1.0}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    assert all(g["initial_lr"] == g["lr"] for g in groups)


def test_activation_checkpointing_gives_the_same_gradients():
    x = torch.rand(1, 3, 28, 42)
    grads = []
    for checkpointing in (False, True):
        model = small(checkpointing=checkpointing).train()
        model(x).logits.square().mean().backward()
        grads.append(model.backbone.vit.blocks[0].attn.qkv.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_eva02_uses_clip_normalization_and_rotary_embeddings():
    model = small("eva02_vitb", depth=1)
    assert model.input_norm.mean[0] == pytest.approx(0.48145466)
    assert model.backbone.uses_rope and model.backbone.prefix == 1


def test_bf16_autocast_runs_forward_and_backward():
    model = small(rein={"tokens": 4, "rank": 2}).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(1, 3, 30, 44))
    assert out.features["decoder"].dtype == torch.bfloat16       # the network ran in bf16
    assert out.logits.shape == (1, 3, 8, 11)                       # (autocast resamples them in float32)
    out.logits.float().mean().backward()
    assert model.rein.tokens_a.grad is not None and torch.isfinite(model.rein.tokens_a.grad).all()
