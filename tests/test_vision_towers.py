"""Vision towers: feature semantics, timm/open_clip conversion, save/load, paths, grid resizing.

The timm-layout tests write their own functional timm forward (patch conv, pos add, pre-norm blocks
with fused qkv, final norm; ConvNeXt stem + LayerNorm2d, downsample, dwconv/LN/MLP/gamma blocks) and
run it on random timm-layout weights, so "load the timm/open_clip file through load_vision_tower"
is compared against an implementation that shares no code with the converter or transformers.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from cambrian.model.image_processing import ImageProcessor
from cambrian.model.vision_towers import (
    IMAGENET_MEAN, OPENAI_MEAN, OPENAI_STD, SIGLIP_MEAN, MissingVisionTowerError, VisionTower,
    VisionTowerCheckpointError, build_vision_tower, default_pad_color, infer_tower_kind, load_vision_tower,
    resolve_tower_paths, to_token_grid, tower_dir_name, tower_preset,
)

SIGLIP_CFG = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  image_size=56, patch_size=14)
CLIP_CFG = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                image_size=56, patch_size=14)
DINO_CFG = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                image_size=28, patch_size=14)
CONVNEXT_CFG = dict(hidden_sizes=[8, 12, 16, 20], depths=[1, 2, 1, 1], image_size=32)


def pixels(n: int, side: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, side, side, dtype=dtype)


# --------------------------------------------------------------------------- independent timm forwards
def rand_ln(sd: dict, key: str, dim: int) -> None:
    sd[key + ".weight"] = 1 + 0.3 * torch.randn(dim, dtype=torch.float64)
    sd[key + ".bias"] = 0.2 * torch.randn(dim, dtype=torch.float64)


def rand_linear(sd: dict, key: str, out_f: int, in_f: int) -> None:
    sd[key + ".weight"] = torch.randn(out_f, in_f, dtype=torch.float64) / in_f ** 0.5
    sd[key + ".bias"] = 0.1 * torch.randn(out_f, dtype=torch.float64)


def timm_vit_state(dim=32, depth=2, mlp=48, patch=14, grid=4) -> dict[str, torch.Tensor]:
    """Random weights in timm `VisionTransformer` (SigLIP, no class token) layout."""
    sd: dict[str, torch.Tensor] = {}
    sd["patch_embed.proj.weight"] = torch.randn(dim, 3, patch, patch, dtype=torch.float64) / (3 * patch * patch) ** 0.5
    sd["patch_embed.proj.bias"] = 0.1 * torch.randn(dim, dtype=torch.float64)
    sd["pos_embed"] = 0.5 * torch.randn(1, grid * grid, dim, dtype=torch.float64)
    for i in range(depth):
        b = f"blocks.{i}."
        rand_ln(sd, b + "norm1", dim)
        rand_linear(sd, b + "attn.qkv", 3 * dim, dim)
        rand_linear(sd, b + "attn.proj", dim, dim)
        rand_ln(sd, b + "norm2", dim)
        rand_linear(sd, b + "mlp.fc1", mlp, dim)
        rand_linear(sd, b + "mlp.fc2", dim, mlp)
    rand_ln(sd, "norm", dim)
    # the MAP pooling head: present in timm/open_clip files, not part of the features
    sd["attn_pool.latent"] = torch.randn(1, 1, dim, dtype=torch.float64)
    rand_linear(sd, "attn_pool.q", dim, dim)
    rand_linear(sd, "attn_pool.kv", 2 * dim, dim)
    return sd


def timm_vit_forward(sd: dict, x: torch.Tensor, heads: int, eps: float = 1e-6) -> torch.Tensor:
    """timm ViT forward_features: patch conv, + pos_embed, pre-norm blocks (fused qkv), final norm."""
    w = sd["patch_embed.proj.weight"]
    dim, patch = w.shape[0], w.shape[-1]
    x = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=patch)  # (B, D, n, n)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]  # (B, N, D)
    B, N, _ = x.shape
    hd = dim // heads
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p = f"blocks.{i}."
        h = F.layer_norm(x, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, hd)
        attn = (q @ k.transpose(-2, -1) * hd ** -0.5).softmax(dim=-1)
        o = (attn @ v).transpose(1, 2).reshape(B, N, dim)
        x = x + F.linear(o, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        h = F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]), approximate="tanh")
        x = x + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        i += 1
    return F.layer_norm(x, (dim,), sd["norm.weight"], sd["norm.bias"], eps)


def timm_convnext_state(dims=(8, 12, 16, 20), depths=(1, 2, 1, 1), patch=4) -> dict[str, torch.Tensor]:
    """Random weights in timm `ConvNeXt` layout (what open_clip's convnext_xxlarge trunk holds)."""
    sd: dict[str, torch.Tensor] = {}
    sd["stem.0.weight"] = torch.randn(dims[0], 3, patch, patch, dtype=torch.float64) / (3 * patch * patch) ** 0.5
    sd["stem.0.bias"] = 0.1 * torch.randn(dims[0], dtype=torch.float64)
    rand_ln(sd, "stem.1", dims[0])
    for i, (dim, depth) in enumerate(zip(dims, depths)):
        s = f"stages.{i}."
        if i > 0:
            rand_ln(sd, s + "downsample.0", dims[i - 1])
            sd[s + "downsample.1.weight"] = torch.randn(dim, dims[i - 1], 2, 2, dtype=torch.float64) / (4 * dims[i - 1]) ** 0.5
            sd[s + "downsample.1.bias"] = 0.1 * torch.randn(dim, dtype=torch.float64)
        for j in range(depth):
            b = f"{s}blocks.{j}."
            sd[b + "conv_dw.weight"] = torch.randn(dim, 1, 7, 7, dtype=torch.float64) / 7
            sd[b + "conv_dw.bias"] = 0.1 * torch.randn(dim, dtype=torch.float64)
            rand_ln(sd, b + "norm", dim)
            rand_linear(sd, b + "mlp.fc1", 4 * dim, dim)
            rand_linear(sd, b + "mlp.fc2", dim, 4 * dim)
            sd[b + "gamma"] = 0.5 * torch.randn(dim, dtype=torch.float64)
    rand_ln(sd, "head.norm", dims[-1])
    return sd


def timm_convnext_forward(sd: dict, x: torch.Tensor, eps: float = 1e-5) -> list[torch.Tensor]:
    """timm ConvNeXt: stem conv + LayerNorm2d, then per stage [LN2d + 2x2/2 conv] and blocks
    x + gamma * fc2(gelu(fc1(LN(dwconv7x7(x))))); returns every stage output (B, C, h, w)."""

    def ln2d(t, key):
        return F.layer_norm(t.permute(0, 2, 3, 1), (t.shape[1],), sd[key + ".weight"], sd[key + ".bias"],
                            eps).permute(0, 3, 1, 2)

    patch = sd["stem.0.weight"].shape[-1]
    x = ln2d(F.conv2d(x, sd["stem.0.weight"], sd["stem.0.bias"], stride=patch), "stem.1")
    outs = []
    i = 0
    while f"stages.{i}.blocks.0.conv_dw.weight" in sd:
        s = f"stages.{i}."
        if f"{s}downsample.1.weight" in sd:
            x = F.conv2d(ln2d(x, s + "downsample.0"), sd[s + "downsample.1.weight"], sd[s + "downsample.1.bias"],
                         stride=2)
        j = 0
        while f"{s}blocks.{j}.conv_dw.weight" in sd:
            b = f"{s}blocks.{j}."
            C = x.shape[1]
            y = F.conv2d(x, sd[b + "conv_dw.weight"], sd[b + "conv_dw.bias"], padding=3, groups=C)
            y = F.layer_norm(y.permute(0, 2, 3, 1), (C,), sd[b + "norm.weight"], sd[b + "norm.bias"], eps)
            y = F.linear(F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                         sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
            x = x + (y * sd[b + "gamma"]).permute(0, 3, 1, 2)
            j += 1
        outs.append(x)
        i += 1
    return outs


def open_clip_wrap(trunk: dict) -> dict:
    """An open_clip checkpoint: trunk under visual.trunk., plus projection, text tower, logit scale."""
    sd = {"visual.trunk." + k: v for k, v in trunk.items()}
    sd["visual.head.proj.weight"] = torch.randn(16, 20, dtype=torch.float64)
    sd["text.transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(24, 8, dtype=torch.float64)
    sd["text.token_embedding.weight"] = torch.randn(10, 8, dtype=torch.float64)
    sd["logit_scale"] = torch.tensor(4.6, dtype=torch.float64)
    return sd


def write_checkpoint(sd: dict, path: str, fmt: str) -> str:
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    elif fmt == "wrapped":  # a training checkpoint: {"state_dict": {"module.<key>": ...}, "epoch": ...}
        torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, path)
    else:
        torch.save(sd, path)
    return path


# --------------------------------------------------------------------------- timm / open_clip files
@pytest.mark.parametrize("fmt,wrap", [("safetensors", True), ("pt", False), ("wrapped", True)])
def test_siglip_timm_file_gives_timm_features(tmp_path, fmt, wrap):
    trunk = timm_vit_state()
    sd = open_clip_wrap(trunk) if wrap else trunk
    path = write_checkpoint(sd, str(tmp_path / f"siglip.{'safetensors' if fmt == 'safetensors' else 'bin'}"), fmt)
    tower = load_vision_tower("siglip/tiny-so400m-layout", path, image_size=56, num_attention_heads=4)
    assert (tower.kind, tower.hidden_size, tower.grid_side, tower.image_size) == ("siglip", 32, 4, 56)
    assert tower.dtype == torch.float64  # stored precision kept
    assert tower.image_mean == SIGLIP_MEAN and tower.pad_color == (122, 116, 104)
    x = pixels(2, 56, torch.float64)
    ref = timm_vit_forward(trunk, x, heads=4)
    out = tower(x)
    assert out.shape == (2, 16, 32)
    assert (out - ref).abs().max().item() < 1e-8


def test_convnext_open_clip_file_gives_timm_features(tmp_path):
    trunk = timm_convnext_state()
    path = write_checkpoint(open_clip_wrap(trunk), str(tmp_path / "open_clip_model.safetensors"), "safetensors")
    tower = load_vision_tower("clip-convnext-tiny-multi-stage", path, image_size=32)
    assert tower.kind == "convnext" and tower.hidden_size == 8 + 12 + 16 + 20 and tower.grid_side == 8
    assert tower.image_mean == OPENAI_MEAN and tower.pad_color == (122, 116, 104)
    x = pixels(2, 32, torch.float64)
    ref = timm_convnext_forward(trunk, x, eps=1e-5)
    out = tower(x)
    assert [tuple(o.shape) for o in out] == [(2, 8, 8, 8), (2, 12, 4, 4), (2, 16, 2, 2), (2, 20, 1, 1)]
    for o, r in zip(out, ref):
        assert (o - r).abs().max().item() < 1e-8
    # a hub snapshot folder holding the file loads the same way
    tower2 = load_vision_tower("clip-convnext-tiny-multi-stage", str(tmp_path), image_size=32)
    assert all(torch.equal(a, b) for a, b in zip(tower2(x), out))


def test_converted_convnext_round_trips_through_a_folder(tmp_path):
    trunk = timm_convnext_state()
    path = write_checkpoint(trunk, str(tmp_path / "convnext.pt"), "pt")
    tower = load_vision_tower("clip-convnext-XXL-multi-stage", path, image_size=32)
    folder = tmp_path / "tower"
    tower.save_pretrained(folder)
    again = load_vision_tower("clip-convnext-XXL-multi-stage", folder)
    assert again.image_size == 32  # the folder's preprocessor_config beats the released 1024 default
    eps = {m.eps for m in again.model.encoder.modules() if isinstance(m, nn.LayerNorm)}
    assert eps == {1e-5}  # open_clip's eps survives the transformers folder (transformers hard-codes 1e-6)
    x = pixels(1, 32, torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(again(x), tower(x)))
    ref = timm_convnext_forward(trunk, x)
    assert all((a - r).abs().max().item() < 1e-8 for a, r in zip(again(x), ref))


def test_timm_file_dtype_override(tmp_path):
    path = write_checkpoint(timm_vit_state(), str(tmp_path / "s.safetensors"), "safetensors")
    tower = load_vision_tower("siglip/x", path, image_size=56, num_attention_heads=4, dtype=torch.float32)
    assert tower.dtype == torch.float32


def test_timm_file_key_errors(tmp_path):
    good = timm_vit_state()
    extra = dict(good, **{"blocks.0.attn.extra_scale": torch.ones(3, dtype=torch.float64)})
    path = write_checkpoint(extra, str(tmp_path / "extra.pt"), "pt")
    with pytest.raises(VisionTowerCheckpointError, match=r"left over.*blocks\.0\.attn\.extra_scale"):
        load_vision_tower("siglip/x", path, image_size=56, num_attention_heads=4)

    missing = {k: v for k, v in good.items() if k not in ("blocks.1.norm2.bias", "blocks.0.attn.qkv.bias")}
    path = write_checkpoint(missing, str(tmp_path / "missing.pt"), "pt")
    with pytest.raises(VisionTowerCheckpointError) as err:
        load_vision_tower("siglip/x", path, image_size=56, num_attention_heads=4)
    assert "blocks.1.norm2.bias" in str(err.value) and "blocks.0.attn.qkv.bias" in str(err.value)

    cn = timm_convnext_state()
    del cn["stages.1.blocks.1.gamma"]
    path = write_checkpoint(cn, str(tmp_path / "cn.pt"), "pt")
    with pytest.raises(VisionTowerCheckpointError, match=r"stages\.1\.blocks\.1\.gamma"):
        load_vision_tower("clip-convnext-x", path, image_size=32)

    path = write_checkpoint(good, str(tmp_path / "heads.pt"), "pt")
    with pytest.raises(VisionTowerCheckpointError, match="num_attention_heads"):
        load_vision_tower("siglip/x", path, image_size=56)  # a 32-wide ViT: head count unknown
    with pytest.raises(VisionTowerCheckpointError, match="clip tower"):
        load_vision_tower("openai/clip-vit-large-patch14-336", path, num_attention_heads=4)
    path = write_checkpoint({"foo.weight": torch.ones(2)}, str(tmp_path / "other.pt"), "pt")
    with pytest.raises(VisionTowerCheckpointError, match="unrecognised checkpoint layout"):
        load_vision_tower("siglip/x", path)
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(VisionTowerCheckpointError, match="cannot read"):
        load_vision_tower("siglip/x", str(tmp_path / "junk.bin"))
    with pytest.raises(MissingVisionTowerError):
        load_vision_tower("siglip/x", str(tmp_path / "nope.safetensors"))


# --------------------------------------------------------------------------- build / save / load
@pytest.mark.parametrize("kind,cfg,name", [
    ("siglip", SIGLIP_CFG, "siglip/CLIP-ViT-SO400M-14-384"),
    ("clip", CLIP_CFG, "openai/clip-vit-large-patch14-336"),
    ("dinov2", DINO_CFG, "facebook/dinov2-giant-res378"),
    ("dinov2", dict(DINO_CFG, num_register_tokens=4), "facebook/dinov2-with-registers-small"),
    ("convnext", CONVNEXT_CFG, "clip-convnext-XXL-multi-stage"),
])
def test_build_save_load_round_trip_is_bit_exact(tmp_path, kind, cfg, name):
    tower = build_vision_tower(kind, cfg, name=name, select_layer=-2)
    side = tower.image_size
    assert side == cfg["image_size"]  # random towers take their size from the config
    folder = tmp_path / tower_dir_name(name)
    tower.save_pretrained(folder)
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre["image_size"] == side and pre["pad_color"] == list(tower.pad_color)
    assert pre["image_mean"] == list(tower.image_mean) and pre["image_std"] == list(tower.image_std)
    again = load_vision_tower(name, folder, select_layer=-2)
    assert (again.kind, again.image_size, again.image_mean, again.image_std, again.pad_color) == \
        (tower.kind, tower.image_size, tower.image_mean, tower.image_std, tower.pad_color)
    sd1, sd2 = tower.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    x = pixels(2, side)
    a, b = tower(x), again(x)
    if kind == "convnext":
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    else:
        assert torch.equal(a, b)
        assert a.shape == (2, tower.grid_side ** 2, 32)


def test_released_presets_and_pad_colours():
    expect = {
        "siglip/CLIP-ViT-SO400M-14-384": ("siglip", 384, SIGLIP_MEAN, (122, 116, 104)),
        "openai/clip-vit-large-patch14-336": ("clip", 336, OPENAI_MEAN, (122, 116, 104)),
        "facebook/dinov2-giant-res378": ("dinov2", 378, IMAGENET_MEAN, (123, 116, 103)),
        "clip-convnext-XXL-multi-stage": ("convnext", 1024, OPENAI_MEAN, (122, 116, 104)),
    }
    for name, (kind, size, mean, pad) in expect.items():
        p = tower_preset(name)
        assert (infer_tower_kind(name), p.kind, p.image_size, p.image_mean) == (kind, kind, size, mean)
        assert default_pad_color(kind, p.image_mean) == pad
    assert infer_tower_kind("google/siglip-so400m-patch14-384") == "siglip"
    assert infer_tower_kind("laion/CLIP-convnext_xxlarge-laion2B") == "convnext"
    assert infer_tower_kind("facebook/dinov2-large") == "dinov2"
    assert infer_tower_kind("my-encoder") is None
    assert tower_preset("facebook/dinov2-large-res518").image_size == 518
    assert tower_dir_name("siglip/CLIP-ViT-SO400M-14-384") == "siglip--CLIP-ViT-SO400M-14-384"


def test_hf_folders_full_models_and_name_resolution(tmp_path):
    import transformers as tf

    # a full CLIPModel folder (what openai/clip-vit-large-patch14-336 is): kind from model_type,
    # size from the config when nothing else says, OpenAI normaliser
    clip = tf.CLIPModel(tf.CLIPConfig(vision_config=CLIP_CFG, text_config=dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))).eval()
    clip.save_pretrained(tmp_path / "clip")
    tower = load_vision_tower("some-vision-encoder", tmp_path / "clip", select_layer=-2)
    assert (tower.kind, tower.image_size, tower.image_mean, tower.image_std) == ("clip", 56, OPENAI_MEAN, OPENAI_STD)
    x = pixels(2, 56)
    with torch.no_grad():
        hidden = clip.vision_model(pixel_values=x, output_hidden_states=True).hidden_states
    assert torch.equal(tower(x), hidden[-2][:, 1:])
    cls_tower = load_vision_tower("some-vision-encoder", tmp_path / "clip", select_layer=-1,
                                  select_feature="cls_patch")
    assert torch.equal(cls_tower(x), hidden[-1])

    # a full SiglipModel folder: the vision trunk after post_layernorm, the pooling head left out
    sig = tf.SiglipModel(tf.SiglipConfig(vision_config=SIGLIP_CFG, text_config=dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))).eval()
    sig.save_pretrained(tmp_path / "sig")
    tower = load_vision_tower("google/siglip-tiny", tmp_path / "sig")
    assert not hasattr(tower.model, "head") or tower.model.head is None
    with torch.no_grad():
        assert torch.equal(tower(x), sig.vision_model(pixel_values=x).last_hidden_state)

    # the hub facebook/dinov2-giant folder says crop 224; the config name's -res378 wins (as in Cambrian)
    dino = tf.Dinov2Model(tf.Dinov2Config(**DINO_CFG)).eval()
    dino.save_pretrained(tmp_path / "dino")
    (tmp_path / "dino" / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 256}, "do_center_crop": True,
        "image_mean": list(IMAGENET_MEAN), "image_std": [0.229, 0.224, 0.225]}))
    tower = load_vision_tower("facebook/dinov2-giant-res378", tmp_path / "dino")
    assert (tower.image_size, tower.grid_side, tower.pad_color) == (378, 27, (123, 116, 103))
    x = pixels(1, 378)
    with torch.no_grad():
        assert torch.equal(tower(x), dino(pixel_values=x).last_hidden_state[:, 1:])
    assert tower(x).shape == (1, 27 * 27, 32)

    # weights missing from the folder: an error, never a silently random tower
    os.remove(tmp_path / "dino" / "model.safetensors")
    with pytest.raises(VisionTowerCheckpointError):
        load_vision_tower("facebook/dinov2-giant-res378", tmp_path / "dino")
    with pytest.raises(VisionTowerCheckpointError, match="holds a clip model"):
        load_vision_tower("siglip/CLIP-ViT-SO400M-14-384", tmp_path / "clip")


