"""SegFormer: Mix Transformer (MiT-B0..B5) encoder + all-MLP decoder (Xie et al., NeurIPS 2021).

Encoder stage i (i = 1..4): overlapping patch embedding (conv k7 s4 p3 for stage 1, k3 s2 p1
after; + LayerNorm) -> blocks of [LN -> efficient self-attention (K/V from a k=s=sr conv + LN) ->
residual, LN -> Mix-FFN (fc1 -> depthwise 3x3 -> GELU -> fc2) -> residual] -> LN. Strides
4, 8, 16, 32. Stochastic depth grows linearly from 0 to ``drop_path`` over all blocks.

Decoder: per-stage Linear to ``embed_dim`` -> upsample to 1/4 -> concat (stage 4 first, as the
released weights expect) -> 1x1 conv + BN + ReLU -> dropout 0.1 -> 1x1 conv to classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from da_seg.models.segmenter import InputNorm, Segmenter, SegmenterOutput
from da_seg.models.weights import load_mit_weights, read_state_dict

STAGE_NAMES = ("stage1", "stage2", "stage3", "stage4")


@dataclass(frozen=True)
class MiTConfig:
    dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    decoder_dim: int
    heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4


_WIDE = (64, 128, 320, 512)
MIT_CONFIGS = {
    "b0": MiTConfig((32, 64, 160, 256), (2, 2, 2, 2), 256),
    "b1": MiTConfig(_WIDE, (2, 2, 2, 2), 256),
    "b2": MiTConfig(_WIDE, (3, 4, 6, 3), 768),
    "b3": MiTConfig(_WIDE, (3, 4, 18, 3), 768),
    "b4": MiTConfig(_WIDE, (3, 8, 27, 3), 768),
    "b5": MiTConfig(_WIDE, (3, 6, 40, 3), 768),
}
BLOCK_LN_EPS = 1e-6  # block and stage norms; the patch-embedding and K/V norms keep PyTorch's 1e-5


def tokens_to_map(x: Tensor, h: int, w: int) -> Tensor:
    """(N, h*w, C) -> (N, C, h, w) as a channels_last view (no copy)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


