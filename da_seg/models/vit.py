"""Vision foundation-model backbones: DINOv2 and EVA-02 ViTs (timm) + a light multi-level decoder.

Encoder: ``timm``'s own definitions (``vit_{small,base,large,giant}_patch14_dinov2``, their
``_reg4_`` variants with 4 register tokens, ``eva02_{base,large}_patch14_224``), built with
``pretrained=False`` (nothing is downloaded; weights come from files, ``models/vit_weights.py``)
and ``dynamic_img_size=True``. DINOv2's position embeddings are resampled to the token grid as the
official ``interpolate_pos_encoding`` does (``resample_dinov2_pos``; timm's own resampling
antialiases and uses the exact size, which changed features by ~10% at a 19 x 19 grid); EVA-02's
(timm ``_pos_embed``) are resampled by timm and its rotary embeddings recomputed for the grid.

Any input size: images are padded (bottom / right, zeros after normalization = the mean colour)
to a multiple of 14; the logits are then resampled at exact stride-4 positions of the *unpadded*
image, so ``logits`` is (N, C, ceil(H/4), ceil(W/4)) for every H, W and sliding windows need not
be multiples of 14.

Decoder (ours, light): the token maps after four blocks (``out_blocks``, default the quarter
points of the depth, e.g. 2/5/8/11 for ViT-B) -> per level LayerNorm + Linear to ``decoder_dim``
-> concat -> 1x1 conv + LayerNorm2d + GELU -> two 2x transposed convs (LayerNorm2d, GELU; as in
VFM-UDA's ``vit_lightweight_head.py``) -> 3x3 conv -> classifier, at stride 14 / 4 = 3.5.

Backbone modes: ``"finetune"`` (optionally ``layer_decay`` < 1, layer-wise LR decay: block i at
lr * decay^(depth - 1 - i), the embeddings at lr * decay^depth, see ``param_groups``),
``"frozen"`` (no gradient, run without autograd), or ``rein = {tokens, rank, layers}``
(``models/rein.py``; the backbone frozen, Rein trains with the head). ``checkpointing = true``
recomputes each block's activations in the backward pass (ViT-L/g at large crops).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from da_seg.models.rein import Rein, parse_rein
from da_seg.models.segmenter import InputNorm, Segmenter, SegmenterOutput

log = logging.getLogger(__name__)

PATCH = 14
SIZE_LETTERS = {"s": "S", "b": "B", "l": "L", "g": "g"}   # DINOv2 writes the giant "ViT-g"
BACKBONE_MODES = ("finetune", "frozen")


@dataclass(frozen=True)
class ViTSpec:
    """One registry entry: timm's architecture and what the model card publishes."""

    timm_name: str
    family: str           # "dinov2" | "eva02": which weight layouts apply (models/vit_weights.py)
    published: str        # parameter count as published (DINOv2 README / EVA-02 paper)
    input_norm: str
    files: str            # the weight files users have


_DINOV2_URL = "dl.fbaipublicfiles.com/dinov2/"
VIT_SPECS: dict[str, ViTSpec] = {}
for _size, _timm, _pub, _hf in (("s", "small", "21M", "small"), ("b", "base", "86M", "base"),
                                ("l", "large", "300M", "large"), ("g", "giant", "1.1B", "giant")):
    VIT_SPECS[f"dinov2_vit{_size}14"] = ViTSpec(
        f"vit_{_timm}_patch14_dinov2", "dinov2", _pub, "imagenet",
        f"dinov2_vit{_size}14_pretrain.pth ({_DINOV2_URL}) or HF facebook/dinov2-{_hf}")
    VIT_SPECS[f"dinov2_vit{_size}14_reg"] = ViTSpec(
        f"vit_{_timm}_patch14_reg4_dinov2", "dinov2", _pub, "imagenet",
        f"dinov2_vit{_size}14_reg4_pretrain.pth ({_DINOV2_URL}) or HF facebook/dinov2-with-registers-{_hf}")
