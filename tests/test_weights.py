"""Pretrained weights in every supported foreign layout load with nothing missing and identical tensors.

The foreign files are written from independent descriptions of their names: torchvision's own
ResNet state dict (which AdaptSegNet's Caffe-converted file mirrors under ``Scale.``), and a
table of NVlabs / HF MiT names written from their source code, next to ours.
"""
from __future__ import annotations

import json
import logging
import struct

import pytest
import torch
import torchvision

from da_seg.models import build_model
from da_seg.models.segmenter import INPUT_NORMS
from da_seg.models.weights import WeightsError, read_safetensors, read_state_dict

# --------------------------------------------------------------------------------------------
# Helpers: an independent safetensors writer and the MiT-B0 name table
# --------------------------------------------------------------------------------------------

_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
             torch.uint8: "U8"}


def write_safetensors(path, tensors: dict[str, torch.Tensor], align: bool = True) -> None:
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    if align:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(chunks))


MIT_B0 = dict(dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), sr=(8, 4, 2, 1))


def mit_b0_table() -> list[tuple[str, str, str, tuple[int, ...]]]:
    """(NVlabs name, HF name, our name, shape) for every MiT-B0 encoder tensor.

    NVlabs ``mix_transformer.py``: patch_embed{s}.proj/norm, block{s}.{j}.norm1/attn.q/attn.kv/attn.sr/
    attn.norm/attn.proj/norm2/mlp.fc1/mlp.dwconv.dwconv/mlp.fc2, norm{s}. HF ``modeling_segformer.py``:
    encoder.patch_embeddings.{i}.proj/layer_norm, encoder.block.{i}.{j}.layer_norm_1/attention.self.
    query/key/value/sr/layer_norm, attention.output.dense, layer_norm_2, mlp.dense1/dwconv.dwconv/dense2,
    encoder.layer_norm.{i}. The kv row uses HF name "<key>|<value>".
    """
    rows = []
    in_ch = 3
    for i, (d, depth, sr) in enumerate(zip(MIT_B0["dims"], MIT_B0["depths"], MIT_B0["sr"])):
        s, k = i + 1, (7 if i == 0 else 3)
        hf = "segformer.encoder"
        for p, shape in (("weight", (d, in_ch, k, k)), ("bias", (d,))):
            rows.append((f"patch_embed{s}.proj.{p}", f"{hf}.patch_embeddings.{i}.proj.{p}",
                         f"backbone.stages.{i}.patch_embed.proj.{p}", shape))
        for p in ("weight", "bias"):
            rows.append((f"patch_embed{s}.norm.{p}", f"{hf}.patch_embeddings.{i}.layer_norm.{p}",
                         f"backbone.stages.{i}.patch_embed.norm.{p}", (d,)))
            rows.append((f"norm{s}.{p}", f"{hf}.layer_norm.{i}.{p}", f"backbone.stages.{i}.norm.{p}", (d,)))
        for j in range(depth):
            nv, hb, ours = f"block{s}.{j}", f"{hf}.block.{i}.{j}", f"backbone.stages.{i}.blocks.{j}"
            modules = [("norm1", "layer_norm_1", "norm1", (d,), (d,)),
                       ("attn.q", "attention.self.query", "attn.q", (d, d), (d,)),
                       ("attn.kv", "attention.self.key|attention.self.value", "attn.kv", (2 * d, d), (2 * d,)),
                       ("attn.proj", "attention.output.dense", "attn.proj", (d, d), (d,)),
                       ("norm2", "layer_norm_2", "norm2", (d,), (d,)),
                       ("mlp.fc1", "mlp.dense1", "mlp.fc1", (4 * d, d), (4 * d,)),
                       ("mlp.dwconv.dwconv", "mlp.dwconv.dwconv", "mlp.dwconv", (4 * d, 1, 3, 3), (4 * d,)),
                       ("mlp.fc2", "mlp.dense2", "mlp.fc2", (d, 4 * d), (d,))]
            if sr > 1:
                modules += [("attn.sr", "attention.self.sr", "attn.sr", (d, d, sr, sr), (d,)),
                            ("attn.norm", "attention.self.layer_norm", "attn.sr_norm", (d,), (d,))]
            for nv_m, hf_m, our_m, w_shape, b_shape in modules:
                for p, shape in (("weight", w_shape), ("bias", b_shape)):
                    hf_name = "|".join(f"{hb}.{part}.{p}" for part in hf_m.split("|"))
                    rows.append((f"{nv}.{nv_m}.{p}", hf_name, f"{ours}.{our_m}.{p}", shape))
        in_ch = d
    return rows


def nvlabs_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {nv: torch.randn(shape, generator=g) for nv, _, _, shape in mit_b0_table()}
    state["head.weight"], state["head.bias"] = torch.randn(1000, 256, generator=g), torch.zeros(1000)
    return state


