"""The SVA connector against a per-query reference written from the design note, plus names and errors.

Tiny shapes: V = vision_hidden_size 64 (16 heads of 4), LLM hidden 48, two towers with 4×4 and 8×8 grids
(8 and 12 channels), final grid 4×4.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cambrian.model.config import ConfigError
from cambrian.model.connector import CambrianConnector, ConnectorOutput, build_connector

V, HIDDEN, HEADS = 64, 48, 16
TOWER_CHANNELS = [8, 12]
TOWER_SIDES = [4, 8]


def tiny_config(**over):
    cfg = dict(mm_projector_type="sva", hidden_size=HIDDEN, vision_hidden_size=V,
               mm_vision_tower_aux_list=["tower_a", "tower_b"],
               mm_vision_tower_aux_token_len_list=[n * n for n in TOWER_SIDES], image_token_len=16,
               num_query_group=1, query_num_list=[16], connector_depth=2, connector_only=False,
               num_of_vision_sampler_layers=2)
    cfg.update(over)
    return cfg


def make_connector(**over) -> CambrianConnector:
    torch.manual_seed(1)
    conn = build_connector(tiny_config(**over), TOWER_CHANNELS).eval()
    # LayerNorm weights start at 1/0 and Linear biases are small: randomise them so every parameter matters
    with torch.no_grad():
        for name, p in conn.named_parameters():
            if name.endswith(("0.weight", "3.weight", "norm.weight")) and p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.2 * torch.randn_like(p))
    return conn


def tower_features(batch: int) -> list[torch.Tensor]:
    return [torch.randn(batch, n * n, c) for n, c in zip(TOWER_SIDES, TOWER_CHANNELS)]


# ---------------------------------------------------------------------------------------------------
# reference, straight from the design note: one query at a time, explicit window lists and masks
# ---------------------------------------------------------------------------------------------------
def ref_unpad(size, n):
    """Rows and cols kept on an n×n grid for an original (W, H), the design note's rule."""
    w, h = size
    if w / h > 1:
        new_h = int(h * (n / w))
        p = (n - new_h) // 2
        return list(range(p, n - p)), list(range(n))
    new_w = int(w * (n / h))
    p = (n - new_w) // 2
    return list(range(n)), list(range(p, n - p))


def ref_mask(size, n):
    """(n, n) bool: True inside the unpadded region (all True when size is None)."""
    m = torch.zeros(n, n, dtype=torch.bool)
    if size is None:
        return m | True
    rows, cols = ref_unpad(size, n)
    for y in rows:
        for x in cols:
            m[y, x] = True
    return m


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def layer_norm(x, sd, name):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * sd[name + ".weight"] + sd[name + ".bias"]


def ref_layer(sd, pre, q, c, windows, valid, rs):
    """One cross-attention layer for one query: q (q_dim,), c (V,), windows[i] (r_i², V), valid[i] (r_i²,)."""
    x = torch.cat([q, c @ sd[pre + "proj_context.weight"].T]) @ sd[pre + "proj_in.weight"].T
    qq = layer_norm(x, sd, pre + "cross_attn.q_proj.0") @ sd[pre + "cross_attn.q_proj.1.weight"].T
    ks, vs, ok = [], [], []
    for i, (win, val, r) in enumerate(zip(windows, valid, rs)):
        tok = win + sd[f"{pre}pos_embed_{i}"] if r > 1 else win
        ks.append(layer_norm(tok, sd, f"{pre}cross_attn.k_proj_{i}.0") @ sd[f"{pre}cross_attn.k_proj_{i}.1.weight"].T)
        vs.append(layer_norm(tok, sd, f"{pre}cross_attn.v_proj_{i}.0") @ sd[f"{pre}cross_attn.v_proj_{i}.1.weight"].T)
        ok.append(val if val.any() else torch.ones_like(val))  # an all-invalid window is all valid
    k, v, ok = torch.cat(ks), torch.cat(vs), torch.cat(ok)
    d = V // HEADS
    heads = []
    for h in range(HEADS):
        sl = slice(h * d, (h + 1) * d)
        logits = (k[:, sl] @ qq[sl]) / math.sqrt(d)
        logits[~ok] = float("-inf")
        heads.append(torch.softmax(logits, 0) @ v[:, sl])
    x = x + torch.cat(heads) @ sd[pre + "cross_attn.o_proj.weight"].T
    y = gelu(layer_norm(x, sd, pre + "norm") @ sd[pre + "proj_out.linear_1.weight"].T)
    return y @ sd[pre + "proj_out.linear_2.weight"].T + q