VIT_SPECS["eva02_vitb"] = ViTSpec("eva02_base_patch14_224", "eva02", "86M", "clip",
                                  "timm eva02_base_patch14_224.mim_in22k (model.safetensors)")
VIT_SPECS["eva02_vitl"] = ViTSpec("eva02_large_patch14_224", "eva02", "304M", "clip",
                                  "timm eva02_large_patch14_224.mim_in22k / mim_m38m (model.safetensors)")


def default_out_blocks(depth: int) -> tuple[int, ...]:
    """The quarter points of the depth: 12 -> (2, 5, 8, 11), 24 -> (5, 11, 17, 23), 40 -> (9, 19, 29, 39)."""
    return tuple(max(depth * (i + 1) // 4 - 1, 0) for i in range(4))


def build_timm_vit(timm_name: str, depth: int | None = None, drop_path: float = 0.0) -> nn.Module:
    """timm's ViT / EVA without classifier or final norms (our decoder normalizes each level).

    ``depth`` < the architecture's keeps its first blocks (tests: the real code path, fewer blocks).
    """
    import timm

    kwargs = {"pretrained": False, "num_classes": 0, "dynamic_img_size": True, "drop_path_rate": drop_path}
    if depth is not None:
        kwargs["depth"] = depth
    vit = timm.create_model(timm_name, **kwargs)
    # The pretrained final norm / fc_norm serve the class token or pooled features; the decoder
    # has a LayerNorm per level, so these would only be parameters without gradients.
    for name in ("norm", "fc_norm", "head_drop", "head"):
        if isinstance(getattr(vit, name, None), nn.Module):
            setattr(vit, name, nn.Identity())
    return vit


def resample_dinov2_pos(pos: Tensor, h: int, w: int) -> Tensor:
    """(1, G*G, D) patch position embeddings -> (1, h*w, D), DINOv2's way (unchanged at G x G)."""
    grid = math.isqrt(pos.shape[1])
    if (h, w) == (grid, grid):
        return pos
    dim = pos.shape[-1]
    square = pos.float().reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(square, scale_factor=((h + 0.1) / grid, (w + 0.1) / grid), mode="bicubic",
                            antialias=False)
    return resized.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos.dtype)


class ViTEncoder(nn.Module):
    """Runs a timm ViT block by block. (N, 3, H, W), H and W multiples of 14 ->
    {"block<i>": (N, D, H/14, W/14) for i in ``out_blocks``}; ``rein`` refines the patch tokens
    after each of its blocks (prefix tokens untouched, as the official code keeps the class token).
    """

    def __init__(self, vit: nn.Module, out_blocks: tuple[int, ...], checkpointing: bool = False):
        super().__init__()
        self.vit = vit
        self.depth = len(vit.blocks)
        self.dim = vit.embed_dim
        self.prefix = vit.num_prefix_tokens  # class token + registers
        self.out_blocks = tuple(out_blocks)
        self.checkpointing = checkpointing
        self.uses_rope = getattr(vit, "rope", None) is not None or hasattr(vit, "rope_mixed")

    def embed(self, x: Tensor) -> tuple[Tensor, dict]:
        """(N, 3, H, W) -> tokens (N, prefix + h*w, D) and the blocks' extra arguments (EVA's rope)."""
        x = self.vit.patch_embed(x)                       # (N, h, w, D) with dynamic_img_size
        extra = {}
        if self.uses_rope:  # timm's Eva: patch dropout (off here) happens inside _pos_embed
            x, rope = self.vit._pos_embed(x)
            extra["rope"] = rope
        else:
            x = self.vit.patch_drop(self.vit.pos_drop(self._dinov2_pos_embed(x)))
        return self.vit.norm_pre(x), extra

    def _dinov2_pos_embed(self, x: Tensor) -> Tensor:
        """(N, h, w, D) patches -> (N, prefix + h*w, D) with position embeddings resampled as
        DINOv2 does (``interpolate_pos_encoding``: bicubic, scale factor (h + 0.1) / 37, no
        antialiasing; the hub models' interpolate_offset 0.1, interpolate_antialias False), so the
        features equal the official model's at every grid, not only at 37 x 37."""
        vit = self.vit
        n, h, w, dim = x.shape
        x = x.reshape(n, h * w, dim)
        class_pos = 0 if vit.no_embed_class else 1            # timm's _reg4 layout: no class entry
        patch_pos = resample_dinov2_pos(vit.pos_embed[:, class_pos:], h, w)
        prefix = [vit.cls_token.expand(n, -1, -1)]
        if vit.reg_token is not None:
            prefix.append(vit.reg_token.expand(n, -1, -1))
        if class_pos:
            prefix[0] = prefix[0] + vit.pos_embed[:, :1]
        return torch.cat(prefix + [x + patch_pos], dim=1)

    def forward(self, x: Tensor, rein: Rein | None = None) -> dict[str, Tensor]:
        n, _, height, width = x.shape
        h, w = height // PATCH, width // PATCH
        tokens, extra = self.embed(x)
        features = {}
        for i, block in enumerate(self.vit.blocks[:max(self.out_blocks) + 1]):
            if self.checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, use_reentrant=False, **extra)
            else:
                tokens = block(tokens, **extra)
            if rein is not None:
                tokens = torch.cat([tokens[:, :self.prefix], rein(tokens[:, self.prefix:], i)], dim=1)
            if i in self.out_blocks:
                patches = tokens[:, self.prefix:]                                    # (N, h*w, D)
                features[f"block{i}"] = patches.transpose(1, 2).reshape(n, self.dim, h, w)
        return features


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of (N, C, h, w)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MultiLevelHead(nn.Module):
    """levels: ``len(in_dims)`` maps (N, D, h, w) -> (logits (N, C, 4h, 4w), fused (N, dim, h, w))."""

    def __init__(self, in_dims: tuple[int, ...], num_classes: int, dim: int = 256, dropout: float = 0.1):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d) for d in in_dims)
        self.projections = nn.ModuleList(nn.Linear(d, dim) for d in in_dims)
        self.fuse = nn.Sequential(nn.Conv2d(dim * len(in_dims), dim, 1, bias=False), LayerNorm2d(dim), nn.GELU())
        half = dim // 2
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(dim, half, 2, stride=2, bias=False), LayerNorm2d(half), nn.GELU(),
            nn.ConvTranspose2d(half, half, 2, stride=2, bias=False), LayerNorm2d(half), nn.GELU(),
            nn.Conv2d(half, half, 3, padding=1, bias=False), LayerNorm2d(half), nn.GELU())
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(half, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, levels: list[Tensor]) -> tuple[Tensor, Tensor]:
        projected = [proj(norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)       # (N, dim, h, w) each
                     for x, norm, proj in zip(levels, self.norms, self.projections)]
        fused = self.fuse(torch.cat(projected, dim=1))
        return self.classifier(self.dropout(self.upsample(fused))), fused