def test_feature_selection_matches_transformers_outputs():
    import transformers as tf

    # DINOv2 with registers: CLS + 4 registers dropped
    tower = build_vision_tower("dinov2", dict(DINO_CFG, num_register_tokens=4))
    assert tower.num_prefix_tokens == 5
    x = pixels(2, 28)
    with torch.no_grad():
        full = tower.model(pixel_values=x).last_hidden_state  # (2, 1 + 4 + 4, 32)
    assert full.shape[1] == 9 and torch.equal(tower(x), full[:, 5:])
    # CLIP select_layer -2 == the output of a CLIP one layer shorter (no post_layernorm), CLS dropped
    tower = build_vision_tower("clip", CLIP_CFG, select_layer=-2)
    short = tf.CLIPVisionModel(tf.CLIPVisionConfig(**dict(CLIP_CFG, num_hidden_layers=2))).eval()
    short.load_state_dict(tower.model.state_dict(), strict=False)
    x = pixels(2, 56)
    with torch.no_grad():
        assert torch.allclose(tower(x), short(pixel_values=x).last_hidden_state[:, 1:], atol=1e-6, rtol=0)
    # ConvNeXt: the 4 stage outputs transformers reports, conv layout
    tower = build_vision_tower("convnext", CONVNEXT_CFG)
    x = pixels(2, 32)
    with torch.no_grad():
        hs = tower.model(pixel_values=x, output_hidden_states=True).hidden_states
    out = tower(x)
    assert len(out) == 4 and all(torch.equal(a, b) for a, b in zip(out, hs[-4:]))
    with pytest.raises(ValueError, match="expects"):
        tower(pixels(1, 64))


