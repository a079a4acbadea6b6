"""The fused connector path against the reference (unfused) path: same parameters, same numbers.

Fused = folded K/V (one LayerNorm + one GEMM per tower), proj_in split, and multi-stage towers handed
over as stage lists (first projection per stage, no concatenation).  Reference = `set_fused(False)`:
the straightforward math (the design note's formulas, checked against a per-query loop in
test_connector.py).

Tolerances: float32 rtol = atol = 1e-5 (outputs are O(1); the two paths differ only by reassociated
sums, observed differences ~1e-7); bfloat16 rtol = atol = 0.05, and the fused bf16 error against the
float32 reference stays within 2x the reference's own bf16 error (+1e-2).

Tiny shapes: V = 64 (16 heads of 4), LLM hidden 48; tower 0 a 4×4 token grid with 8 channels, tower 1 a
multi-stage tower on an 8×8 grid with stages 16×16 (6 ch, resized first), 8×8 (10 ch, same size),
4×4 (12 ch, projected first) and 3×5 (4 ch, projected first).
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cambrian import kernels
from cambrian.kernels import reference
from cambrian.model.connector import MultiKVCrossAttention, build_connector

ROOT = Path(__file__).resolve().parents[1]
V, HIDDEN = 64, 48
STAGES = [(6, 16, 16), (10, 8, 8), (12, 4, 4), (4, 3, 5)]   # (C_k, h_k, w_k)
TOWER_CHANNELS = [8, sum(c for c, _, _ in STAGES)]
TOWER_SIDES = [4, 8]
SIZES = [(100, 70), (30, 60)]
FP32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=0.05, atol=0.05)


def tiny_config(**over):
    cfg = dict(mm_projector_type="sva", hidden_size=HIDDEN, vision_hidden_size=V,
               mm_vision_tower_aux_list=["vit", "convnext-multi-stage"],
               mm_vision_tower_aux_token_len_list=[n * n for n in TOWER_SIDES], image_token_len=16,
               num_query_group=1, query_num_list=[16], connector_depth=2, connector_only=False,
               num_of_vision_sampler_layers=2)
    cfg.update(over)
    return cfg


def randomise(conn):
    """LayerNorm weights start at 1/0 and Linear biases small: randomise every 1-D parameter."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in conn.named_parameters():
            if p.dim() == 1:
                p.copy_(0.3 * torch.randn(p.shape, generator=g) + (1.0 if p.abs().mean() > 0.5 else 0.0))
    return conn


def make_pair(**over):
    """(fused, reference) connectors with identical parameters."""
    torch.manual_seed(1)
    fused = randomise(build_connector(tiny_config(**over), TOWER_CHANNELS)).eval()
    ref = copy.deepcopy(fused).set_fused(False)
    assert fused.fused and not ref.fused
    return fused, ref


def features(batch, dtype=torch.float32, requires_grad=False):
    """[ViT tokens (B, 16, 8), [stage maps (B, C_k, h_k, w_k)]]."""
    torch.manual_seed(2)
    vit = torch.randn(batch, TOWER_SIDES[0] ** 2, TOWER_CHANNELS[0], dtype=dtype)
    stages = [torch.randn(batch, c, h, w, dtype=dtype) for c, h, w in STAGES]
    for t in [vit, *stages]:
        t.requires_grad_(requires_grad)
    return [vit, stages]


def concatenated(stages, side):
    """A stage list as the released layout: each stage resized to the tower grid, concatenated (to_token_grid)."""
    tokens = [m.flatten(2).transpose(1, 2) for m in stages]
    return kernels.multi_tower_interpolate(tokens, [tuple(m.shape[-2:]) for m in stages], (side, side))


def assert_outputs_close(a, b, tol):
    assert a.grid_sizes == b.grid_sizes and a.kept_rects == b.kept_rects
    for x, y in zip(a.image_tokens, b.image_tokens):
        torch.testing.assert_close(x, y, **tol)
    if b.tower_features is not None:
        for x, y in zip(a.tower_features, b.tower_features):
            torch.testing.assert_close(x, y, **tol)
        torch.testing.assert_close(a.global_context, b.global_context, **tol)


