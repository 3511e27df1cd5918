"""Pretrained weights from files the user downloaded, mapped explicitly onto our module names.

Nothing is downloaded here. Supported layouts:

ResNet (DeepLabV2 / DeepLabV3+ encoders):
  ``torchvision``     ``conv1.weight``, ``layer1.0.conv1.weight``, ``fc.*`` (skipped) — torchvision's
                      resnet50/101 files; ``pretrained = "torchvision"`` finds them in
                      ``$TORCH_HOME/hub/checkpoints`` under torchvision's own file names.
  ``caffe_deeplab``   ``Scale.conv1.weight``, ``Scale.layer1.0.conv1.weight``, ``Scale.layer5.*``
                      (the old classifier, skipped) — AdaptSegNet's / ADVENT's Caffe-converted
                      DeepLab ResNet-101 (``DeepLab_resnet_pretrained_init-f81d91e8.pth``,
                      ``DeepLab_resnet_pretrained_imagenet.pth``); expects Caffe input normalization.
  ``deeplab_release`` ``conv1.weight`` ... plus ``layer5.conv2d_list.*`` (aux ASPP on layer3) and
                      ``layer6.conv2d_list.*`` (main ASPP) — trained AdaptSegNet/ADVENT models.

Mix Transformer (SegFormer encoders, optionally with the all-MLP decoder):
  ``nvlabs``          ``patch_embed1.proj.weight``, ``block1.0.attn.kv.weight``, ``norm1.weight``,
                      ``head.*`` (ImageNet classifier, skipped) — NVlabs ``mit_bX.pth``; whole
                      mmseg checkpoints add ``backbone.`` and ``decode_head.linear_c1.proj.*`` ...
  ``hf``              ``segformer.encoder.patch_embeddings.0.proj.weight``,
                      ``segformer.encoder.block.0.0.attention.self.{query,key,value}.weight``,
                      ``segformer.encoder.layer_norm.0.weight``, ``classifier.*`` (skipped) —
                      HF ``nvidia/mit-bX`` and ``nvidia/segformer-*`` (``model.safetensors`` or
                      ``pytorch_model.bin``); HF's separate key/value are concatenated into our ``kv``.

Loading reports missing and unexpected keys (logged); anything missing from the encoder raises
``WeightsError`` naming the file and the keys. Head weights load only where present with the
right shape (a classifier for another number of classes is skipped and reported).
"""
from __future__ import annotations

import json
import logging
import re
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

TORCHVISION_RESNET_FILES = {
    50: ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth"),
    101: ("resnet101-63fe2227.pth", "resnet101-cd907fc2.pth"),
}
TORCHVISION_URL = "https://download.pytorch.org/models/"


