"""DINOv2 / EVA-02 encoder weights from the files users have, mapped explicitly onto timm's names.

Our encoder tensors are ``backbone.vit.<timm name>``. Layouts (``vit_layout`` tells them apart):

``dinov2`` — facebookresearch/dinov2 ``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth``
  (``dinov2/models/vision_transformer.py``): ``cls_token``, ``pos_embed`` (1, 1 + 37*37, D),
  ``mask_token`` (skipped: masked pretraining only), ``register_tokens`` (1, 4, D),
  ``patch_embed.proj.*``, ``blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, ls2.gamma}``,
  ``blocks.N.mlp.fc1/fc2`` (ViT-S/B/L) or ``blocks.N.mlp.w12/w3`` (ViT-g's fused SwiGLU; the same
  packed [gate; value] rows as timm's ``SwiGLUPacked`` ``fc1``), ``norm.*`` (skipped, see below).
  With registers, DINOv2 adds ``pos_embed[:, 0]`` to the class token and inserts the registers after
  it without position; timm's ``_reg4_`` models have no class entry in ``pos_embed``
  (``no_embed_class``), so the class token is stored as ``cls_token + pos_embed[:, 0]`` (exact).
``hf`` — HF ``facebook/dinov2-{small,base,large,giant}`` and ``facebook/dinov2-with-registers-*``
  (``model.safetensors`` / ``pytorch_model.bin``; ``dinov2.`` prefix of task models removed,
  ``classifier.*`` skipped): ``embeddings.{cls_token, mask_token, position_embeddings,
  register_tokens}``, ``embeddings.patch_embeddings.projection.*``,
  ``encoder.layer.N.attention.attention.{query,key,value}.*`` (joined into ``attn.qkv`` in q, k, v
  row order), ``attention.output.dense``, ``layer_scale{1,2}.lambda1``, ``mlp.fc1/fc2`` or
  ``mlp.weights_in/weights_out`` (SwiGLU), ``layernorm.*`` (skipped).
``timm`` — timm's own names (``timm/vit_*_dinov2.lvd142m``, ``timm/eva02_*_patch14_224.mim_*``
  ``model.safetensors``); ``norm.*``, ``fc_norm.*`` and ``head.*`` skipped. EVA-02 weights are
  read in this layout only (the original baaivision/EVA names are not mapped).

The final ``norm`` of every layout is skipped on purpose: it normalizes the class token for
DINOv2's pretraining heads; our decoder has its own LayerNorm per level (``models/vit.py``).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from da_seg.models.weights import LoadReport, load_mapped

PREFIX = "backbone.vit."
_FINAL_NORMS = re.compile(r"^(norm|fc_norm|head|layernorm|classifier)\.")


def vit_layout(state: dict[str, Tensor]) -> str:
    """``hf`` (``embeddings.*``), ``dinov2`` (official: has ``mask_token``) or ``timm``."""
    keys = [k.removeprefix("dinov2.") for k in state]
    if any(k.startswith("embeddings.") for k in keys):
        return "hf"
    if "mask_token" in state:
        return "dinov2"
    return "timm"


_HF_BLOCK = {
    "norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.weights_in": "mlp.fc1", "mlp.weights_out": "mlp.fc2",
}
_HF_EMBEDDINGS = {
    "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
}


def _hf_to_dinov2(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """HF names -> the official DINOv2 names (q/k/v joined). Returns (renamed, skipped, unexpected)."""
    renamed, skipped, unexpected, qkv = {}, [], [], {}
    for key, tensor in state.items():
        name = key.removeprefix("dinov2.")
        if name == "embeddings.mask_token" or _FINAL_NORMS.match(name):
            skipped.append(key)
        elif name in _HF_EMBEDDINGS:
            renamed[_HF_EMBEDDINGS[name]] = tensor
        elif m := re.fullmatch(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)", name):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = tensor
        elif m := re.fullmatch(r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", name):
            renamed[f"blocks.{m[1]}.ls{m[2]}.gamma"] = tensor
        elif (m := re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", name)) and m[2] in _HF_BLOCK:
            renamed[f"blocks.{m[1]}.{_HF_BLOCK[m[2]]}.{m[3]}"] = tensor
        else:
            unexpected.append(key)
    for (block, param), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            unexpected.extend(f"encoder.layer.{block}.attention.attention.{p}.{param}" for p in parts)
            continue
        renamed[f"blocks.{block}.attn.qkv.{param}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return renamed, skipped, unexpected


def _dinov2_to_timm(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Official DINOv2 names -> timm names. Returns (mapped, skipped, unexpected)."""
    mapped, skipped, unexpected = {}, [], []
    registers = "register_tokens" in state
    for key, tensor in state.items():
        if key == "mask_token" or _FINAL_NORMS.match(key):
            skipped.append(key)
        elif key == "register_tokens":
            mapped["reg_token"] = tensor
        elif key == "cls_token":
            mapped["cls_token"] = tensor + state["pos_embed"][:, :1] if registers and "pos_embed" in state else tensor
        elif key == "pos_embed":
            mapped["pos_embed"] = tensor[:, 1:] if registers else tensor
        elif m := re.fullmatch(r"blocks\.(\d+)\.mlp\.(w12|w3)\.(weight|bias)", key):
            mapped[f"blocks.{m[1]}.mlp.{'fc1' if m[2] == 'w12' else 'fc2'}.{m[3]}"] = tensor
        elif key.startswith(("patch_embed.", "blocks.")):
            mapped[key] = tensor
        else:
            unexpected.append(key)
    return mapped, skipped, unexpected


