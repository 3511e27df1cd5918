"""SegFormer / MiT: shapes, structure against the paper's table, parameter counts, attention, gradients."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from da_seg.models import MODELS, build_model
from da_seg.models.segformer import MIT_CONFIGS, DropPath, EfficientSelfAttention

H, W = 65, 97

# SegFormer paper, Table 1/2: total parameters (M). Counted with the 150-class ADE20K decoder
# and rounded to 0.1M.
PUBLISHED_MILLIONS = {"b0": 3.8, "b1": 13.7, "b2": 27.5, "b3": 47.3, "b4": 64.1, "b5": 84.7}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def b0():
    torch.manual_seed(0)
    return build_model("segformer_b0", 4)


def test_shapes_and_features_odd_input(b0):
    out = b0.eval()(torch.rand(2, 3, H, W))
    assert b0.output_stride == 4
    assert out.logits.shape == (2, 4, math.ceil(H / 4), math.ceil(W / 4))
    assert out.aux_logits is None
    for name, dim, stride in zip(("stage1", "stage2", "stage3", "stage4"), (32, 64, 160, 256), (4, 8, 16, 32)):
        assert out.features[name].shape == (2, dim, math.ceil(H / stride), math.ceil(W / stride)), name
    assert out.features["backbone"] is out.features["stage4"]
    assert out.features["decoder"].shape == (2, 256, 17, 25)


@pytest.mark.parametrize("variant", sorted(PUBLISHED_MILLIONS))
def test_parameter_counts_match_paper(variant):
    with torch.device("meta"):
        ade = _params(build_model(f"segformer_{variant}", 150))
        cityscapes = _params(build_model(f"segformer_{variant}", 19))
    assert round(ade / 1e6, 1) == PUBLISHED_MILLIONS[variant]
    # At 19 classes the count is a little lower (a smaller classifier); B0's 3.72M is 2.1% under the
    # rounded 3.8M, every other variant is within 1%.
    assert cityscapes / 1e6 == pytest.approx(PUBLISHED_MILLIONS[variant], rel=0.022)


def test_structure_follows_mit_b2():
    with torch.device("meta"):
        model = build_model("segformer_b2", 19)
    stages = model.backbone.stages
    assert [len(s.blocks) for s in stages] == [3, 4, 6, 3]
    assert model.head.fuse.in_channels == 4 * 768 and model.head.classifier.in_channels == 768
    for i, (stage, dim, heads, sr) in enumerate(zip(stages, (64, 128, 320, 512), (1, 2, 5, 8), (8, 4, 2, 1))):
        proj = stage.patch_embed.proj
        assert (proj.kernel_size, proj.stride, proj.padding) == (((7, 7), (4, 4), (3, 3)) if i == 0
                                                                 else ((3, 3), (2, 2), (1, 1)))
        assert proj.out_channels == dim and stage.norm.eps == 1e-6
        for block in stage.blocks:
            assert block.norm1.eps == block.norm2.eps == 1e-6
            assert block.attn.heads == heads and block.attn.kv.out_features == 2 * dim
            assert block.attn.q.bias is not None  # qkv_bias
            if sr > 1:
                assert block.attn.sr.kernel_size == (sr, sr) and block.attn.sr.stride == (sr, sr)
            else:
                assert not hasattr(block.attn, "sr")
            assert block.mlp.fc1.out_features == 4 * dim and block.mlp.dwconv.groups == 4 * dim
    rates = [b.drop_path.p for s in stages for b in s.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)
    assert model.head.dropout.p == 0.1 and isinstance(model.head.fuse_bn, nn.BatchNorm2d)
    assert MIT_CONFIGS["b0"].decoder_dim == 256 and MIT_CONFIGS["b5"].depths == (3, 6, 40, 3)


def test_efficient_attention_equals_explicit_computation():
    torch.manual_seed(0)
    dim, heads, sr, h, w = 16, 2, 2, 5, 7
    attn = EfficientSelfAttention(dim, heads, sr).eval()
    x = torch.randn(2, h * w, dim)
    # Written out: K/V from the sr-strided conv (floor: 5x7 -> 2x3), LayerNorm, per-head softmax(QK^T/sqrt(d))V.
    grid = x.transpose(1, 2).reshape(2, dim, h, w)
    reduced = attn.sr_norm(attn.sr(grid).flatten(2).transpose(1, 2))
    k, v = attn.kv(reduced).split(dim, dim=-1)
    q = attn.q(x)
    d = dim // heads
    outs = []
    for i in range(heads):
        qi, ki, vi = (t[..., i * d:(i + 1) * d] for t in (q, k, v))
        outs.append(torch.softmax(qi @ ki.transpose(1, 2) / math.sqrt(d), dim=-1) @ vi)
    expected = attn.proj(torch.cat(outs, dim=-1))
    torch.testing.assert_close(attn(x, h, w), expected, rtol=1e-5, atol=1e-5)


def test_drop_path_train_only():
    drop = DropPath(0.5)
    x = torch.ones(64, 3, 4)
    assert torch.equal(drop.eval()(x), x)
    y = drop.train()(x)
    kept = y[:, 0, 0] != 0
    assert 0 < kept.sum() < 64 and torch.allclose(y[kept], torch.full_like(y[kept], 2.0))


def test_gradients_reach_both_param_groups(b0):
    b0.train()
    b0.zero_grad(set_to_none=True)
    b0(torch.rand(1, 3, H, W)).logits.logsumexp(1).mean().backward()
    groups = {g["name"]: g["params"] for g in b0.param_groups(lr=6e-5, head_lr_mult=10.0)}
    assert {id(p) for p in groups["head"]} == {id(p) for p in b0.head.parameters()}
    assert len(groups["backbone"]) == len(list(b0.backbone.parameters()))
    for name, params in groups.items():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name


def test_channels_last_and_autocast(b0):
    b0.eval()
    x = torch.rand(1, 3, 33, 49)
    with torch.no_grad():
        expected = b0(x).logits
        b0.to(memory_format=torch.channels_last)
        torch.testing.assert_close(b0(x.contiguous(memory_format=torch.channels_last)).logits, expected,
                                   rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = b0(x).logits
    assert out.dtype == torch.bfloat16 and (out.float() - expected).abs().max() < 0.1 * expected.abs().max()


def test_registry_and_options():
    assert {f"segformer_b{i}" for i in range(6)} <= set(MODELS)
    with torch.device("meta"):
        model = build_model("segformer_b1", 7, drop_path=0.0, input_norm="caffe")
    assert all(b.drop_path.p == 0.0 for s in model.backbone.stages for b in s.blocks)
    assert model.input_norm.bgr and model.head.classifier.out_channels == 7