# ---------------------------------------------------------------------------------------------------
# forward: fused == reference
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [[16], [16, 4]], ids=["G1", "G2"])
@pytest.mark.parametrize("sizes", [None, SIZES], ids=["no-sizes", "unpad"])
def test_inference_fused_equals_reference(groups, sizes):
    fused, ref = make_pair(num_query_group=len(groups), query_num_list=groups)
    feats = features(2)
    with torch.no_grad():
        got = fused(feats, image_sizes=sizes)
        want = ref(feats, image_sizes=sizes)
        # the reference path on the released layout (concatenated tower) gives the same numbers too
        released = ref([feats[0], concatenated(feats[1], TOWER_SIDES[1])], image_sizes=sizes)
    assert_outputs_close(got, want, FP32)
    assert_outputs_close(released, want, FP32)
    assert max((x - y).abs().max().item() for x, y in zip(got.image_tokens, want.image_tokens)) > 0  # really two paths


def test_concatenated_input_still_accepted_on_the_fused_path():
    fused, ref = make_pair()
    feats = features(2)
    flat = [feats[0], concatenated(feats[1], TOWER_SIDES[1])]
    with torch.no_grad():
        assert_outputs_close(fused(flat, image_sizes=SIZES), ref(flat, image_sizes=SIZES), FP32)


def test_sampler_layers_fused_equal_reference():
    fused, ref = make_pair(num_query_group=2, query_num_list=[16, 4])
    feats = features(2)
    hidden = torch.randn(2, 30, HIDDEN)
    with torch.no_grad():
        for full in (False, True):
            out_f = fused(feats, image_sizes=SIZES, keep_full_grid=full)
            out_r = ref(feats, image_sizes=SIZES, keep_full_grid=full)
            for k in range(fused.num_sampler_layers):
                got = fused.apply_sampler_layer(k, hidden, [3, 5] if not full else [0, 4], out_f)
                want = ref.apply_sampler_layer(k, hidden, [3, 5] if not full else [0, 4], out_r)
                torch.testing.assert_close(got, want, **FP32)


def test_training_path_and_gradients_match():
    fused, ref = make_pair(num_query_group=2, query_num_list=[16, 4])
    fused.train()
    ref.train()
    feats_f, feats_r = features(2, requires_grad=True), features(2, requires_grad=True)
    out_f = fused(feats_f, image_sizes=SIZES)   # training mode: full grid, masked keys
    out_r = ref(feats_r, image_sizes=SIZES)
    assert out_f.full_grid and out_f.masks is not None
    assert_outputs_close(out_f, out_r, FP32)
    torch.manual_seed(3)
    hidden = torch.randn(2, 25, HIDDEN)
    weights = [torch.randn_like(t) for t in out_r.image_tokens]
    losses = []
    for conn, out in ((fused, out_f), (ref, out_r)):
        new = conn.apply_sampler_layer(1, hidden, [0, 4], out)
        losses.append(sum((t * w).sum() for t, w in zip(out.image_tokens, weights)) + new.square().sum())
        losses[-1].backward()
    torch.testing.assert_close(losses[0], losses[1], **FP32)
    assert not any(m._kv_cache for m in fused.modules() if isinstance(m, MultiKVCrossAttention))  # no cache in training
    grads_r = {n: p.grad for n, p in ref.named_parameters()}
    checked = 0
    for name, p in fused.named_parameters():
        if grads_r[name] is None:
            assert p.grad is None, name
            continue
        scale = grads_r[name].abs().max().item()
        torch.testing.assert_close(p.grad, grads_r[name], rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=name)
        checked += 1
    # the folded LayerNorm affines and the stage projection get their gradients through the fold
    assert fused.vision_sampler_0.layers[0].cross_attn.k_proj_1[0].weight.grad.abs().sum() > 0
    assert fused.vision_sampler_1.layers[1].cross_attn.v_proj_0[0].bias.grad.abs().sum() > 0
    assert fused.mm_projector_aux_1[0].weight.grad.abs().sum() > 0
    assert checked > 100
    for a, b in zip([feats_f[0], *feats_f[1]], [feats_r[0], *feats_r[1]]):   # and into the tower outputs
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_bfloat16_fused_close_to_reference():
    fused, ref = make_pair(num_query_group=2, query_num_list=[16, 4])
    feats = features(2)
    with torch.no_grad():
        want32 = ref(feats, image_sizes=SIZES)
        fused16, ref16 = fused.to(torch.bfloat16), ref.to(torch.bfloat16)
        feats16 = [feats[0].bfloat16(), [m.bfloat16() for m in feats[1]]]
        got = fused16(feats16, image_sizes=SIZES)
        want = ref16(feats16, image_sizes=SIZES)
    for g, w, w32 in zip(got.image_tokens, want.image_tokens, want32.image_tokens):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.float(), **BF16)
        err_fused = (g.float() - w32).abs().max().item()
        err_ref = (w.float() - w32).abs().max().item()
        assert err_fused <= 2 * err_ref + 1e-2, (err_fused, err_ref)


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu"])
def test_plain_projectors_take_stage_lists(projector):
    torch.manual_seed(0)
    conn = build_connector(tiny_config(mm_projector_type=projector), TOWER_CHANNELS).eval()
    feats = features(2)
    with torch.no_grad():
        got = conn(feats, image_sizes=SIZES)
        want = conn([feats[0], concatenated(feats[1], TOWER_SIDES[1])], image_sizes=SIZES)
    for a, b in zip(got.image_tokens, want.image_tokens):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_stage_list_errors():
    fused, _ = make_pair()
    vit, stages = features(2)
    with pytest.raises(ValueError, match=r"tower 1 \('convnext-multi-stage'\): stage maps have \[6, 10, 12\] channels"):
        fused([vit, stages[:3]])
    with pytest.raises(ValueError, match="stage batches"):
        fused([vit, [stages[0][:1], *stages[1:]]])
    with pytest.raises(ValueError, match="non-empty list of"):
        fused([vit, [m.flatten(2) for m in stages]])