def resample_to_stride4(logits: Tensor, height: int, width: int) -> Tensor:
    """Logits of a padded image at stride 3.5, (N, C, 4h, 4w) -> (N, C, ceil(H/4), ceil(W/4)) at the
    image positions 4 i + 2 (the centres of stride-4 cells of the unpadded H x W image), bilinear."""
    n, _, rows, cols = logits.shape
    stride_in = PATCH / 4

    def axis(out: int, size: int) -> Tensor:
        centres = (torch.arange(out, device=logits.device, dtype=torch.float32) + 0.5) * 4.0
        return centres / (size * stride_in) * 2.0 - 1.0        # grid_sample coordinates, align_corners=False

    ys, xs = axis(math.ceil(height / 4), rows), axis(math.ceil(width / 4), cols)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1)     # (h', w', 2) as (x, y)
    grid = grid.unsqueeze(0).expand(n, -1, -1, -1).to(logits.dtype)
    return F.grid_sample(logits, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ViTSegmenter(Segmenter):
    """A DINOv2 / EVA-02 ViT + ``MultiLevelHead``; ``logits`` (N, C, ceil(H/4), ceil(W/4)).

    ``features``: ``block<i>`` (the token maps the head reads, (N, D, ceil(H/14), ceil(W/14)), of the
    padded image), ``backbone`` (= the last of them) and ``decoder`` (fused map, (N, dim, ...)).
    """

    def __init__(self, num_classes: int, spec: ViTSpec, *, depth: int | None = None,
                 out_blocks: tuple[int, ...] | None = None, decoder_dim: int = 256,
                 backbone: str = "finetune", layer_decay: float = 1.0, rein: dict | None = None,
                 checkpointing: bool = False, drop_path: float = 0.0, input_norm: str | None = None):
        super().__init__()
        if backbone not in BACKBONE_MODES:
            raise ValueError(f"model.options.backbone must be one of {list(BACKBONE_MODES)}, got {backbone!r}")
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"model.options.layer_decay must be in (0, 1], got {layer_decay}")
        vit = build_timm_vit(spec.timm_name, depth, drop_path)
        total = len(vit.blocks)
        out_blocks = tuple(out_blocks) if out_blocks is not None else default_out_blocks(total)
        if len(out_blocks) != 4 or not all(isinstance(i, int) and 0 <= i < total for i in out_blocks):
            raise ValueError(f"model.options.out_blocks must be 4 block indices in [0, {total}), got {list(out_blocks)}")
        self.spec = spec
        self.num_classes = num_classes
        self.output_stride = 4
        self.input_norm = InputNorm.named(input_norm or spec.input_norm)
        self.backbone = ViTEncoder(vit, out_blocks, checkpointing)
        parsed = parse_rein(rein, total)
        self.rein = Rein(vit.embed_dim, parsed[2], parsed[0], parsed[1]) if parsed else None
        self.frozen = backbone == "frozen" or self.rein is not None
        self.layer_decay = layer_decay
        if self.frozen:
            if layer_decay != 1.0:
                raise ValueError("model.options.layer_decay applies to a fine-tuned backbone; it is frozen here "
                                 f"(backbone = {backbone!r}{', rein' if self.rein is not None else ''})")
            self.backbone.requires_grad_(False)
        self.head = MultiLevelHead((vit.embed_dim,) * 4, num_classes, decoder_dim)

    def train(self, mode: bool = True) -> "ViTSegmenter":
        super().train(mode)
        if self.frozen:  # a frozen encoder never runs stochastic depth / dropout (Rein's train())
            self.backbone.eval()
        return self

    def forward_normalized(self, x: Tensor) -> SegmenterOutput:
        height, width = x.shape[-2:]
        padded = F.pad(x, (0, -width % PATCH, 0, -height % PATCH))
        if self.frozen and self.rein is None:  # nothing before the head needs a gradient
            with torch.no_grad():
                features = self.backbone(padded)
        else:
            features = self.backbone(padded, self.rein)
        levels = [features[f"block{i}"] for i in self.backbone.out_blocks]
        logits, fused = self.head(levels)
        logits = resample_to_stride4(logits, height, width)
        return SegmenterOutput(logits=logits, features={**features, "backbone": levels[-1], "decoder": fused})

    def trainable_summary(self) -> str:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        parts = [f"{trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)"]
        if self.rein is not None:
            rein = sum(p.numel() for p in self.rein.parameters())
            encoder = sum(p.numel() for p in self.backbone.parameters())
            parts.append(f"Rein {rein:,} = {100 * rein / encoder:.2f}% of the frozen encoder's {encoder:,}")
        return "; ".join(parts)

    def _layer_id(self, name: str) -> int:
        """0 = embeddings (patch / position / class / register tokens), i + 1 = block i."""
        parts = name.split(".")
        if "blocks" in parts:
            return int(parts[parts.index("blocks") + 1]) + 1
        return 0

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        """Head (and Rein) at ``lr * head_lr_mult``; the encoder at ``lr``, or with ``layer_decay``
        (BEiT / mmseg LayerDecayOptimizerConstructor): block i at lr * decay^(depth - 1 - i), the
        embeddings at lr * decay^depth. Rein's tokens and scale have no weight decay (Rein's config:
        ``learnable_tokens`` / ``reins.scale`` decay_mult 0)."""
        head_lr = lr * head_lr_mult
        rein_ids = {id(p) for p in self.rein.parameters()} if self.rein is not None else set()
        no_decay = [p for n, p in self.rein.named_parameters() if n.startswith("tokens") or n == "scale"] \
            if self.rein is not None else []
        no_decay_ids = {id(p) for p in no_decay}
        head = [p for p in self.head_parameters() if id(p) not in no_decay_ids]
        groups = [{"name": "head", "params": head, "lr": head_lr, "initial_lr": head_lr}]
        if no_decay:
            groups.append({"name": "rein_tokens", "params": no_decay, "lr": head_lr, "initial_lr": head_lr,
                           "weight_decay": 0.0})
        encoder = [(n, p) for n, p in self.backbone.named_parameters() if p.requires_grad and id(p) not in rein_ids]
        if self.layer_decay == 1.0:
            groups.append({"name": "backbone", "params": [p for _, p in encoder], "lr": lr, "initial_lr": lr})
        else:
            depth = self.backbone.depth
            by_layer: dict[int, list] = {}
            for name, p in encoder:
                by_layer.setdefault(self._layer_id(name), []).append(p)
            for layer in sorted(by_layer):
                layer_lr = lr * self.layer_decay ** (depth - layer)
                groups.append({"name": f"backbone.layer{layer}", "params": by_layer[layer], "lr": layer_lr,
                               "initial_lr": layer_lr})
        return [g for g in groups if g["params"]]