def test_frozen_by_default_and_unfreeze():
    tower = build_vision_tower("siglip", SIGLIP_CFG)
    parent = nn.Sequential(tower, nn.Linear(32, 2))
    parent.train()
    assert parent.training and not tower.training and not tower.model.training
    assert all(not m.training for m in tower.modules())
    assert not any(p.requires_grad for p in tower.parameters())
    assert not tower(pixels(1, 56)).requires_grad

    tower = build_vision_tower("siglip", SIGLIP_CFG, unfreeze=True)
    parent = nn.Sequential(tower)
    parent.eval()
    assert not tower.training
    parent.train()
    assert tower.training and all(p.requires_grad for p in tower.parameters())
    out = tower(pixels(1, 56))
    out.square().mean().backward()
    assert tower.model.embeddings.patch_embedding.weight.grad is not None


def test_processor_matches_tower():
    tower = build_vision_tower("siglip", SIGLIP_CFG, name="siglip/CLIP-ViT-SO400M-14-384")
    proc = tower.processor
    assert isinstance(tower, VisionTower) and isinstance(proc, ImageProcessor)
    assert (proc.image_size, proc.image_mean, proc.pad_color) == (56, SIGLIP_MEAN, (122, 116, 104))


# --------------------------------------------------------------------------- paths
def test_resolve_tower_paths(tmp_path, monkeypatch):
    names = ["siglip/CLIP-ViT-SO400M-14-384", "openai/clip-vit-large-patch14-336",
             "facebook/dinov2-giant-res378", "clip-convnext-XXL-multi-stage"]
    ckpt, env = tmp_path / "ckpt", tmp_path / "env"
    (ckpt / "vision_towers" / "siglip--CLIP-ViT-SO400M-14-384").mkdir(parents=True)
    (env / "siglip--CLIP-ViT-SO400M-14-384").mkdir(parents=True)  # shadowed by the checkpoint's copy
    (env / "openai--clip-vit-large-patch14-336").mkdir(parents=True)
    conv_file = tmp_path / "convnext.safetensors"
    conv_file.write_bytes(b"x")
    dino = tmp_path / "dino"
    dino.mkdir()
    monkeypatch.setenv("CAMBRIAN_TOWER_DIR", str(env))
    got = resolve_tower_paths(names, {"clip-convnext-XXL-multi-stage": conv_file,
                                      "facebook/dinov2-giant-res378": str(dino)}, checkpoint_dir=ckpt)
    assert got == {
        names[0]: str(ckpt / "vision_towers" / "siglip--CLIP-ViT-SO400M-14-384"),
        names[1]: str(env / "openai--clip-vit-large-patch14-336"),
        names[2]: str(dino),
        names[3]: str(conv_file),
    }

    # every missing tower in one error, with the places searched
    with pytest.raises(MissingVisionTowerError) as err:
        resolve_tower_paths(names, {"facebook/dinov2-giant-res378": tmp_path / "typo"}, checkpoint_dir=ckpt)
    assert isinstance(err.value, FileNotFoundError)
    assert set(err.value.missing) == {names[2], names[3]}
    msg = str(err.value)
    assert str(tmp_path / "typo") in msg  # an explicit path is not silently replaced by another copy
    assert str(ckpt / "vision_towers" / "clip-convnext-XXL-multi-stage") in msg
    assert str(env / "clip-convnext-XXL-multi-stage") in msg

    monkeypatch.delenv("CAMBRIAN_TOWER_DIR")
    with pytest.raises(MissingVisionTowerError, match="CAMBRIAN_TOWER_DIR unset"):
        resolve_tower_paths(["x/y"])