# ---------------------------------------------------------------------------------------------------
# folded K/V cache
# ---------------------------------------------------------------------------------------------------
def _caches(conn):
    return [m._kv_cache for m in conn.modules() if isinstance(m, MultiKVCrossAttention)]


def test_state_dict_names_unchanged_and_cache_not_in_it():
    fused, ref = make_pair()
    with torch.no_grad():
        fused(features(1))
    # filled for every connector layer, both towers (the in-LLM layers fill theirs when they run)
    assert all(len(m._kv_cache) == 2 for g in (fused.vision_sampler_0,) for m in g.modules()
               if isinstance(m, MultiKVCrossAttention))
    assert list(fused.state_dict()) == list(ref.state_dict()) == list(build_connector(tiny_config(), TOWER_CHANNELS, fused=False).state_dict())
    assert not any("cache" in k or "fold" in k for k in fused.state_dict())


def test_cache_is_reused_and_invalidated():
    fused, ref = make_pair()
    feats = features(2)
    with torch.no_grad():
        first = fused(feats, image_sizes=SIZES)
        attn = fused.vision_sampler_0.layers[0].cross_attn
        cached = attn._kv_cache[1][1]
        fused(feats, image_sizes=SIZES)
        assert attn._kv_cache[1][1] is cached                      # reused, not recomputed

        # 1) load_state_dict with other weights (in-place copy_ bumps the version counters)
        torch.manual_seed(9)
        other = randomise(build_connector(tiny_config(), TOWER_CHANNELS))
        for p in other.parameters():
            p.data.mul_(1.5)
        fused.load_state_dict(other.state_dict())
        ref.load_state_dict(other.state_dict())
        assert_outputs_close(fused(feats, image_sizes=SIZES), ref(feats, image_sizes=SIZES), FP32)
        assert attn._kv_cache[1][1] is not cached

        # 2) an in-place edit of one LayerNorm weight under no_grad
        for conn in (fused, ref):
            conn.vision_sampler_0.layers[1].cross_attn.v_proj_0[0].weight.mul_(-2.0)
        assert_outputs_close(fused(feats, image_sizes=SIZES), ref(feats, image_sizes=SIZES), FP32)

        # 3) the parameter object replaced (load_state_dict(assign=True))
        state = {k: v.clone() * 0.5 for k, v in ref.state_dict().items()}
        fused.load_state_dict(state, assign=True)
        ref.load_state_dict(state, assign=True)
        assert_outputs_close(fused(feats, image_sizes=SIZES), ref(feats, image_sizes=SIZES), FP32)

        # 4) edits through .data bypass version counters: clear_fused_cache() is the documented remedy
        for conn in (fused, ref):
            conn.vision_sampler_0.layers[0].cross_attn.k_proj_1[1].weight.data.mul_(3.0)
        fused.clear_fused_cache()
        assert all(not c for c in _caches(fused))
        assert_outputs_close(fused(feats, image_sizes=SIZES), ref(feats, image_sizes=SIZES), FP32)
    assert not torch.allclose(first.image_tokens[0], fused(feats, image_sizes=SIZES).image_tokens[0])