def hf_state(nv: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {}
    for nv_name, hf_name, _, _ in mit_b0_table():
        if "|" in hf_name:  # HF splits kv: rows [0, d) keys, [d, 2d) values
            key, value = hf_name.split("|")
            state[key], state[value] = nv[nv_name].chunk(2)
        else:
            state[hf_name] = nv[nv_name]
    state["classifier.weight"], state["classifier.bias"] = nv["head.weight"], nv["head.bias"]
    return state


def segformer_head(prefix_style: str, num_classes: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A decode head in HF (``hf``) or mmseg/NVlabs (``nvlabs``) names, embed 256 (B0)."""
    g = torch.Generator().manual_seed(seed)
    head = {}
    for i, d in enumerate(MIT_B0["dims"]):
        name = f"decode_head.linear_c.{i}.proj" if prefix_style == "hf" else f"decode_head.linear_c{i + 1}.proj"
        head[f"{name}.weight"], head[f"{name}.bias"] = torch.randn(256, d, generator=g), torch.randn(256, generator=g)
    fuse, bn, pred = (("decode_head.linear_fuse", "decode_head.batch_norm", "decode_head.classifier")
                      if prefix_style == "hf" else
                      ("decode_head.linear_fuse.conv", "decode_head.linear_fuse.bn", "decode_head.linear_pred"))
    head[f"{fuse}.weight"] = torch.randn(256, 1024, 1, 1, generator=g)
    for p in ("weight", "bias", "running_mean"):
        head[f"{bn}.{p}"] = torch.randn(256, generator=g)
    head[f"{bn}.running_var"] = torch.rand(256, generator=g) + 0.5
    head[f"{bn}.num_batches_tracked"] = torch.tensor(1000)
    head[f"{pred}.weight"] = torch.randn(num_classes, 256, 1, 1, generator=g)
    head[f"{pred}.bias"] = torch.randn(num_classes, generator=g)
    return head


# --------------------------------------------------------------------------------------------
# ResNet layouts
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torchvision_r50() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).state_dict()


def _assert_backbone_equal(model, reference: dict[str, torch.Tensor]) -> None:
    ours = model.state_dict()
    for name, tensor in reference.items():
        if not name.startswith("fc.") and not name.endswith("num_batches_tracked"):
            assert torch.equal(ours["backbone." + name], tensor), name


def test_torchvision_file_by_name_in_torch_home(tmp_path, monkeypatch, torchvision_r50, caplog):
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(torchvision_r50, checkpoints / "resnet50-0676ba61.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="da_seg.models.weights"):
        model = build_model("deeplabv3plus_r50", 19, pretrained="torchvision")
    _assert_backbone_equal(model, torchvision_r50)
    assert model.input_norm == INPUT_NORMS["imagenet"]
    assert model.backbone.layer2[0].conv2.stride == (2, 2)  # torchvision weights -> torchvision bottleneck
    assert "skipped: fc.weight, fc.bias" in caplog.text and "torchvision layout" in caplog.text
    # The same file given by path, into DeepLabV2: the architecture stays what the options say
    # (Caffe bottlenecks by default, so that a model rebuilt from its options is the trained one),
    # with a warning that these weights were trained with the other bottleneck.
    with caplog.at_level(logging.WARNING, logger="da_seg.models.deeplab"):
        v2 = build_model("deeplabv2_r50", 19, pretrained=str(checkpoints / "resnet50-0676ba61.pth"))
    _assert_backbone_equal(v2, torchvision_r50)
    assert v2.backbone.config.caffe_style and v2.input_norm == INPUT_NORMS["imagenet"]
    assert "set caffe_style = False" in caplog.text
    v2 = build_model("deeplabv2_r50", 19, pretrained=str(checkpoints / "resnet50-0676ba61.pth"), caffe_style=False)
    assert v2.backbone.layer2[0].conv2.stride == (2, 2)


def test_torchvision_file_absent_names_files_and_urls(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match=r"resnet101-63fe2227\.pth.*https://download\.pytorch\.org/models/"):
        build_model("deeplabv2_r101", 19, pretrained="torchvision")


def _caffe_deeplab_state(torchvision_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # AdaptSegNet's DeepLab_resnet_pretrained_init: "Scale." + torchvision-like names, no BN
    # counters (saved by PyTorch 0.3), and its own 4-branch classifier "Scale.layer5".
    state = {"Scale." + k: v for k, v in torchvision_state.items()
             if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    for i in range(4):
        state[f"Scale.layer5.conv2d_list.{i}.weight"] = torch.randn(21, 2048, 3, 3)
        state[f"Scale.layer5.conv2d_list.{i}.bias"] = torch.randn(21)
    return state


def test_caffe_deeplab_file(tmp_path, torchvision_r50, caplog):
    path = tmp_path / "DeepLab_resnet_pretrained_init-f81d91e8.pth"
    torch.save(_caffe_deeplab_state(torchvision_r50), path)
    with caplog.at_level(logging.INFO, logger="da_seg.models.weights"):
        model = build_model("deeplabv2_r50", 19, pretrained=str(path))
    _assert_backbone_equal(model, torchvision_r50)
    assert model.input_norm == INPUT_NORMS["caffe"] and model.backbone.config.caffe_style
    assert "Scale.layer5.conv2d_list.0.weight" in caplog.text and "caffe_deeplab layout" in caplog.text
    assert build_model("deeplabv2_r50", 19, pretrained=str(path), input_norm="imagenet").input_norm == \
        INPUT_NORMS["imagenet"]


def test_missing_backbone_key_raises_naming_file_and_key(tmp_path, torchvision_r50):
    state = _caffe_deeplab_state(torchvision_r50)
    del state["Scale.layer3.2.conv2.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"broken\.pth.*Scale\.layer3\.2\.conv2\.weight"):
        build_model("deeplabv2_r50", 19, pretrained=str(path))


def test_released_deeplabv2_model_loads_heads(tmp_path, torchvision_r50):
    # A trained AdaptSegNet/ADVENT model: plain names, layer5 = ASPP on layer3, layer6 = on layer4.
    state = {k: v for k, v in torchvision_r50.items() if not k.startswith("fc.")}
    for layer, in_ch in (("layer5", 1024), ("layer6", 2048)):
        for i in range(4):
            state[f"{layer}.conv2d_list.{i}.weight"] = torch.randn(19, in_ch, 3, 3)
            state[f"{layer}.conv2d_list.{i}.bias"] = torch.randn(19)
    path = tmp_path / "GTA2Cityscapes_multi.pth"
    torch.save({"state_dict": state}, path)
    model = build_model("deeplabv2_r50", 19, pretrained=str(path))
    assert model.input_norm == INPUT_NORMS["caffe"]
    for i in range(4):
        assert torch.equal(model.classifier.branches[i].weight, state[f"layer6.conv2d_list.{i}.weight"])
        assert torch.equal(model.aux_classifier.branches[i].bias, state[f"layer5.conv2d_list.{i}.bias"])


def test_torch_load_is_weights_only(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"object": _NotATensor()}, path)
    with pytest.raises(WeightsError, match="weights-only"):
        read_state_dict(path)


class _NotATensor:
    pass


# --------------------------------------------------------------------------------------------
# Mix Transformer layouts
# --------------------------------------------------------------------------------------------

def _assert_encoder_equal(model, nv: dict[str, torch.Tensor]) -> None:
    ours = model.state_dict()
    for nv_name, _, our_name, _ in mit_b0_table():
        assert torch.equal(ours[our_name], nv[nv_name]), (nv_name, our_name)


def test_nvlabs_mit_file(tmp_path, caplog):
    nv = nvlabs_state()
    path = tmp_path / "mit_b0.pth"
    torch.save(nv, path)
    with caplog.at_level(logging.INFO, logger="da_seg.models.weights"):
        model = build_model("segformer_b0", 19, pretrained=str(path))
    _assert_encoder_equal(model, nv)
    assert model.input_norm == INPUT_NORMS["imagenet"]
    assert "skipped: head.weight, head.bias" in caplog.text and "unexpected" not in caplog.text


def test_hf_mit_safetensors(tmp_path, caplog):
    nv = nvlabs_state()
    path = tmp_path / "model.safetensors"
    write_safetensors(path, hf_state(nv))
    with caplog.at_level(logging.INFO, logger="da_seg.models.weights"):
        model = build_model("segformer_b0", 19, pretrained=str(tmp_path))  # an HF snapshot directory
    _assert_encoder_equal(model, nv)
    assert "hf layout" in caplog.text and "skipped: classifier.weight" in caplog.text
    assert "unexpected" not in caplog.text


def test_hf_segformer_with_decode_head_for_other_classes(tmp_path, caplog):
    nv = nvlabs_state()
    head = segformer_head("hf", num_classes=150)
    path = tmp_path / "segformer-b0-finetuned-ade-512-512.safetensors"
    write_safetensors(path, {**{k: v for k, v in hf_state(nv).items() if not k.startswith("classifier.")}, **head})
    with caplog.at_level(logging.INFO, logger="da_seg.models.weights"):
        model = build_model("segformer_b0", 19, pretrained=str(path))
    _assert_encoder_equal(model, nv)
    assert torch.equal(model.head.linear_c[2].weight, head["decode_head.linear_c.2.proj.weight"])
    assert torch.equal(model.head.fuse.weight, head["decode_head.linear_fuse.weight"])
    assert torch.equal(model.head.fuse_bn.running_var, head["decode_head.batch_norm.running_var"])
    assert model.head.classifier.weight.shape == (19, 256, 1, 1)  # 150-class classifier kept out
    assert "shape differs, kept random: head.classifier.weight" in caplog.text
    assert "head.classifier.bias (file (150,), model (19,))" in caplog.text


def test_nvlabs_mmseg_checkpoint_with_head(tmp_path):
    nv = nvlabs_state()
    head = segformer_head("nvlabs", num_classes=19)
    state = {**{"backbone." + k: v for k, v in nv.items() if not k.startswith("head.")}, **head,
             "decode_head.conv_seg.weight": torch.randn(19, 128, 1, 1), "decode_head.conv_seg.bias": torch.randn(19)}
    path = tmp_path / "segformer.b0.512x1024.city.160k.pth"
    torch.save({"meta": {"epoch": 1}, "state_dict": state}, path)
    model = build_model("segformer_b0", 19, pretrained=str(path))
    _assert_encoder_equal(model, nv)
    assert torch.equal(model.head.classifier.weight, head["decode_head.linear_pred.weight"])
    assert torch.equal(model.head.fuse_bn.weight, head["decode_head.linear_fuse.bn.weight"])


def test_mit_missing_or_misshaped_keys_raise(tmp_path):
    nv = nvlabs_state()
    del nv["block1.0.attn.kv.weight"]
    path = tmp_path / "mit_b0_broken.pth"
    torch.save(nv, path)
    with pytest.raises(WeightsError, match=r"mit_b0_broken\.pth.*block1\.0\.attn\.kv\.weight"):
        build_model("segformer_b0", 19, pretrained=str(path))
    hf = hf_state(nvlabs_state())
    del hf["segformer.encoder.block.3.1.attention.self.value.weight"]
    path = tmp_path / "model.safetensors"
    write_safetensors(path, hf)
    with pytest.raises(WeightsError, match=r"segformer\.encoder\.block\.3\.1\.attention\.self\.\{key,value\}\.weight"):
        build_model("segformer_b0", 19, pretrained=str(path))
    torch.save(nvlabs_state(), tmp_path / "mit_b0.pth")
    with pytest.raises(WeightsError, match="wrong shapes"):
        build_model("segformer_b1", 19, pretrained=str(tmp_path / "mit_b0.pth"))


# --------------------------------------------------------------------------------------------
# The safetensors reader itself
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("align", [True, False])
def test_safetensors_reader_dtypes_and_offsets(tmp_path, align):
    tensors = {
        "odd_bytes": torch.arange(3, dtype=torch.uint8),  # pushes the next tensors off alignment
        "half": torch.randn(2, 3).half(),
        "bf16": torch.randn(4).bfloat16(),
        "long": torch.tensor([1, -2, 3 << 40]),
        "empty": torch.zeros(0, 5),
        "scalar": torch.tensor(7),
        "float": torch.randn(3, 1, 2),
    }
    path = tmp_path / "t.safetensors"
    write_safetensors(path, tensors, align=align)
    loaded = read_safetensors(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_safetensors_reader_rejects_garbage(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(WeightsError, match="bad.safetensors"):
        read_safetensors(path)


# --------------------------------------------------------------------------------------------
# The report reaches the user
# --------------------------------------------------------------------------------------------

def test_weights_report_shows_on_the_console_and_in_the_run_log(write_recipe, tmp_path, monkeypatch, capsys):
    import sys

    from da_seg.cli import run

    weights = tmp_path / "mit_b0.pth"
    torch.save(nvlabs_state(), weights)
    recipe = write_recipe(iters=1, extra="eval_every = 1\ncheckpoint_every = 1")
    text = recipe.read_text()
    tiny_model = 'name = "deeplab_small"\noptions = { width = 8, aspp_channels = 16 }\n'
    assert tiny_model in text
    recipe.write_text(text.replace(tiny_model, f'name = "segformer_b0"\npretrained = "{weights}"\n'))
    runs = tmp_path / "runs"
    monkeypatch.delenv("DA_SEG_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["da-seg", "train", str(recipe), "--runs", str(runs), "--no-progress"])
    run()
    report = (f"loaded {len(mit_b0_table())} tensors from {weights} (nvlabs layout); not in file (trained from "
              "scratch): head.linear_c.0.weight")
    console = [line for line in capsys.readouterr().err.splitlines() if line.startswith(report)]
    assert len(console) == 1 and "skipped: head.weight, head.bias" in console[0]
    (log_file,) = runs.rglob("train.log")
    assert any(line.endswith(f"INFO da_seg.models.weights: {console[0]}")
               for line in log_file.read_text().splitlines())