# --------------------------------------------------------------------------- grids
def reference_resize(tokens_or_map: torch.Tensor, side: int, src: int | None = None) -> torch.Tensor:
    """F.interpolate bilinear (align_corners=False) in float32 on (B, C, h, w), back to (B, side*side, C)."""
    if tokens_or_map.ndim == 3:
        B, L, C = tokens_or_map.shape
        grid = tokens_or_map.transpose(1, 2).reshape(B, C, src, src)
    else:
        grid = tokens_or_map
    out = F.interpolate(grid.float(), size=(side, side), mode="bilinear", align_corners=False, antialias=False)
    return out.flatten(2).transpose(1, 2).to(tokens_or_map.dtype)


def test_to_token_grid_vit():
    feats = torch.randn(2, 27 * 27, 8)
    out = to_token_grid(feats, 24)
    assert out.shape == (2, 576, 8)
    torch.testing.assert_close(out, reference_resize(feats, 24, 27), atol=1e-6, rtol=0)
    same = torch.randn(2, 576, 8)
    assert to_token_grid(same, 24) is same  # already on the grid: untouched
    half = feats.to(torch.bfloat16)
    out = to_token_grid(half, 24)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference_resize(half, 24, 27), atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="square"):
        to_token_grid(torch.randn(1, 1 + 576, 8), 24)