def test_cache_follows_dtype_changes_and_grad_mode():
    fused, ref = make_pair()
    feats = features(1)
    with torch.no_grad():
        fused(feats)
        fused64, ref64 = fused.double(), ref.double()
        feats64 = [feats[0].double(), [m.double() for m in feats[1]]]
        got = fused64(feats64)
        assert fused64.vision_sampler_0.layers[0].cross_attn._kv_cache[0][1].dtype == torch.float64
        assert_outputs_close(got, ref64(feats64), FP32)   # the resizes run in float32 by definition
    # eval mode but gradients wanted: the fold is recomputed with autograd (nothing stale, grads flow)
    fused.clear_fused_cache()
    out = fused(feats64)
    assert all(not c for c in _caches(fused))
    out.image_tokens[0].sum().backward()
    assert fused.vision_sampler_0.layers[0].cross_attn.k_proj_0[0].bias.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# the whole model hands ConvNeXt stage lists over
# ---------------------------------------------------------------------------------------------------
def test_model_hands_stage_lists_to_the_connector():
    from cambrian.model.tiny import build_tiny_model

    model = build_tiny_model("llama").eval()
    seen = []
    model.connector.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(args[0]), with_kwargs=True)
    torch.manual_seed(4)
    pixels = [torch.randn(2, 3, t.image_size, t.image_size) for t in model.vision_towers]
    sizes = [(40, 24), (20, 50)]
    with torch.no_grad():
        got = model.encode_images(pixels, sizes)
        model.connector.set_fused(False)
        want = model.encode_images(pixels, sizes)
    kinds = [t.kind for t in model.vision_towers]
    assert kinds[-1] == "convnext"
    for feats in seen:
        assert [isinstance(f, list) for f in feats] == [k == "convnext" for k in kinds]
        assert [m.dim() for m in feats[-1]] == [4, 4, 4, 4]
    assert_outputs_close(got, want, FP32)


# ---------------------------------------------------------------------------------------------------
# kernels.multi_tower_interpolate_linear
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_interpolate_linear_equals_linear_of_concatenation(batch, with_bias):
    torch.manual_seed(0)
    grids = [torch.randn(batch, c, h, w) for c, h, w in STAGES]
    tokens = [m.flatten(2).transpose(1, 2) for m in grids]           # strided views, as the connector passes
    sizes = [tuple(m.shape[-2:]) for m in grids]
    weight = (torch.randn(7, TOWER_CHANNELS[1]) / 6).requires_grad_()
    bias = torch.randn(7, requires_grad=True) if with_bias else None
    want = F.linear(kernels.multi_tower_interpolate(tokens, sizes, (8, 8)), weight, bias)   # outputs O(1)
    with torch.no_grad():
        got = kernels.multi_tower_interpolate_linear(tokens, sizes, (8, 8), weight, bias)
    torch.testing.assert_close(got, want, **FP32)
    # autograd path (no in-place accumulation): same values and gradients
    got = kernels.multi_tower_interpolate_linear(tokens, sizes, (8, 8), weight, bias)
    torch.testing.assert_close(got, want, **FP32)
    g = torch.randn_like(want)
    params = [weight] + ([bias] if with_bias else [])
    torch.testing.assert_close(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g), rtol=1e-5,
                               atol=1e-4)