def ref_window(grid, mask, n, r, wy, wx):
    """Window (wy, wx) of an (n*n, V) token grid: tokens in order dy*r + dx, and their validity."""
    idx = [(wy * r + dy) * n + (wx * r + dx) for dy in range(r) for dx in range(r)]
    return grid[idx], mask.flatten()[idx]


def ref_towers(sd, feats, b):
    """Projected tower grids (n_i², V) of image b and the global context (V,)."""
    out = []
    for i, f in enumerate(feats):
        x = f[b] @ sd[f"mm_projector_aux_{i}.0.weight"].T + sd[f"mm_projector_aux_{i}.0.bias"]
        x = gelu(x) @ sd[f"mm_projector_aux_{i}.2.weight"].T + sd[f"mm_projector_aux_{i}.2.bias"]
        out.append(layer_norm(x, sd, f"mm_projector_aux_{i}.3"))
    return out, out[0].mean(0)


def ref_connector(conn, feats, image_sizes, unpad, cfg, masks=None):
    """Returns per image (tokens (h*(w+1), hidden), (h, w))."""
    sd = {k: v.detach() for k, v in conn.state_dict().items()}
    fs = math.isqrt(cfg["image_token_len"])
    depth = cfg["connector_depth"]
    results = []
    for b in range(feats[0].shape[0]):
        size = image_sizes[b] if image_sizes is not None else None
        towers, ctx = ref_towers(sd, feats, b)
        tmasks = [masks[i][b].reshape(n, n) if masks is not None else ref_mask(size, n) for i, n in enumerate(TOWER_SIDES)]
        groups = []
        for g, qn in enumerate(cfg["query_num_list"]):
            s = math.isqrt(qn)
            rs = [n // s for n in TOWER_SIDES]
            out = torch.zeros(s, s, V)
            for wy in range(s):
                for wx in range(s):
                    wins = [ref_window(towers[i], tmasks[i], n, rs[i], wy, wx) for i, n in enumerate(TOWER_SIDES)]
                    q = sd["vision_query"][g]
                    for d in range(depth):
                        q = ref_layer(sd, f"vision_sampler_{g}.layers.{d}.", q, ctx, [w[0] for w in wins],
                                      [w[1] for w in wins], rs)
                    out[wy, wx] = q
            if s != fs:
                out = F.interpolate(out.permute(2, 0, 1)[None], size=(fs, fs), mode="bilinear",
                                    align_corners=False)[0].permute(1, 2, 0)
            groups.append(out)
        x = torch.cat(groups, -1)
        x = gelu(x @ sd["mm_projector.0.weight"].T + sd["mm_projector.0.bias"])
        x = x @ sd["mm_projector.2.weight"].T + sd["mm_projector.2.bias"]          # (F, F, hidden)
        rows, cols = ref_unpad(size, fs) if (unpad and size is not None) else (list(range(fs)), list(range(fs)))
        lines = []
        for y in rows:
            lines += [x[y, c] for c in cols] + [sd["image_newline"]]
        results.append((torch.stack(lines), (len(rows), len(cols))))
    return results


def ref_sampler_layer(conn, k, hidden, placements, feats, image_sizes, unpad, masks=None):
    """In-LLM layer k: placements = [(row, start)] per image; returns the expected hidden states."""
    sd = {n: v.detach() for n, v in conn.state_dict().items()}
    fs = conn.final_side
    rs = [n // fs for n in TOWER_SIDES]
    want = hidden.detach().clone()
    for b, (row, start) in enumerate(placements):
        size = image_sizes[b] if image_sizes is not None else None
        towers, ctx = ref_towers(sd, feats, b)
        tmasks = [masks[i][b].reshape(n, n) if masks is not None else ref_mask(size, n) for i, n in enumerate(TOWER_SIDES)]
        rows, cols = ref_unpad(size, fs) if (unpad and size is not None) else (list(range(fs)), list(range(fs)))
        w = len(cols)
        for y, gy in enumerate(rows):
            for x, gx in enumerate(cols):
                pos = start + y * (w + 1) + x
                wins = [ref_window(towers[i], tmasks[i], n, rs[i], gy, gx) for i, n in enumerate(TOWER_SIDES)]
                want[row, pos] = ref_layer(sd, f"vision_sampler_layers.{k}.layers.0.", hidden[row, pos].detach(), ctx,
                                           [w_[0] for w_ in wins], [w_[1] for w_ in wins], rs)
    return want


def assert_matches_reference(out: ConnectorOutput, ref, conn):
    assert len(out.image_tokens) == len(ref)
    for (tokens, (h, w)), got, size in zip(ref, out.image_tokens, out.grid_sizes):
        assert size == (h, w)
        assert got.shape == (h * (w + 1), HIDDEN)
        torch.testing.assert_close(got, tokens, rtol=1e-4, atol=1e-4)
        newline = got.reshape(h, w + 1, HIDDEN)[:, w]
        assert torch.equal(newline, conn.image_newline.detach().expand(h, HIDDEN))


# ---------------------------------------------------------------------------------------------------
# connector forward
# ---------------------------------------------------------------------------------------------------
SIZES = [(100, 70), (30, 60)]  # wide (rows 1..2 of 4; partly valid windows on the 8×8 tower) and tall


def test_inference_unpads_and_matches_reference():
    conn = make_connector()
    feats = tower_features(2)
    with torch.no_grad():
        out = conn(feats, image_sizes=SIZES)
    assert not out.full_grid
    assert out.grid_sizes == [(2, 4), (4, 2)]
    assert [t.shape[0] for t in out.image_tokens] == [2 * 5, 4 * 3] == out.token_counts()
    assert out.kept_rects == [(1, 3, 0, 4), (0, 4, 1, 3)]
    assert out.masks is None and [r.tolist() for r in out.valid_rects] == [[[1, 3, 0, 4], [0, 4, 1, 3]],
                                                                           [[1, 7, 0, 8], [0, 8, 2, 6]]]
    assert_matches_reference(out, ref_connector(conn, feats, SIZES, unpad=True, cfg=tiny_config()), conn)


def test_no_image_sizes_keeps_full_grid_unmasked():
    conn = make_connector()
    feats = tower_features(1)
    with torch.no_grad():
        out = conn(feats)
    assert out.grid_sizes == [(4, 4)] and out.valid_rects is None and out.masks is None
    assert_matches_reference(out, ref_connector(conn, feats, None, unpad=True, cfg=tiny_config()), conn)


def test_training_path_masks_full_grid():
    conn = make_connector().train()
    feats = tower_features(2)
    out = conn(feats, image_sizes=SIZES)  # keep_full_grid=None -> training mode -> full grid
    assert out.full_grid and out.grid_sizes == [(4, 4), (4, 4)] and out.valid_rects is None
    assert [m.shape for m in out.masks] == [(2, 4, 4), (2, 8, 8)]
    assert_matches_reference(out, ref_connector(conn, feats, SIZES, unpad=False, cfg=tiny_config()), conn)
    # the masks do something: without image sizes the result differs
    assert not torch.allclose(conn(feats).image_tokens[0], out.image_tokens[0])
    # and gradients reach every connector parameter used before the LLM
    sum(t.sum() for t in out.image_tokens).backward()
    assert conn.vision_query.grad is not None and conn.vision_query.grad.abs().sum() > 0
    assert conn.mm_projector_aux_1[0].weight.grad.abs().sum() > 0
    assert conn.vision_sampler_0.layers[1].pos_embed_1.grad.abs().sum() > 0


def test_training_path_with_explicit_masks():
    conn = make_connector()
    feats = tower_features(2)
    masks = [torch.rand(2, n * n) > 0.4 for n in TOWER_SIDES]
    with torch.no_grad():
        out = conn(feats, keep_full_grid=True, attention_masks=masks)
    ref = ref_connector(conn, feats, None, unpad=False, cfg=tiny_config(), masks=masks)
    assert_matches_reference(out, ref, conn)


def test_two_query_groups_one_interpolated():
    cfg = tiny_config(num_query_group=2, query_num_list=[16, 4])  # sides 4 (final) and 2 (resized to 4)
    conn = make_connector(num_query_group=2, query_num_list=[16, 4])
    assert conn.vision_query.shape == (2, V)
    assert conn.vision_sampler_1.layers[0].pos_embed_0.shape == (4, V)       # r = 4/2 = 2
    assert conn.vision_sampler_1.layers[0].pos_embed_1.shape == (16, V)      # r = 8/2 = 4
    assert not hasattr(conn.vision_sampler_0.layers[0], "pos_embed_0")       # r = 1: no pos_embed
    assert conn.mm_projector[0].weight.shape == (HIDDEN, 2 * V)
    feats = tower_features(2)
    with torch.no_grad():
        out = conn(feats, image_sizes=SIZES)
    assert_matches_reference(out, ref_connector(conn, feats, SIZES, unpad=True, cfg=cfg), conn)


def test_batch_of_different_sizes_equals_one_by_one():
    conn = make_connector()
    sizes = [(100, 70), (30, 60), (50, 50)]
    feats = tower_features(3)
    with torch.no_grad():
        batched = conn(feats, image_sizes=sizes)
        for b, size in enumerate(sizes):
            single = conn([f[b:b + 1] for f in feats], image_sizes=[size])
            assert single.grid_sizes == [batched.grid_sizes[b]]
            torch.testing.assert_close(single.image_tokens[0], batched.image_tokens[b], rtol=1e-5, atol=1e-5)


def test_extreme_aspect_ratio_gives_no_rows():
    conn = make_connector()
    with torch.no_grad():
        out = conn(tower_features(1), image_sizes=[(1000, 10)])
    assert out.grid_sizes == [(0, 4)] and out.image_tokens[0].shape == (0, HIDDEN)
    hidden = torch.randn(1, 10, HIDDEN)
    assert torch.equal(conn.apply_sampler_layer(0, hidden, [2], out), hidden)


def test_bfloat16_connector_runs_close_to_float32():
    conn = make_connector()
    feats = tower_features(2)
    with torch.no_grad():
        want = conn(feats, image_sizes=SIZES)
        conn16 = make_connector().to(torch.bfloat16)
        got = conn16([f.to(torch.bfloat16) for f in feats], image_sizes=SIZES)
        hidden = torch.randn(2, 20, HIDDEN, dtype=torch.bfloat16)
        new = conn16.apply_sampler_layer(1, hidden, [0, 3], got)
    assert new.dtype == torch.bfloat16
    for a, b in zip(got.image_tokens, want.image_tokens):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------------------
# in-LLM sampler layers
# ---------------------------------------------------------------------------------------------------
def test_sampler_layer_one_image_per_row():
    conn = make_connector()
    feats = tower_features(2)
    with torch.no_grad():
        out = conn(feats, image_sizes=SIZES)
    hidden = torch.randn(2, 30, HIDDEN, requires_grad=True)
    before = hidden.detach().clone()
    new = conn.apply_sampler_layer(1, hidden, [3, 5], out)
    assert torch.equal(hidden.detach(), before)  # input untouched
    want = ref_sampler_layer(conn, 1, hidden, [(0, 3), (1, 5)], feats, SIZES, unpad=True)
    torch.testing.assert_close(new.detach(), want, rtol=1e-4, atol=1e-4)
    # exactly the non-newline image positions changed
    changed = (new.detach() != before).any(-1)
    expected = torch.zeros(2, 30, dtype=torch.bool)
    for row, (start, (h, w)) in enumerate(zip([3, 5], out.grid_sizes)):
        for y in range(h):
            expected[row, start + y * (w + 1): start + y * (w + 1) + w] = True
    assert torch.equal(changed, expected)
    new.sum().backward()  # autograd through the scatter back into the sequence
    assert hidden.grad is not None and conn.vision_sampler_layers[1].layers[0].proj_in.weight.grad is not None


def test_sampler_layer_several_images_in_one_row():
    conn = make_connector()
    sizes = [(100, 70), (30, 60), (40, 40)]
    feats = tower_features(3)
    with torch.no_grad():
        out = conn(feats, image_sizes=sizes)
        counts = out.token_counts()                                     # [10, 12, 20]
        placements = [(0, 1), (0, 1 + counts[0] + 2), (1, 4)]          # two images in row 0, with text between
        hidden = torch.randn(2, 40, HIDDEN)
        new = conn.apply_sampler_layer(0, hidden, placements, out)
    want = ref_sampler_layer(conn, 0, hidden, placements, feats, sizes, unpad=True)
    torch.testing.assert_close(new, want, rtol=1e-4, atol=1e-4)


def test_sampler_layer_training_path_with_masks():
    conn = make_connector()
    feats = tower_features(2)
    with torch.no_grad():
        out = conn(feats, image_sizes=SIZES, keep_full_grid=True)
        hidden = torch.randn(2, 25, HIDDEN)
        new = conn.apply_sampler_layer(1, hidden, [0, 4], out)
    assert out.token_counts() == [20, 20]
    want = ref_sampler_layer(conn, 1, hidden, [(0, 0), (1, 4)], feats, SIZES, unpad=False)
    torch.testing.assert_close(new, want, rtol=1e-4, atol=1e-4)


def test_sampler_layer_batched_equals_one_by_one():
    conn = make_connector()
    sizes = [(100, 70), (30, 60), (100, 70)]
    feats = tower_features(3)
    with torch.no_grad():
        out = conn(feats, image_sizes=sizes)
        hidden = torch.randn(3, 24, HIDDEN)
        batched = conn.apply_sampler_layer(0, hidden, [2, 0, 5], out)
        for b, start in enumerate([2, 0, 5]):
            single_out = conn([f[b:b + 1] for f in feats], image_sizes=[sizes[b]])
            single = conn.apply_sampler_layer(0, hidden[b:b + 1], [start], single_out)
            torch.testing.assert_close(single[0], batched[b], rtol=1e-5, atol=1e-5)


def test_sampler_layer_bad_placements():
    conn = make_connector()
    with torch.no_grad():
        out = conn(tower_features(2), image_sizes=SIZES)
    hidden = torch.randn(1, 30, HIDDEN)
    with pytest.raises(ValueError, match="image_starts has 1 entries for 2 images"):
        conn.apply_sampler_layer(0, hidden, [0], out)
    with pytest.raises(ValueError, match="do not fit"):
        conn.apply_sampler_layer(0, hidden, [(0, 0), (0, 25)], out)
    with pytest.raises(ValueError, match="overlaps"):
        conn.apply_sampler_layer(0, hidden, [(0, 0), (0, 5)], out)
    with pytest.raises(ValueError, match="out of range"):
        conn.apply_sampler_layer(2, hidden, [(0, 0), (0, 12)], out)


# ---------------------------------------------------------------------------------------------------
# names, the released 8B shape, other projectors
# ---------------------------------------------------------------------------------------------------
def test_8b_connector_parameter_count_and_names():
    config = dict(mm_projector_type="sva", hidden_size=4096, vision_hidden_size=1024,
                  mm_vision_tower_aux_list=["siglip/CLIP-ViT-SO400M-14-384", "openai/clip-vit-large-patch14-336",
                                            "facebook/dinov2-giant-res378", "clip-convnext-XXL-multi-stage"],
                  mm_vision_tower_aux_token_len_list=[576, 576, 576, 9216], image_token_len=576,
                  num_query_group=1, query_num_list=[576], connector_depth=3, connector_only=False,
                  num_of_vision_sampler_layers=10, start_of_vision_sampler_layers=0,
                  stride_of_vision_sampler_layers=3)
    with torch.device("meta"):
        conn = build_connector(config, [1152, 1024, 1536, 5760])
    assert sum(p.numel() for p in conn.parameters()) == 302_760_960
    assert conn.num_sampler_layers == 10
    shapes = {k: tuple(v.shape) for k, v in conn.state_dict().items()}
    expected = {
        "vision_query": (1, 1024),
        "image_newline": (4096,),
        "mm_projector.0.weight": (4096, 1024), "mm_projector.0.bias": (4096,),
        "mm_projector.2.weight": (4096, 4096), "mm_projector.2.bias": (4096,),
        "mm_projector_aux_3.0.weight": (1024, 5760), "mm_projector_aux_0.0.bias": (1024,),
        "mm_projector_aux_2.2.weight": (1024, 1024), "mm_projector_aux_1.3.weight": (1024,),
        "mm_projector_aux_1.3.bias": (1024,),
        "vision_sampler_0.layers.2.cross_attn.k_proj_3.1.weight": (1024, 1024),
        "vision_sampler_0.layers.2.cross_attn.k_proj_3.0.bias": (1024,),
        "vision_sampler_0.layers.1.cross_attn.v_proj_0.0.weight": (1024,),
        "vision_sampler_0.layers.0.cross_attn.q_proj.1.weight": (1024, 1024),
        "vision_sampler_0.layers.0.cross_attn.o_proj.weight": (1024, 1024),
        "vision_sampler_0.layers.0.pos_embed_3": (16, 1024),
        "vision_sampler_0.layers.0.proj_context.weight": (1024, 1024),
        "vision_sampler_0.layers.0.proj_in.weight": (1024, 2048),
        "vision_sampler_0.layers.0.proj_out.linear_1.weight": (1024, 1024),
        "vision_sampler_0.layers.0.proj_out.linear_2.weight": (1024, 1024),
        "vision_sampler_0.layers.0.norm.weight": (1024,),
        "vision_sampler_layers.9.layers.0.proj_in.weight": (1024, 4096 + 1024),
        "vision_sampler_layers.9.layers.0.proj_out.linear_2.weight": (4096, 1024),
        "vision_sampler_layers.0.layers.0.pos_embed_3": (16, 1024),
        "vision_sampler_layers.4.layers.0.cross_attn.k_proj_3.1.weight": (1024, 1024),
    }
    for name, shape in expected.items():
        assert shapes.get(name) == shape, name
    # pos_embed only where the window has more than one token (r = 1, 1, 1, 4); linears inside the layers
    # have no bias; only these prefixes exist
    assert not any(f"pos_embed_{i}" in k for k in shapes for i in range(3))
    assert not any(k.endswith(".1.bias") or k.endswith("proj.bias") or "linear_" in k and k.endswith("bias")
                   or ("proj_in" in k or "proj_context" in k) and k.endswith("bias") for k in shapes
                   if k.startswith("vision_sampler"))
    prefixes = {k.split(".")[0] for k in shapes}
    assert prefixes == {"vision_query", "image_newline", "mm_projector", "vision_sampler_0", "vision_sampler_layers",
                        *(f"mm_projector_aux_{i}" for i in range(4))}
    assert len([k for k in shapes if k.startswith("vision_sampler_0.layers.")]) == 3 * 35
    assert len([k for k in shapes if k.startswith("vision_sampler_layers.")]) == 10 * 35


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu"])
def test_plain_projectors(projector):
    torch.manual_seed(0)
    conn = build_connector(tiny_config(mm_projector_type=projector), TOWER_CHANNELS).eval()
    names = {k: tuple(v.shape) for k, v in conn.state_dict().items()}
    if projector == "linear":
        assert names == {"mm_projector.weight": (HIDDEN, 20), "mm_projector.bias": (HIDDEN,), "image_newline": (HIDDEN,)}
    else:
        assert names == {"mm_projector.0.weight": (HIDDEN, 20), "mm_projector.0.bias": (HIDDEN,),
                         "mm_projector.2.weight": (HIDDEN, HIDDEN), "mm_projector.2.bias": (HIDDEN,),
                         "image_newline": (HIDDEN,)}
    assert conn.num_sampler_layers == 0
    feats = tower_features(2)
    with torch.no_grad():
        out = conn(feats, image_sizes=SIZES)
    # reference: towers resized to the final 4×4 grid, concatenated, projected, unpadded, newline
    big = F.interpolate(feats[1].reshape(2, 8, 8, 12).permute(0, 3, 1, 2), size=(4, 4), mode="bilinear",
                        align_corners=False).permute(0, 2, 3, 1)
    x = torch.cat([feats[0].reshape(2, 4, 4, 8), big], -1)
    x = conn.mm_projector(x)
    for b, size in enumerate(SIZES):
        rows, cols = ref_unpad(size, 4)
        lines = []
        for y in rows:
            lines += [x[b, y, c] for c in cols] + [conn.image_newline]
        torch.testing.assert_close(out.image_tokens[b], torch.stack(lines), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no in-LLM vision sampler layers"):
        conn.apply_sampler_layer(0, torch.zeros(2, 30, HIDDEN), [0, 0], out)


def test_connector_only_has_no_sampler_layers():
    conn = build_connector(tiny_config(connector_only=True), TOWER_CHANNELS)
    assert conn.num_sampler_layers == 0
    assert not any(k.startswith("vision_sampler_layers") for k in conn.state_dict())


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------
def test_bad_tower_inputs():
    conn = make_connector()
    feats = tower_features(2)
    with pytest.raises(ValueError, match=r"expects features from 2 towers \(tower_a, tower_b\), got 1"):
        conn(feats[:1])
    with pytest.raises(ValueError, match=r"tower 1 \('tower_b'\): got 49 tokens, expected 64"):
        conn([feats[0], torch.randn(2, 49, 12)])
    with pytest.raises(ValueError, match=r"tower 0 \('tower_a'\): got 9 channels, expected 8"):
        conn([torch.randn(2, 16, 9), feats[1]])
    with pytest.raises(ValueError, match="batch 1 differs"):
        conn([feats[0], feats[1][:1]])
    with pytest.raises(ValueError, match="image_sizes has 1 entries for a batch of 2"):
        conn(feats, image_sizes=[(10, 10)])
    with pytest.raises(ValueError, match="hidden sizes for 3 towers"):
        build_connector(tiny_config(), [8, 12, 16])


def test_bad_configs():
    with pytest.raises(ValueError, match="query_num_list.*query grid side 3 does not divide the grid side 4"):
        build_connector(tiny_config(query_num_list=[9]), TOWER_CHANNELS)
    with pytest.raises(ValueError, match="image_token_len.*final grid side 3 does not divide"):
        build_connector(tiny_config(image_token_len=9, query_num_list=[4]), TOWER_CHANNELS)
    with pytest.raises(ValueError, match="'mm_vision_tower_aux_token_len_list': 60 is not a square"):
        build_connector(tiny_config(mm_vision_tower_aux_token_len_list=[16, 60]), TOWER_CHANNELS)
    with pytest.raises(ConfigError, match="num_query_group is 2"):
        build_connector(tiny_config(num_query_group=2), TOWER_CHANNELS)
    with pytest.raises(ConfigError, match="'hidden_size': missing"):
        cfg = tiny_config()
        del cfg["hidden_size"]
        build_connector(cfg, TOWER_CHANNELS)


def test_accepts_a_cambrian_config():
    from transformers import LlamaConfig

    from cambrian.model.config import CambrianConfig

    fields = {k: v for k, v in tiny_config().items() if k != "hidden_size"}
    llm = LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                      vocab_size=32)
    cfg = CambrianConfig(llm_config=llm, model_type="cambrian_llama", **fields)
    conn = build_connector(cfg, TOWER_CHANNELS)
    ref = build_connector(tiny_config(), TOWER_CHANNELS)
    assert {k: v.shape for k, v in conn.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