def map_to_tokens(x: Tensor) -> Tensor:
    """(N, C, h, w) -> (N, h*w, C)."""
    return x.flatten(2).transpose(1, 2)


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``p`` (train only)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class OverlapPatchEmbed(nn.Module):
    """(N, C_in, H, W) -> tokens (N, h*w, dim), h = ceil(H / stride)."""

    def __init__(self, in_ch: int, dim: int, kernel: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, kernel, stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(map_to_tokens(x)), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys/values come from a map shrunk ``sr`` times per side.

    x (N, h*w, C) -> (N, h*w, C); K/V length h*w / sr^2 (ceil-free: conv k = s = sr).
    """

    def __init__(self, dim: int, heads: int, sr: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)  # rows [0, dim) keys, [dim, 2 dim) values (NVlabs layout)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr
        if sr > 1:
            self.sr = nn.Conv2d(dim, dim, sr, sr)
            self.sr_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        n, length, dim = x.shape
        q = self.q(x).reshape(n, length, self.heads, dim // self.heads).transpose(1, 2)  # (N, heads, L, d)
        if self.sr_ratio > 1:
            reduced = self.sr(tokens_to_map(x, h, w))  # (N, C, h/sr, w/sr)
            x = self.sr_norm(map_to_tokens(reduced))
        k, v = self.kv(x).reshape(n, -1, 2, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)  # (N, heads, L', d)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class MixFFN(nn.Module):
    """fc1 -> depthwise 3x3 conv (the only positional information) -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = self.fc1(x)
        x = map_to_tokens(self.dwconv(tokens_to_map(x, h, w)))
        return self.fc2(self.act(x))


class MiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, sr: int, mlp_ratio: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_LN_EPS)
        self.attn = EfficientSelfAttention(dim, heads, sr)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_LN_EPS)
        self.mlp = MixFFN(dim, dim * mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MiTStage(nn.Module):
    def __init__(self, in_ch: int, dim: int, depth: int, heads: int, sr: int, mlp_ratio: int,
                 first: bool, drop_paths: list[float]):
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(in_ch, dim, kernel=7 if first else 3, stride=4 if first else 2)
        self.blocks = nn.ModuleList(MiTBlock(dim, heads, sr, mlp_ratio, p) for p in drop_paths)
        self.norm = nn.LayerNorm(dim, eps=BLOCK_LN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        x, h, w = self.patch_embed(x)
        for block in self.blocks:
            x = block(x, h, w)
        return tokens_to_map(self.norm(x), h, w)  # (N, dim, h, w)


class MixTransformer(nn.Module):
    """(N, 3, H, W) -> {"stage1": (N, d1, H/4, W/4), ..., "stage4": (N, d4, H/32, W/32)} (rounded up)."""

    def __init__(self, config: MiTConfig, drop_path: float = 0.1):
        super().__init__()
        self.config = config
        total = sum(config.depths)
        # Linear stochastic-depth schedule over all blocks, computed in Python so meta-device builds work.
        rates = [drop_path * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        self.stages = nn.ModuleList()
        in_ch, start = 3, 0
        for i, (dim, depth) in enumerate(zip(config.dims, config.depths)):
            self.stages.append(MiTStage(in_ch, dim, depth, config.heads[i], config.sr_ratios[i], config.mlp_ratio,
                                        first=i == 0, drop_paths=rates[start:start + depth]))
            in_ch, start = dim, start + depth
        self.apply(_init_mit)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = {}
        for name, stage in zip(STAGE_NAMES, self.stages):
            x = stage(x)
            features[name] = x
        return features


def _init_mit(m: nn.Module) -> None:
    """NVlabs' initialization: truncated normal 0.02 for Linear, fan-out normal for convs."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
        nn.init.zeros_(m.bias)


class SegFormerHead(nn.Module):
    """All-MLP decoder. Stage maps (N, d_i, H/2^(i+1), W/2^(i+1)) -> (N, num_classes, H/4, W/4).

    ``forward`` returns (logits, fused) where fused (N, embed_dim, H/4, W/4) is the map the
    classifier reads.
    """

    def __init__(self, in_dims: tuple[int, ...], embed_dim: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.linear_c = nn.ModuleList(nn.Linear(d, embed_dim) for d in in_dims)
        self.fuse = nn.Conv2d(embed_dim * len(in_dims), embed_dim, 1, bias=False)
        self.fuse_bn = nn.BatchNorm2d(embed_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, stages: list[Tensor]) -> tuple[Tensor, Tensor]:
        size = stages[0].shape[-2:]
        projected = []
        for x, linear in zip(stages, self.linear_c):
            x = linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # per-pixel Linear: (N, embed, h_i, w_i)
            projected.append(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        fused = F.relu(self.fuse_bn(self.fuse(torch.cat(projected[::-1], dim=1))), inplace=True)
        return self.classifier(self.dropout(fused)), fused


class SegFormer(Segmenter):
    """MiT encoder + all-MLP decoder; ``logits`` (N, C, ceil(H/4), ceil(W/4)).

    ``features``: ``stage1``..``stage4``, ``backbone`` (= stage4) and ``decoder`` (fused map).
    """

    def __init__(self, num_classes: int, variant: str = "b0", *, drop_path: float = 0.1,
                 input_norm: str = "imagenet"):
        super().__init__()
        if variant not in MIT_CONFIGS:
            raise ValueError(f"unknown MiT variant {variant!r}; valid: {sorted(MIT_CONFIGS)}")
        config = MIT_CONFIGS[variant]
        self.num_classes = num_classes
        self.output_stride = 4
        self.input_norm = InputNorm.named(input_norm)
        self.backbone = MixTransformer(config, drop_path)
        self.head = SegFormerHead(config.dims, config.decoder_dim, num_classes)
        self.head.apply(_init_head)

    def forward_normalized(self, x: Tensor) -> SegmenterOutput:
        features = self.backbone(x)
        logits, fused = self.head([features[name] for name in STAGE_NAMES])
        return SegmenterOutput(logits=logits, features={**features, "backbone": features["stage4"], "decoder": fused})


def _init_head(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def build_segformer(num_classes: int, variant: str, *, pretrained: str = "", drop_path: float = 0.1,
                    input_norm: str | None = None) -> SegFormer:
    """All released MiT weights (NVlabs and HF) expect ImageNet normalization."""
    model = SegFormer(num_classes, variant, drop_path=drop_path, input_norm=input_norm or "imagenet")
    if pretrained:
        path = Path(pretrained).expanduser()
        load_mit_weights(model, read_state_dict(path), path)
    return model


def _variant_builder(variant: str):
    """The registry entry ``segformer_<variant>``: ``build_segformer`` with the variant fixed."""

    def builder(num_classes: int, pretrained: str = "", drop_path: float = 0.1,
                input_norm: str | None = None) -> SegFormer:
        return build_segformer(num_classes, variant, pretrained=pretrained, drop_path=drop_path,
                               input_norm=input_norm)

    embed = 256 if variant in ("b0", "b1") else 768
    note = " (DAFormer's encoder)" if variant == "b5" else ""
    builder.__name__ = builder.__qualname__ = f"segformer_{variant}"
    builder.__doc__ = f"SegFormer MiT-{variant.upper()} + all-MLP decoder (embed {embed}), logits at 1/4{note}."
    return builder


SEGFORMER_BUILDERS = {f"segformer_{variant}": _variant_builder(variant) for variant in MIT_CONFIGS}
