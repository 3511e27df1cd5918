"""DINOv2 / EVA-02 weight layouts: each file is written from a random model of the right
architecture in the layout's own names, loaded into a fresh model, and the encoders must agree
exactly. The layouts are written here from their documentation (official dinov2
``vision_transformer.py``, HF ``modeling_dinov2.py``), independently of the loader's maps."""
from __future__ import annotations

import pytest
import torch

from da_seg.models import build_model
from da_seg.models.vit_weights import vit_layout
from da_seg.models.weights import WeightsError

PREFIX = "backbone.vit."


def random_model(name: str, depth: int, seed: int):
    torch.manual_seed(seed)
    model = build_model(name, 3, depth=depth, decoder_dim=8).eval()
    with torch.no_grad():  # layer scales and biases are constants at init: make every tensor distinct
        for p in model.backbone.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def timm_state(model) -> dict[str, torch.Tensor]:
    return {k[len(PREFIX):]: v.clone() for k, v in model.state_dict().items() if k.startswith(PREFIX)}


def official_state(model) -> dict[str, torch.Tensor]:
    """timm names -> facebookresearch/dinov2 names (``register_tokens``, class entry in pos_embed, w12/w3)."""
    timm = timm_state(model)
    dim = timm["cls_token"].shape[-1]
    out = {"mask_token": torch.randn(1, dim), "norm.weight": torch.ones(dim), "norm.bias": torch.zeros(dim)}
    for key, value in timm.items():
        if key == "reg_token":
            out["register_tokens"] = value
        elif ".mlp.fc1." in key and model.spec.timm_name.startswith("vit_giant"):
            out[key.replace("fc1", "w12")] = value
        elif ".mlp.fc2." in key and model.spec.timm_name.startswith("vit_giant"):
            out[key.replace("fc2", "w3")] = value
        else:
            out[key] = value
    if "register_tokens" in out:  # DINOv2 keeps a class entry in pos_embed and adds it to the class token
        class_pos = out["cls_token"] / 2      # halves: (cls - cls/2) + cls/2 is cls bit for bit
        out["pos_embed"] = torch.cat([class_pos, out["pos_embed"]], dim=1)
        out["cls_token"] = out["cls_token"] - class_pos
    return out


def hf_state(model, prefix: str = "") -> dict[str, torch.Tensor]:
    """Official names -> HF Dinov2Model names (q/k/v split, lambda1, weights_in/out for SwiGLU)."""
    official = official_state(model)
    swiglu = model.spec.timm_name.startswith("vit_giant")
    out = {"embeddings.mask_token": official.pop("mask_token"),
           "layernorm.weight": official.pop("norm.weight"), "layernorm.bias": official.pop("norm.bias"),
           "embeddings.cls_token": official.pop("cls_token"),
           "embeddings.position_embeddings": official.pop("pos_embed"),
           "embeddings.patch_embeddings.projection.weight": official.pop("patch_embed.proj.weight"),
           "embeddings.patch_embeddings.projection.bias": official.pop("patch_embed.proj.bias")}
    if "register_tokens" in official:
        out["embeddings.register_tokens"] = official.pop("register_tokens")
    for key, value in official.items():
        _, block, rest = key.split(".", 2)
        layer = f"encoder.layer.{block}."
        module, param = rest.rsplit(".", 1)
        if module == "attn.qkv":
            for name, part in zip(("query", "key", "value"), value.chunk(3)):
                out[f"{layer}attention.attention.{name}.{param}"] = part
        elif module in ("ls1", "ls2"):
            out[f"{layer}layer_scale{module[-1]}.lambda1"] = value
        else:
            hf = {"attn.proj": "attention.output.dense", "mlp.w12": "mlp.weights_in", "mlp.w3": "mlp.weights_out"}
            out[f"{layer}{hf.get(module, module)}.{param}"] = value
    assert not swiglu or any("weights_in" in k for k in out)
    return {prefix + k: v for k, v in out.items()}


def encoder_features(model, size=(28, 42)):
    torch.manual_seed(5)
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        out = model(x)
    return {k: v for k, v in out.features.items() if k.startswith("block")}


def assert_same_encoder(a, b, size=(28, 42)):
    fa, fb = encoder_features(a, size), encoder_features(b, size)
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
@pytest.mark.parametrize("layout", ["dinov2", "hf", "timm"])
def test_each_layout_loads_to_the_same_encoder(name, layout, tmp_path):
    source = random_model(name, depth=2, seed=1)
    state = {"dinov2": official_state, "hf": hf_state, "timm": timm_state}[layout](source)
    if layout == "timm":
        state["norm.weight"] = torch.ones(384)
    path = tmp_path / f"{layout}.pth"
    torch.save(state, path)
    assert vit_layout(state) == layout
    loaded = build_model(name, 3, depth=2, decoder_dim=8, pretrained=str(path)).eval()
    assert_same_encoder(source, loaded)
    if name.endswith("_reg"):  # the registers were loaded, not just the patch path
        assert torch.equal(loaded.backbone.vit.reg_token, source.backbone.vit.reg_token)