def test_to_token_grid_convnext_stages():
    tower = build_vision_tower("convnext", CONVNEXT_CFG)
    stages = tower(pixels(2, 32))
    out = to_token_grid(stages, 4)  # 8x8, 4x4, 2x2, 1x1 -> 4x4, channels concatenated
    assert out.shape == (2, 16, tower.hidden_size)
    ref = torch.cat([reference_resize(s, 4) for s in stages], dim=-1)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_hub_snapshot_folders_read_their_preprocessing(tmp_path):
    trunk = timm_vit_state()
    # open_clip hub layout: open_clip_model.safetensors + open_clip_config.json
    oc = tmp_path / "open_clip"
    oc.mkdir()
    write_checkpoint(open_clip_wrap(trunk), str(oc / "open_clip_model.safetensors"), "safetensors")
    (oc / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"vision_cfg": {"image_size": 56, "timm_model_name": "vit_so400m_patch14_siglip_384"}},
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    tower = load_vision_tower("siglip/custom", oc, num_attention_heads=4)
    assert (tower.image_size, tower.image_mean, tower.pad_color) == (56, SIGLIP_MEAN, (122, 116, 104))
    # timm hub layout: model.safetensors + a timm (not transformers) config.json
    tm = tmp_path / "timm"
    tm.mkdir()
    write_checkpoint(trunk, str(tm / "model.safetensors"), "safetensors")
    (tm / "config.json").write_text(json.dumps({"architecture": "vit_so400m_patch14_siglip_384", "pretrained_cfg": {
        "input_size": [3, 56, 56], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    tower2 = load_vision_tower("siglip/custom", tm, num_attention_heads=4)
    x = pixels(1, 56, torch.float64)
    assert torch.equal(tower(x), tower2(x))
    assert (tower2(x) - timm_vit_forward(trunk, x, heads=4)).abs().max().item() < 1e-8
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VisionTowerCheckpointError, match="neither a transformers folder"):
        load_vision_tower("siglip/custom", empty)