class WeightsError(ValueError):
    """A weight file that cannot be read or does not fit the model."""


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Parse a ``.safetensors`` file: 8-byte little-endian header length, JSON header, raw buffer.

    Uses the ``safetensors`` package when it is installed; this reader needs nothing but torch.
    """
    path = Path(path)
    try:
        from safetensors.torch import load_file
    except ImportError:
        pass
    else:
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # the package's own SafetensorError: report it as every other bad file
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise WeightsError(f"{path}: reading safetensors without the safetensors package needs a little-endian host")
    data = bytearray(path.stat().st_size)  # read straight into a mutable buffer: one copy of the weights
    with path.open("rb") as f:
        f.readinto(data)
    if len(data) < 8:
        raise WeightsError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if 8 + header_len > len(data):
        raise WeightsError(f"{path}: not a safetensors file (header length {header_len} beyond end of file)")
    try:
        header = json.loads(data[8:8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    start = 8 + header_len
    state = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise WeightsError(f"{path}: tensor {name!r} has dtype {info['dtype']}; "
                               f"supported: {sorted(_SAFETENSORS_DTYPES)}")
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = info["shape"]
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = end - begin
        if count == 0:
            state[name] = torch.empty(shape, dtype=dtype)
            continue
        offset = start + begin
        buffer = data if offset % itemsize == 0 else bytearray(data[offset:end + start])
        offset = offset if buffer is data else 0
        # frombuffer shares (and keeps alive) the bytearray: no second copy of the weights.
        flat = torch.frombuffer(buffer, dtype=dtype, count=count // itemsize, offset=offset)
        state[name] = flat.reshape(shape)
    return state


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a weight file (``.safetensors``, or a ``torch.save`` file read with ``weights_only``).

    A directory is searched for ``model.safetensors`` then ``pytorch_model.bin`` (HF snapshots).
    Wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and DataParallel's ``module.`` are removed.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in ("model.safetensors", "pytorch_model.bin"):
            if (path / candidate).is_file():
                path = path / candidate
                break
        else:
            raise WeightsError(f"{path}: directory has neither model.safetensors nor pytorch_model.bin")
    if not path.is_file():
        raise WeightsError(f"pretrained weights {str(path)!r} not found")
    if path.suffix == ".safetensors":
        state = read_safetensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(f"{path}: cannot be read as a weights-only torch file "
                               f"({type(e).__name__}: {e})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a dict of tensors (a state dict)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def resolve_resnet_weights(pretrained: str, depth: int) -> Path:
    """``"torchvision"`` -> the torchvision file in ``$TORCH_HOME/hub/checkpoints``; else the path itself."""
    if pretrained != "torchvision":
        return Path(pretrained).expanduser()
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    names = TORCHVISION_RESNET_FILES[depth]
    for name in names:
        if (checkpoints / name).is_file():
            return checkpoints / name
    urls = ", ".join(TORCHVISION_URL + n for n in names)
    raise WeightsError(f'pretrained = "torchvision": none of {list(names)} in {checkpoints} '
                       f"(set $TORCH_HOME, or download one of {urls} there, or give the file's path)")


# ---------------------------------------------------------------------------------------------
# Loading mapped tensors into a model
# ---------------------------------------------------------------------------------------------

@dataclass
class LoadReport:
    """What happened to each tensor of a weight file."""

    path: str
    layout: str
    loaded: list[str] = field(default_factory=list)      # our names
    missing: list[str] = field(default_factory=list)     # our names the file did not provide (heads only)
    unexpected: list[str] = field(default_factory=list)  # file names we have no place for
    skipped: list[str] = field(default_factory=list)     # file names deliberately ignored (old classifiers ...)
    mismatched: list[str] = field(default_factory=list)  # head tensors with another shape (e.g. class count)

    def summary(self) -> str:
        def short(names: list[str]) -> str:
            return ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        parts = [f"loaded {len(self.loaded)} tensors from {self.path} ({self.layout} layout)"]
        for label, names in (("not in file (trained from scratch)", self.missing),
                             ("skipped", self.skipped), ("shape differs, kept random", self.mismatched),
                             ("unexpected", self.unexpected)):
            if names:
                parts.append(f"{label}: {short(names)}")
        return "; ".join(parts)


def _is_counter(name: str) -> bool:
    return name.endswith("num_batches_tracked")


def load_mapped(model: nn.Module, mapped: dict[str, Tensor], *, path: str | Path, layout: str,
                skipped: list[str], unexpected: list[str], file_name: Callable[[str], str],
                encoder_prefix: str = "backbone.") -> LoadReport:
    """Copy ``mapped`` (our names -> tensors) into ``model``.

    Raises ``WeightsError`` if an encoder tensor (name under ``encoder_prefix``) is absent or has
    another shape, naming it as the file would (``file_name``: our name -> the layout's name);
    head tensors that are absent or mis-shaped stay as initialized and are reported.
    """
    own = model.state_dict()
    report = LoadReport(str(path), layout, skipped=list(skipped), unexpected=list(unexpected))
    to_load, bad_shape, wrong_shape_names = {}, [], set()
    for name, tensor in mapped.items():
        if name not in own:
            report.unexpected.append(name)
        elif own[name].shape != tensor.shape:
            wrong_shape_names.add(name)
            (bad_shape if name.startswith(encoder_prefix) else report.mismatched).append(
                f"{name} (file {tuple(tensor.shape)}, model {tuple(own[name].shape)})")
        else:
            to_load[name] = tensor
    report.missing = [n for n in own if n not in to_load and n not in wrong_shape_names and not _is_counter(n)]
    missing_encoder = [n for n in report.missing if n.startswith(encoder_prefix)]
    if missing_encoder or bad_shape:
        problems = []
        if missing_encoder:
            problems.append(f"missing encoder keys {[file_name(n) for n in missing_encoder[:8]]}"
                            + (f" and {len(missing_encoder) - 8} more" if len(missing_encoder) > 8 else ""))
        if bad_shape:
            problems.append(f"wrong shapes {bad_shape[:4]}")
        hint = f"; its keys look like {sorted(report.unexpected)[:4]}" if report.unexpected else ""
        raise WeightsError(f"{path} ({layout} layout) does not fit this model: " + "; ".join(problems) + hint)
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    log.info(report.summary())
    return report


# ---------------------------------------------------------------------------------------------
# ResNet layouts
# ---------------------------------------------------------------------------------------------

def resnet_layout(state: dict[str, Tensor]) -> str:
    """``caffe_deeplab`` (``Scale.*``), ``deeplab_release`` (has ``layer6.*``) or ``torchvision``."""
    if any(k.startswith("Scale.") for k in state):
        return "caffe_deeplab"
    if any(k.startswith("layer6.") for k in state):
        return "deeplab_release"
    return "torchvision"


_RESNET_KEY = re.compile(r"^(conv1|bn1|layer[1-4])\.")
_RELEASE_ASPP = re.compile(r"^layer([56])\.conv2d_list\.(\d+)\.(weight|bias)$")


def map_resnet_state(state: dict[str, Tensor], layout: str) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """File names -> our DeepLab names. Returns (mapped, skipped, unexpected).

    Encoder tensors go to ``backbone.<torchvision name>``; a released DeepLabV2's ASPPs go to
    ``classifier.branches.i`` (``layer6``, on layer4) and ``aux_classifier.branches.i`` (``layer5``,
    on layer3).
    """
    mapped, skipped, unexpected = {}, [], []
    for key, tensor in state.items():
        name = key
        if layout == "caffe_deeplab":
            if not key.startswith("Scale."):
                unexpected.append(key)
                continue
            name = key[len("Scale."):]
            if name.startswith("layer5."):  # the Caffe model's own classifier
                skipped.append(key)
                continue
        if _RESNET_KEY.match(name):
            mapped["backbone." + name] = tensor
        elif layout == "torchvision" and name.startswith("fc."):
            skipped.append(key)
        elif layout == "deeplab_release" and (m := _RELEASE_ASPP.match(name)):
            head = "classifier" if m.group(1) == "6" else "aux_classifier"
            mapped[f"{head}.branches.{m.group(2)}.{m.group(3)}"] = tensor
        else:
            unexpected.append(key)
    return mapped, skipped, unexpected


def load_resnet_weights(model: nn.Module, state: dict[str, Tensor], path: str | Path) -> LoadReport:
    """Load any ResNet layout into a DeepLab model whose encoder is ``model.backbone``."""
    layout = resnet_layout(state)
    mapped, skipped, unexpected = map_resnet_state(state, layout)
    prefix = "Scale." if layout == "caffe_deeplab" else ""
    return load_mapped(model, mapped, path=path, layout=layout, skipped=skipped, unexpected=unexpected,
                       file_name=lambda name: prefix + name.removeprefix("backbone."))


# ---------------------------------------------------------------------------------------------
# Mix Transformer layouts
# ---------------------------------------------------------------------------------------------

def mit_layout(state: dict[str, Tensor]) -> str:
    """``hf`` (``...encoder.block.0.0...``) or ``nvlabs`` (``block1.0...``)."""
    if any(".encoder." in "." + k for k in state):
        return "hf"
    return "nvlabs"


def _nvlabs_block(rest: str) -> str:
    return {"attn.norm": "attn.sr_norm", "mlp.dwconv.dwconv": "mlp.dwconv"}.get(rest, rest)


_HF_BLOCK = {
    "layer_norm_1": "norm1", "layer_norm_2": "norm2", "attention.self.query": "attn.q",
    "attention.self.sr": "attn.sr", "attention.self.layer_norm": "attn.sr_norm",
    "attention.output.dense": "attn.proj", "mlp.dense1": "mlp.fc1", "mlp.dwconv.dwconv": "mlp.dwconv",
    "mlp.dense2": "mlp.fc2",
}


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def _map_nvlabs(key: str) -> str | None:
    key = key.removeprefix("backbone.")
    if m := re.fullmatch(r"patch_embed(\d)\.(proj|norm)\.(\w+)", key):
        return f"backbone.stages.{int(m[1]) - 1}.patch_embed.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"block(\d)\.(\d+)\.(.+)", key):
        module, param = _split_param(m[3])
        return f"backbone.stages.{int(m[1]) - 1}.blocks.{m[2]}.{_nvlabs_block(module)}.{param}"
    if m := re.fullmatch(r"norm(\d)\.(\w+)", key):
        return f"backbone.stages.{int(m[1]) - 1}.norm.{m[2]}"
    if m := re.fullmatch(r"decode_head\.linear_c(\d)\.proj\.(\w+)", key):
        return f"head.linear_c.{int(m[1]) - 1}.{m[2]}"
    if m := re.fullmatch(r"decode_head\.linear_fuse\.conv\.(\w+)", key):
        return f"head.fuse.{m[1]}"
    if m := re.fullmatch(r"decode_head\.linear_fuse\.bn\.(\w+)", key):
        return f"head.fuse_bn.{m[1]}"
    if m := re.fullmatch(r"decode_head\.linear_pred\.(\w+)", key):
        return f"head.classifier.{m[1]}"
    return None


def _map_hf(key: str) -> str | None:
    key = key.removeprefix("segformer.")
    if m := re.fullmatch(r"encoder\.patch_embeddings\.(\d)\.(proj|layer_norm)\.(\w+)", key):
        return f"backbone.stages.{m[1]}.patch_embed.{'norm' if m[2] == 'layer_norm' else 'proj'}.{m[3]}"
    if m := re.fullmatch(r"encoder\.block\.(\d)\.(\d+)\.(.+)", key):
        module, param = _split_param(m[3])
        if module in ("attention.self.key", "attention.self.value"):
            # placeholder names; joined into attn.kv by map_mit_state
            return f"backbone.stages.{m[1]}.blocks.{m[2]}.attn.{module.rsplit('.', 1)[1]}.{param}"
        if module in _HF_BLOCK:
            return f"backbone.stages.{m[1]}.blocks.{m[2]}.{_HF_BLOCK[module]}.{param}"
        return None
    if m := re.fullmatch(r"encoder\.layer_norm\.(\d)\.(\w+)", key):
        return f"backbone.stages.{m[1]}.norm.{m[2]}"
    if m := re.fullmatch(r"decode_head\.linear_c\.(\d)\.proj\.(\w+)", key):
        return f"head.linear_c.{m[1]}.{m[2]}"
    if key == "decode_head.linear_fuse.weight":
        return "head.fuse.weight"
    if m := re.fullmatch(r"decode_head\.batch_norm\.(\w+)", key):
        return f"head.fuse_bn.{m[1]}"
    if m := re.fullmatch(r"decode_head\.classifier\.(\w+)", key):
        return f"head.classifier.{m[1]}"
    return None


def _skipped_mit_key(key: str, layout: str) -> bool:
    if layout == "nvlabs":  # ImageNet classifier; mmseg's unused conv_seg
        return key.startswith("head.") or key.startswith("decode_head.conv_seg.")
    return key.startswith("classifier.")


def map_mit_state(state: dict[str, Tensor], layout: str) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """File names -> our SegFormer names. Returns (mapped, skipped, unexpected)."""
    translate: Callable[[str], str | None] = _map_hf if layout == "hf" else _map_nvlabs
    mapped, skipped, unexpected = {}, [], []
    for key, tensor in state.items():
        if _skipped_mit_key(key, layout):
            skipped.append(key)
        elif (name := translate(key)) is None:
            unexpected.append(key)
        else:
            mapped[name] = tensor
    # HF splits NVlabs' kv Linear into key and value (rows [0, C) and [C, 2C) of kv).
    for name in [n for n in mapped if ".attn.key." in n]:
        value_name = name.replace(".attn.key.", ".attn.value.")
        if value_name in mapped:
            mapped[name.replace(".attn.key.", ".attn.kv.")] = torch.cat([mapped.pop(name), mapped.pop(value_name)])
    for name in [n for n in mapped if ".attn.key." in n or ".attn.value." in n]:
        unexpected.append(name)  # a key without its value (or the reverse)
        del mapped[name]
    return mapped, skipped, unexpected


def load_mit_weights(model: nn.Module, state: dict[str, Tensor], path: str | Path) -> LoadReport:
    """Load NVlabs or HF MiT/SegFormer weights into a ``SegFormer`` (encoder required, head optional)."""
    layout = mit_layout(state)
    mapped, skipped, unexpected = map_mit_state(state, layout)
    return load_mapped(model, mapped, path=path, layout=layout, skipped=skipped, unexpected=unexpected,
                       file_name=_hf_name if layout == "hf" else _nvlabs_name)


def _nvlabs_name(name: str) -> str:
    """Our encoder name -> NVlabs ``mit_bX.pth`` name (for error messages)."""
    if m := re.fullmatch(r"backbone\.stages\.(\d)\.patch_embed\.(.+)", name):
        return f"patch_embed{int(m[1]) + 1}.{m[2]}"
    if m := re.fullmatch(r"backbone\.stages\.(\d)\.blocks\.(\d+)\.(.+)\.(\w+)", name):
        inverse = {"attn.sr_norm": "attn.norm", "mlp.dwconv": "mlp.dwconv.dwconv"}
        return f"block{int(m[1]) + 1}.{m[2]}.{inverse.get(m[3], m[3])}.{m[4]}"
    if m := re.fullmatch(r"backbone\.stages\.(\d)\.norm\.(\w+)", name):
        return f"norm{int(m[1]) + 1}.{m[2]}"
    return name


def _hf_name(name: str) -> str:
    """Our encoder name -> HF ``segformer.encoder...`` name (for error messages)."""
    if m := re.fullmatch(r"backbone\.stages\.(\d)\.patch_embed\.(proj|norm)\.(\w+)", name):
        return f"segformer.encoder.patch_embeddings.{m[1]}.{'layer_norm' if m[2] == 'norm' else 'proj'}.{m[3]}"
    if m := re.fullmatch(r"backbone\.stages\.(\d)\.blocks\.(\d+)\.(.+)\.(\w+)", name):
        inverse = {ours: theirs for theirs, ours in _HF_BLOCK.items()}
        inverse["attn.kv"] = "attention.self.{key,value}"
        return f"segformer.encoder.block.{m[1]}.{m[2]}.{inverse.get(m[3], m[3])}.{m[4]}"
    if m := re.fullmatch(r"backbone\.stages\.(\d)\.norm\.(\w+)", name):
        return f"segformer.encoder.layer_norm.{m[1]}.{m[2]}"
    return name