def test_hf_safetensors_with_task_prefix(tmp_path, caplog):
    safetensors = pytest.importorskip("safetensors.torch")
    source = random_model("dinov2_vits14_reg", depth=2, seed=2)
    state = hf_state(source, prefix="dinov2.")
    state["classifier.weight"] = torch.zeros(10, 768)
    path = tmp_path / "model.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with caplog.at_level("INFO", logger="da_seg"):
        loaded = build_model("dinov2_vits14_reg", 3, depth=2, decoder_dim=8, pretrained=str(tmp_path)).eval()
    assert_same_encoder(source, loaded)
    report = " ".join(r.getMessage() for r in caplog.records)
    assert "(hf layout)" in report and "dinov2.embeddings.mask_token" in report and "classifier.weight" in report


def test_giant_swiglu_names_w12_w3(tmp_path):
    source = random_model("dinov2_vitg14", depth=1, seed=3)
    for layout, state in (("dinov2", official_state(source)), ("hf", hf_state(source))):
        path = tmp_path / f"{layout}.pth"
        torch.save(state, path)
        loaded = build_model("dinov2_vitg14", 3, depth=1, decoder_dim=8, pretrained=str(path)).eval()
        assert_same_encoder(source, loaded, size=(14, 14))


def test_eva02_timm_names(tmp_path):
    source = random_model("eva02_vitb", depth=2, seed=4)
    path = tmp_path / "eva.pth"
    torch.save({**timm_state(source), "fc_norm.weight": torch.ones(768), "head.weight": torch.zeros(5, 768)}, path)
    loaded = build_model("eva02_vitb", 3, depth=2, decoder_dim=8, pretrained=str(path)).eval()
    assert_same_encoder(source, loaded)


def test_a_register_file_into_a_model_without_registers_names_the_problem(tmp_path):
    path = tmp_path / "reg.pth"
    torch.save(official_state(random_model("dinov2_vits14_reg", depth=2, seed=1)), path)
    with pytest.raises(WeightsError, match=r"reg.pth \(dinov2 layout\) does not fit this model: .*pos_embed"):
        build_model("dinov2_vits14", 3, depth=2, decoder_dim=8, pretrained=str(path))


def test_a_missing_block_is_named_in_the_files_own_names(tmp_path):
    state = hf_state(random_model("dinov2_vits14", depth=2, seed=1))
    del state["encoder.layer.1.attention.attention.value.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"encoder\.layer\.1\.attention\.attention\.\{query,key,value\}\.weight"):
        build_model("dinov2_vits14", 3, depth=2, decoder_dim=8, pretrained=str(path))


def test_a_deeper_file_loads_into_a_depth_reduced_model_and_reports_the_rest(tmp_path, caplog):
    source = random_model("dinov2_vits14", depth=3, seed=1)
    path = tmp_path / "deep.pth"
    torch.save(official_state(source), path)
    with caplog.at_level("INFO", logger="da_seg"):
        loaded = build_model("dinov2_vits14", 3, depth=2, decoder_dim=8, pretrained=str(path))
    assert torch.equal(loaded.backbone.vit.blocks[1].attn.qkv.weight, source.backbone.vit.blocks[1].attn.qkv.weight)
    assert "unexpected: backbone.vit.blocks.2." in " ".join(r.getMessage() for r in caplog.records)


def test_dinov2_position_resampling_is_dinovs_not_timms():
    from timm.layers import resample_abs_pos_embed

    from da_seg.models.vit import resample_dinov2_pos

    pos = torch.randn(1, 37 * 37, 8)
    assert resample_dinov2_pos(pos, 37, 37) is pos
    ours = resample_dinov2_pos(pos, 19, 51)
    square = pos.reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    official = torch.nn.functional.interpolate(square, scale_factor=(19.1 / 37, 51.1 / 37), mode="bicubic",
                                               antialias=False).permute(0, 2, 3, 1).reshape(1, 19 * 51, 8)
    assert torch.equal(ours, official)
    timm = resample_abs_pos_embed(pos, new_size=(19, 51), old_size=(37, 37), num_prefix_tokens=0)
    assert not torch.allclose(ours, timm, atol=1e-2)                # antialiased: a different embedding


@pytest.mark.parametrize("registers, name", [(0, "dinov2_vits14"), (4, "dinov2_vits14_reg")])
def test_equal_to_the_official_dinov2_code_when_it_is_importable(registers, name, tmp_path):
    """Runs where facebookresearch/dinov2's ``dinov2`` package is on the path (not a dependency)."""
    official = pytest.importorskip("dinov2.models.vision_transformer")
    from functools import partial

    from dinov2.layers import MemEffAttention, NestedTensorBlock

    torch.manual_seed(0)
    reference = official.DinoVisionTransformer(
        patch_size=14, img_size=518, embed_dim=384, depth=2, num_heads=6, init_values=1.0, block_chunks=0,
        block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention), num_register_tokens=registers,
        interpolate_offset=0.1, interpolate_antialias=False).eval()       # the hub models' settings
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path / "official.pth"
    torch.save(reference.state_dict(), path)
    ours = build_model(name, 3, depth=2, decoder_dim=8, pretrained=str(path)).eval()
    for size in ((518, 518), (266, 266), (280, 714)):
        x = torch.rand(1, 3, *size)
        with torch.no_grad():
            expected = reference.get_intermediate_layers(ours.input_norm.apply(x), n=[0, 1], norm=False, reshape=True)
            features = ours(x).features
        assert all(torch.equal(e, features[f"block{i}"]) for i, e in enumerate(expected))