def map_vit_state(state: dict[str, Tensor], layout: str) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """File names -> our names (``backbone.vit.<timm name>``). Returns (mapped, skipped, unexpected)."""
    if layout == "hf":
        official, skipped, unexpected = _hf_to_dinov2(state)
        timm_state, more_skipped, more_unexpected = _dinov2_to_timm(official)
        skipped, unexpected = skipped + more_skipped, unexpected + more_unexpected
    elif layout == "dinov2":
        timm_state, skipped, unexpected = _dinov2_to_timm(state)
    else:
        timm_state, skipped, unexpected = {}, [], []
        for key, tensor in state.items():
            if _FINAL_NORMS.match(key):
                skipped.append(key)
            else:
                timm_state[key] = tensor
    return {PREFIX + k: v for k, v in timm_state.items()}, skipped, unexpected


def _file_name(layout: str):
    def name(ours: str) -> str:
        timm_name = ours.removeprefix(PREFIX)
        if layout == "timm":
            return timm_name
        if layout == "dinov2":
            return {"reg_token": "register_tokens"}.get(timm_name, timm_name)
        if m := re.fullmatch(r"blocks\.(\d+)\.(.+)", timm_name):
            inverse = {"attn.qkv.weight": "attention.attention.{query,key,value}.weight",
                       "attn.qkv.bias": "attention.attention.{query,key,value}.bias",
                       "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"}
            rest = inverse.get(m[2], m[2].replace("attn.proj", "attention.output.dense"))
            return f"encoder.layer.{m[1]}.{rest}"
        hf = {v: k for k, v in _HF_EMBEDDINGS.items()}
        return hf.get({"reg_token": "register_tokens"}.get(timm_name, timm_name), timm_name)
    return name


def load_vit_weights(model: nn.Module, state: dict[str, Tensor], path: str | Path) -> LoadReport:
    """Load a ``dinov2`` / ``hf`` / ``timm`` file into a ``ViTSegmenter``'s encoder (all of it required).

    The registers, the depth and the width must match the model: a ``_reg4`` file into a model
    without registers fails on ``pos_embed``'s shape and names ``register_tokens`` as unexpected;
    a deeper file's extra blocks are reported as unexpected (a ``depth``-reduced model).
    """
    layout = vit_layout(state)
    mapped, skipped, unexpected = map_vit_state(state, layout)
    return load_mapped(model, mapped, path=path, layout=layout, skipped=skipped, unexpected=unexpected,
                       file_name=_file_name(layout), encoder_prefix=PREFIX)