def build_vit(num_classes: int, name: str, *, pretrained: str = "", **options) -> ViTSegmenter:
    from da_seg.models.vit_weights import load_vit_weights
    from da_seg.models.weights import read_state_dict

    model = ViTSegmenter(num_classes, VIT_SPECS[name], **options)
    if pretrained:
        path = Path(pretrained).expanduser()
        load_vit_weights(model, read_state_dict(path), path)
    if model.frozen and not next(model.parameters()).is_meta:
        log.info("%s: %s", name, model.trainable_summary())
    return model


def _builder(name: str):
    spec = VIT_SPECS[name]

    def builder(num_classes: int, pretrained: str = "", depth: int | None = None,
                out_blocks: list[int] | None = None, decoder_dim: int = 256, backbone: str = "finetune",
                layer_decay: float = 1.0, rein: dict | None = None, checkpointing: bool = False,
                drop_path: float = 0.0, input_norm: str | None = None) -> ViTSegmenter:
        return build_vit(num_classes, name, pretrained=pretrained, depth=depth,
                         out_blocks=tuple(out_blocks) if out_blocks is not None else None,
                         decoder_dim=decoder_dim, backbone=backbone, layer_decay=layer_decay, rein=rein,
                         checkpointing=checkpointing, drop_path=drop_path, input_norm=input_norm)

    kind = "DINOv2" if spec.family == "dinov2" else "EVA-02"
    registers = " with 4 registers" if name.endswith("_reg") else ""
    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (f"{kind} ViT-{SIZE_LETTERS[name.split('_')[1][3]]}/14"
                       f"{registers} (timm {spec.timm_name}, {spec.published} published) + light multi-level "
                       f"decoder, logits at 1/4.")
    return builder


VIT_BUILDERS = {name: _builder(name) for name in VIT_SPECS}