@pytest.mark.parametrize("backend", ["", "reference"], ids=["default", "reference"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("stages", [STAGES, STAGES[2:]], ids=["mixed", "project-first-only"])
def test_interpolate_linear_out(batch, with_bias, backend, stages, monkeypatch):
    """out= writes the result into the given buffer (resize-first parts and project-first-only lists)."""
    monkeypatch.setenv(kernels.ENV_VAR, backend)
    torch.manual_seed(0)
    grids = [torch.randn(batch, c, h, w) for c, h, w in stages]
    tokens = [m.flatten(2).transpose(1, 2) for m in grids]
    sizes = [tuple(m.shape[-2:]) for m in grids]
    weight = torch.randn(7, sum(c for c, _, _ in stages)) / 6
    bias = torch.randn(7) if with_bias else None
    want = F.linear(reference.multi_tower_interpolate(tokens, sizes, (8, 8)), weight, bias)
    out = torch.full((batch, 64, 7), float("nan"))
    got = kernels.multi_tower_interpolate_linear(tokens, sizes, (8, 8), weight, bias, out=out)
    assert got.data_ptr() == out.data_ptr() and got.shape == out.shape
    torch.testing.assert_close(out, want, **FP32)


def test_interpolate_linear_out_validation():
    x = [torch.randn(2, 16, 3)]
    w = torch.randn(5, 3)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        kernels.multi_tower_interpolate_linear(x, [(4, 4)], (2, 2), w, out=torch.empty(2, 4, 4))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        kernels.multi_tower_interpolate_linear(x, [(4, 4)], (2, 2), w, out=torch.empty(2, 5, 4).transpose(1, 2))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        kernels.multi_tower_interpolate_linear(x, [(4, 4)], (2, 2), w, out=torch.empty(2, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="does not support autograd"):
        kernels.multi_tower_interpolate_linear(x, [(4, 4)], (2, 2), w.requires_grad_(), out=torch.empty(2, 4, 5))
    with torch.no_grad():   # fine without autograd
        kernels.multi_tower_interpolate_linear(x, [(4, 4)], (2, 2), w, out=torch.empty(2, 4, 5))


def test_fused_inference_reuses_one_kv_buffer_per_tower(monkeypatch):
    """Inference: the stage tower's projection intermediates and every layer's K/V share one buffer."""
    fused, ref = make_pair(connector_depth=3)
    feats = features(2)
    seen = []
    real = torch.baddbmm

    def spy(*args, **kw):
        out = real(*args, **kw)
        seen.append(out.data_ptr())
        return out

    monkeypatch.setattr(torch, "baddbmm", spy)
    with torch.no_grad():
        got = fused(feats, image_sizes=SIZES)
    ptrs = seen[1::2]   # K/V of the stage tower (tower 1) in each of the 3 layers
    assert len(seen) == 6 and len(set(ptrs)) == 1
    with torch.no_grad():
        want = ref(feats, image_sizes=SIZES)
    assert_outputs_close(got, want, FP32)


def test_interpolate_linear_validation():
    x = [torch.randn(1, 16, 3)]
    with pytest.raises(ValueError, match=r"weight must be \(out, 3\)"):
        kernels.multi_tower_interpolate_linear(x, [(4, 4)], (2, 2), torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"bias must be \(5,\)"):
        kernels.multi_tower_interpolate_linear(x, [(4, 4)], (2, 2), torch.randn(5, 3), torch.randn(4))
    with pytest.raises(ValueError, match="grid 0 has shape"):
        kernels.multi_tower_interpolate_linear(x, [(3, 3)], (2, 2), torch.randn(5, 3))


def test_interpolate_linear_composes_from_a_backend_without_it(monkeypatch, interp_only_backend):
    """A backend with only multi_tower_interpolate (even forced) serves the composite op with its resize."""
    x = [torch.randn(1, 16, 3), torch.randn(1, 4, 2)]
    w = torch.randn(5, 5)
    for forced in ("", interp_only_backend.name):
        monkeypatch.setenv(kernels.ENV_VAR, forced)
        interp_only_backend.calls.clear()
        got = kernels.multi_tower_interpolate_linear(x, [(4, 4), (2, 2)], (3, 3), w)
        want = F.linear(reference.multi_tower_interpolate(x, [(4, 4), (2, 2)], (3, 3)), w)
        torch.testing.assert_close(got, want)
        assert [src for src, _ in interp_only_backend.calls] == [((4, 4),), ((2, 2),)]


# ---------------------------------------------------------------------------------------------------
# FLOPs at the cambrian-8b shapes (meta device: shapes only, nothing allocated)
# ---------------------------------------------------------------------------------------------------
CONFIG_8B = dict(mm_projector_type="sva", hidden_size=4096, vision_hidden_size=1024,
                 mm_vision_tower_aux_list=["siglip/CLIP-ViT-SO400M-14-384", "openai/clip-vit-large-patch14-336",
                                           "facebook/dinov2-giant-res378", "clip-convnext-XXL-multi-stage"],
                 mm_vision_tower_aux_token_len_list=[576, 576, 576, 9216], image_token_len=576,
                 num_query_group=1, query_num_list=[576], connector_depth=3, connector_only=True)
CONVNEXT_STAGES_8B = [(384, 256), (768, 128), (1536, 64), (3072, 32)]   # (C_k, side_k)


def _count(fn):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def test_flops_at_8b_shapes():
    with torch.device("meta"):
        conn = build_connector(CONFIG_8B, [1152, 1024, 1536, 5760]).eval().requires_grad_(False)
        vits = [torch.empty(1, 576, c) for c in (1152, 1024, 1536)]
        stages = [torch.empty(1, c, s, s) for c, s in CONVNEXT_STAGES_8B]
    n2, v = 96 * 96, 1024
    # first projection of the ConvNeXt tower: 5760 -> 1024 on 9216 tokens, against per stage
    # (resize first for 256² and 128², project first for 64² and 32²)
    first_ref = 2 * n2 * 5760 * v
    first_fused = 2 * v * (n2 * 384 + n2 * 768 + 64 * 64 * 1536 + 32 * 32 * 3072)
    assert first_ref == 108_716_359_680 and first_fused == 41_070_624_768   # ~109 -> ~41 GFLOP
    second = 2 * n2 * v * v                                                   # Linear(1024, 1024), unchanged
    conn.set_fused(False)
    assert _count(lambda: conn._project_tower(3, stages)) == first_ref + second
    ref_total = _count(lambda: conn(vits + [stages]))
    conn.set_fused(True)
    assert _count(lambda: conn._project_tower(3, stages)) == first_fused + second
    fused_total = _count(lambda: conn(vits + [stages]))
    # the whole connector: only the first projection and the proj_in context half change
    # (proj_in on concat(q, c): 576 rows x 2048 -> 1024; fused: 576 x 1024 -> 1024 plus one context row)
    proj_in_saved = 3 * (2 * 576 * 2048 * v - (2 * 576 * v * v + 2 * 1 * v * v))
    assert ref_total - fused_total == first_ref - first_fused + proj_in_saved
    assert ref_total == 319_786_450_944 and fused_total == 248_523_128_832


# ---------------------------------------------------------------------------------------------------
# the benchmark script runs (never asserts on time)
# ---------------------------------------------------------------------------------------------------
def test_benchmark_quick_writes_wellformed_json(tmp_path):
    out, chart = tmp_path / "connector.json", tmp_path / "connector.png"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_connector.py"), "--quick", "--batches", "1",
                           "--repeats", "1", "--json", str(out), "--chart", str(chart)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["config"]["quick"] is True
    assert [c["batch"] for c in result["cases"]] == [1]
    for case in result["cases"]:
        for key in ("fused_ms", "reference_ms", "fused_min_ms", "reference_min_ms", "fused_peak_mb", "reference_peak_mb",
                    "fused_gflop", "reference_gflop", "gemm_gflops", "gemm_floor_ms", "time_ratio", "memory_ratio",
                    "floor_ratio"):
            assert isinstance(case[key], (int, float)) and math.isfinite(case[key]) and case[key] > 0, (key, case)
        assert case["check"]["max_abs_diff"] < 1e-4    # the fused output matches the reference path
    assert "time_ratio" in proc.stdout  # the printed table
    _assert_chart(chart, proc.stdout)


def _assert_chart(path, stdout):
    """A PNG was written when matplotlib is installed (it is pinned in requirements.txt), else a note says why not."""
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in stdout and not path.exists()
        return
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
