"""cambrian.kernels: reference kernels against straightforward definitions, dispatch, unpad geometry."""
from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from cambrian import kernels
from cambrian.kernels import reference

HEADS, DIM = 16, 64  # head_dim 4


# ---------------------------------------------------------------------------------------------------
# multi_tower_interpolate
# ---------------------------------------------------------------------------------------------------
def f_interpolate_tokens(x: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """The definition: F.interpolate on the (B, C, h, w) layout, in float32, cast back."""
    b, _, c = x.shape
    conv = x.reshape(b, *src, c).permute(0, 3, 1, 2).float()
    y = F.interpolate(conv, size=dst, mode="bilinear", align_corners=False, antialias=False)
    return y.to(x.dtype).permute(0, 2, 3, 1).reshape(b, dst[0] * dst[1], c)


SIZES = [((1, 1), (24, 24)), ((3, 3), (24, 24)), ((7, 7), (24, 24)), ((27, 27), (24, 24)),
         ((5, 9), (6, 4)), ((3, 5), (8, 12)), ((16, 16), (4, 4))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("src,dst", SIZES)
def test_interpolate_matches_f_interpolate(dtype, batch, src, dst):
    x = (torch.randn(batch, src[0] * src[1], 5) * 3).to(dtype)
    got = kernels.multi_tower_interpolate([x], [src], dst)
    want = f_interpolate_tokens(x, src, dst)
    assert got.shape == (batch, dst[0] * dst[1], 5) and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:
        # both round the same float32 values; allow a one-ulp flip from float32 summation order
        ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(1.0)
        assert ((got.float() - want.float()).abs() <= ulp).all()
        assert (got == want).float().mean() > 0.99


def test_interpolate_concatenates_towers_and_copies_same_size():
    a = torch.randn(2, 27 * 27, 3)
    b = torch.randn(2, 24 * 24, 4)
    c = torch.randn(2, 96 * 96, 2)
    out = kernels.multi_tower_interpolate([a, b, c], [(27, 27), (24, 24), (96, 96)], (24, 24))
    assert out.shape == (2, 576, 9)
    torch.testing.assert_close(out[..., :3], f_interpolate_tokens(a, (27, 27), (24, 24)), rtol=1e-6, atol=1e-6)
    assert torch.equal(out[..., 3:7], b)  # already at the target size: copied unchanged
    torch.testing.assert_close(out[..., 7:], f_interpolate_tokens(c, (96, 96), (24, 24)), rtol=1e-6, atol=1e-6)


def test_interpolate_gradient_matches():
    x = torch.randn(2, 7 * 5, 3, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(2, 24 * 10, 3)
    (kernels.multi_tower_interpolate([x], [(7, 5)], (24, 10)) * g).sum().backward()
    (f_interpolate_tokens(x2, (7, 5), (24, 10)) * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3])
def test_interpolate_add_is_add_of_the_resize(batch, monkeypatch):
    """multi_tower_interpolate_add_ on the reference backend: out.add_(resize), in place, autograd as add_."""
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    torch.manual_seed(0)
    feats = [torch.randn(batch, 7 * 5, 3), torch.randn(batch, 4 * 4, 2), torch.randn(batch, 3, 5, 5).flatten(2).transpose(1, 2)]
    sizes = [(7, 5), (4, 4), (5, 5)]
    out = torch.randn(batch, 4 * 4, 8)
    want = out + kernels.multi_tower_interpolate(feats, sizes, (4, 4))
    assert kernels.multi_tower_interpolate_add_(out, feats, sizes, (4, 4)) is out
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    # autograd: the same gradients as the out-of-place sum (the reference resizes in float32: no float64 gradcheck)
    g = torch.randn(batch, 16, 8)

    def grads(inplace):
        leaves = [t.detach().clone().requires_grad_(True) for t in [want, *feats]]
        o = leaves[0] * 2.0
        res = (kernels.multi_tower_interpolate_add_(o, leaves[1:], sizes, (4, 4)) if inplace
               else o + kernels.multi_tower_interpolate(leaves[1:], sizes, (4, 4)))
        (res * g).sum().backward()
        return [leaf.grad for leaf in leaves]

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="out must be a float tensor of shape"):
        kernels.multi_tower_interpolate_add_(torch.empty(batch, 16, 7), feats, sizes, (4, 4))


def test_interpolate_add_on_a_backend_without_it(monkeypatch, interp_only_backend):
    """A backend with only multi_tower_interpolate serves multi_tower_interpolate_add_ with its own resize."""
    for forced in ("", interp_only_backend.name):
        monkeypatch.setenv(kernels.ENV_VAR, forced)
        interp_only_backend.calls.clear()
        x = torch.randn(1, 9, 2)
        out = torch.randn(1, 4, 2)
        want = out + reference.multi_tower_interpolate([x], [(3, 3)], (2, 2))
        kernels.multi_tower_interpolate_add_(out, [x], [(3, 3)], (2, 2))
        torch.testing.assert_close(out, want)
        assert [dst for _, dst in interp_only_backend.calls] == [(2, 2)]


@pytest.mark.parametrize("batch", [1, 2])
def test_window_pos_layer_norm_is_add_then_layer_norm(batch, monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    torch.manual_seed(0)
    grid, pos = torch.randn(batch, 6, 6, 7), torch.randn(9, 7)
    tiled = pos.view(3, 3, 7).repeat(2, 2, 1)                      # token (y, x) -> pos[(y % 3) * 3 + x % 3]
    want = F.layer_norm(grid + tiled, (7,), eps=1e-5)
    torch.testing.assert_close(kernels.window_pos_layer_norm(grid, pos, 3), want, rtol=0, atol=0)
    torch.testing.assert_close(kernels.window_pos_layer_norm(grid, None, 3), F.layer_norm(grid, (7,), eps=1e-5),
                               rtol=0, atol=0)
    out = torch.empty_like(grid)
    assert kernels.window_pos_layer_norm(grid, pos, 3, out=out) is out
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_window_pos_layer_norm_on_a_backend_without_it(monkeypatch):
    """A forced backend without the op falls back to the reference version."""
    monkeypatch.setattr(kernels, "BACKENDS", dict(kernels.BACKENDS))
    fake = types.ModuleType("fake_no_pln")
    fake.is_available = lambda: True
    fake.supports = lambda op, device: op == "multi_tower_interpolate"
    fake.multi_tower_interpolate = reference.multi_tower_interpolate
    monkeypatch.setitem(sys.modules, "fake_no_pln", fake)
    kernels.register_backend("fake_no_pln", "fake_no_pln")
    try:
        monkeypatch.setenv(kernels.ENV_VAR, "fake_no_pln")
        grid, pos = torch.randn(1, 4, 4, 3), torch.randn(4, 3)
        torch.testing.assert_close(kernels.window_pos_layer_norm(grid, pos, 2),
                                   reference.window_pos_layer_norm(grid, pos, 2), rtol=0, atol=0)
    finally:
        kernels._modules.pop("fake_no_pln", None)


def test_interpolate_bad_input():
    with pytest.raises(ValueError, match="grid 0 has shape"):
        kernels.multi_tower_interpolate([torch.randn(1, 10, 3)], [(3, 3)], (4, 4))
    with pytest.raises(ValueError, match="1 feature grids but 2 source sizes"):
        kernels.multi_tower_interpolate([torch.randn(1, 9, 3)], [(3, 3), (3, 3)], (4, 4))


# ---------------------------------------------------------------------------------------------------
# sva_window_attention: a per-query loop written from the design note
# ---------------------------------------------------------------------------------------------------
def loop_window_attention(q, keys, values, num_heads, s, offsets=None, masks=None):
    """For every query: concatenate its window of every tower (key order dy*r+dx, towers in order),
    mask invalid keys (a tower window with no valid key counts as all valid), softmax per head."""
    b, h, w, dim = q.shape
    d = dim // num_heads
    rows = []
    for bi in range(b):
        row0, col0 = offsets[bi] if offsets is not None else (0, 0)
        for y in range(h):
            for x in range(w):
                wy, wx = y + row0, x + col0
                ks, vs, valid = [], [], []
                for i, (k, v) in enumerate(zip(keys, values)):
                    r = k.shape[1] // s
                    tower_valid = []
                    for dy in range(r):
                        for dx in range(r):
                            gy, gx = wy * r + dy, wx * r + dx
                            ks.append(k[bi, gy, gx])
                            vs.append(v[bi, gy, gx])
                            tower_valid.append(True if masks is None else bool(masks[i][bi, gy, gx]))
                    if not any(tower_valid):
                        tower_valid = [True] * len(tower_valid)
                    valid += tower_valid
                kmat, vmat = torch.stack(ks).float(), torch.stack(vs).float()
                ok = torch.tensor(valid)
                heads = []
                for hd in range(num_heads):
                    sl = slice(hd * d, (hd + 1) * d)
                    logits = kmat[:, sl] @ q[bi, y, x, sl].float() / math.sqrt(d)
                    logits = logits.masked_fill(~ok, float("-inf"))
                    heads.append(torch.softmax(logits, dim=0) @ vmat[:, sl])
                rows.append(torch.cat(heads))
    return torch.stack(rows).reshape(b, h, w, dim).to(q.dtype)


def make_qkv(b=2, s=2, sides=(4, 8), requires_grad=False, dtype=torch.float32):
    q = torch.randn(b, s, s, DIM, dtype=dtype, requires_grad=requires_grad)
    keys = [torch.randn(b, n, n, DIM, dtype=dtype, requires_grad=requires_grad) for n in sides]
    values = [torch.randn(b, n, n, DIM, dtype=dtype, requires_grad=requires_grad) for n in sides]
    return q, keys, values


def test_window_attention_forward_backward_matches_loop():
    s, sides = 2, (4, 8)  # r = 2, 4
    q, keys, values = make_qkv(s=s, sides=sides, requires_grad=True)
    image_sizes = [(100, 70), (30, 64)]
    rects = [kernels.image_valid_rects(image_sizes, n) for n in sides]
    masks = [kernels.rects_to_mask(r, n) for r, n in zip(rects, sides)]
    # sanity: the rectangles leave partly valid windows and some fully invalid ones
    assert not masks[1].all() and masks[1].any()

    got = kernels.sva_window_attention(q, keys, values, num_heads=HEADS, grid_side=s, valid_rects=rects)
    leaves = [q, *keys, *values]
    grad_out = torch.randn_like(got)
    grads = torch.autograd.grad((got * grad_out).sum(), leaves)

    want = loop_window_attention(q, keys, values, HEADS, s, masks=masks)
    want_grads = torch.autograd.grad((want * grad_out).sum(), leaves)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, wg in zip(grads, want_grads):
        torch.testing.assert_close(g, wg, rtol=1e-4, atol=1e-5)


def test_window_attention_rect_and_mask_forms_agree():
    s, sides = 4, (4, 8, 16)  # r = 1, 2, 4
    q, keys, values = make_qkv(b=3, s=s, sides=sides)
    image_sizes = [(640, 480), (300, 900), (512, 512)]
    rects = [kernels.image_valid_rects(image_sizes, n) for n in sides]
    masks = [kernels.rects_to_mask(r, n) for r, n in zip(rects, sides)]
    a = kernels.sva_window_attention(q, keys, values, num_heads=HEADS, grid_side=s, valid_rects=rects)
    m = kernels.sva_window_attention(q, keys, values, num_heads=HEADS, grid_side=s, masks=masks)
    torch.testing.assert_close(a, m, rtol=0, atol=0)
    torch.testing.assert_close(a, loop_window_attention(q, keys, values, HEADS, s, masks=masks), rtol=1e-5, atol=1e-5)


def test_window_attention_no_mask_and_all_invalid_windows():
    s, sides = 2, (2, 8)  # r = 1, 4
    q, keys, values = make_qkv(s=s, sides=sides)
    free = kernels.sva_window_attention(q, keys, values, num_heads=HEADS, grid_side=s)
    torch.testing.assert_close(free, loop_window_attention(q, keys, values, HEADS, s), rtol=1e-5, atol=1e-5)

    # nothing valid anywhere: every window is all-invalid, so every window becomes all valid
    empty = [torch.zeros(2, 4, dtype=torch.long)] * 2
    torch.testing.assert_close(kernels.sva_window_attention(q, keys, values, num_heads=HEADS, grid_side=s,
                                                            valid_rects=empty), free, rtol=0, atol=0)

    # tower 1 valid only on rows 4..7: window row 0 of tower 1 is entirely invalid -> all valid there,
    # so that row equals the unmasked result; window row 1 is fully valid as well.
    rects = [torch.tensor([[0, 2, 0, 2]] * 2), torch.tensor([[4, 8, 0, 8]] * 2)]
    out = kernels.sva_window_attention(q, keys, values, num_heads=HEADS, grid_side=s, valid_rects=rects)
    torch.testing.assert_close(out, free, rtol=0, atol=0)

    # valid rows 5..7: window row 1 is partly valid (rows 4 masked), window row 0 stays all valid
    rects = [torch.tensor([[0, 2, 0, 2]] * 2), torch.tensor([[5, 8, 0, 8]] * 2)]
    out = kernels.sva_window_attention(q, keys, values, num_heads=HEADS, grid_side=s, valid_rects=rects)
    torch.testing.assert_close(out[:, 0], free[:, 0], rtol=0, atol=0)
    assert not torch.allclose(out[:, 1], free[:, 1])
    masks = [kernels.rects_to_mask(r, n) for r, n in zip(rects, sides)]
    torch.testing.assert_close(out, loop_window_attention(q, keys, values, HEADS, s, masks=masks), rtol=1e-5, atol=1e-5)


def test_window_attention_query_sub_rectangle():
    s, sides = 4, (4, 8)
    q_full, keys, values = make_qkv(b=2, s=s, sides=sides)
    rects = [kernels.image_valid_rects([(100, 60), (40, 90)], n) for n in sides]
    full = kernels.sva_window_attention(q_full, keys, values, num_heads=HEADS, grid_side=s, valid_rects=rects)
    offsets = [(1, 0), (0, 2)]
    q = torch.stack([q_full[0, 1:3, 0:2], q_full[1, 0:2, 2:4]])  # (2, 2, 2, D)
    sub = kernels.sva_window_attention(q, keys, values, num_heads=HEADS, grid_side=s, query_offsets=offsets,
                                       valid_rects=rects)
    torch.testing.assert_close(sub[0], full[0, 1:3, 0:2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sub[1], full[1, 0:2, 2:4], rtol=1e-6, atol=1e-6)
    masks = [kernels.rects_to_mask(r, n) for r, n in zip(rects, sides)]
    torch.testing.assert_close(sub, loop_window_attention(q, keys, values, HEADS, s, offsets, masks), rtol=1e-5, atol=1e-5)


def test_window_attention_low_precision_runs_in_float32():
    q, keys, values = make_qkv(s=2, sides=(4, 8))
    want = kernels.sva_window_attention(q, keys, values, num_heads=HEADS, grid_side=2)
    for dtype in (torch.bfloat16, torch.float16):
        got = kernels.sva_window_attention(q.to(dtype), [k.to(dtype) for k in keys], [v.to(dtype) for v in values],
                                           num_heads=HEADS, grid_side=2)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


def test_window_attention_bad_input():
    q, keys, values = make_qkv(s=3, sides=(3, 8))
    with pytest.raises(ValueError, match="tower 1 grid side 8 is not divisible by the window grid side 3"):
        kernels.sva_window_attention(q, keys, values, num_heads=HEADS, grid_side=3)
    q, keys, values = make_qkv(s=2, sides=(4, 8))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        kernels.sva_window_attention(q, keys, values, num_heads=7, grid_side=2)
    with pytest.raises(ValueError, match="valid_rects or masks, not both"):
        kernels.sva_window_attention(q, keys, values, num_heads=HEADS, grid_side=2,
                                     valid_rects=[torch.zeros(2, 4)] * 2, masks=[torch.ones(2, 4, 4, dtype=torch.bool)] * 2)
    with pytest.raises(ValueError, match="does not fit"):
        kernels.sva_window_attention(q, keys, values, num_heads=HEADS, grid_side=2, query_offsets=[(1, 0), (0, 0)])
    with pytest.raises(ValueError, match="values\\[0\\] shape"):
        kernels.sva_window_attention(q, keys, [values[1], values[0]], num_heads=HEADS, grid_side=2)


# ---------------------------------------------------------------------------------------------------
# unpad geometry
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,side,rect", [
    ((100, 50), 4, (1, 3, 0, 4)),     # wide: new_h = int(50*(4/100)) = 2, p = 1
    ((30, 60), 4, (0, 4, 1, 3)),      # tall: new_w = int(30*(4/60)) = 2, p = 1
    ((64, 64), 24, (0, 24, 0, 24)),   # square: nothing removed
    ((640, 480), 24, (3, 21, 0, 24)),  # new_h = 18, p = 3
    ((88, 55), 24, (5, 19, 0, 24)),   # float order of the original: int(55*(24/88)) = 14 (exact 15) -> p = 5
    ((1000, 10), 4, (2, 2, 0, 4)),    # extreme aspect ratio: nothing left
])
def test_image_valid_rect(size, side, rect):
    assert kernels.image_valid_rect(size, side) == rect


def test_image_valid_rect_rejects_bad_size():
    with pytest.raises(ValueError, match="positive"):
        kernels.image_valid_rect((0, 10), 4)


# ---------------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------------
def test_default_backend_on_cpu_is_the_first_available_preference(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    expected = next(n for n in kernels.PREFERENCE["cpu"] if n in kernels.available_backends())
    assert kernels.get_backend("sva_window_attention", "cpu") is kernels._load(expected)
    assert "reference" in kernels.available_backends()


def test_forced_backends(monkeypatch):
    x = torch.randn(1, 9, 2)
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    assert kernels.get_backend("multi_tower_interpolate", "cpu") is reference
    assert kernels.multi_tower_interpolate([x], [(3, 3)], (2, 2)).shape == (1, 4, 2)

    monkeypatch.setenv(kernels.ENV_VAR, "fastest")
    with pytest.raises(kernels.KernelBackendError, match="'fastest' is not a kernel backend.*reference"):
        kernels.multi_tower_interpolate([x], [(3, 3)], (2, 2))

    monkeypatch.setenv(kernels.ENV_VAR, "cuda")  # no CUDA device here
    with pytest.raises(kernels.KernelBackendError, match="'cuda': backend is not available"):
        kernels.get_backend("sva_window_attention", "cpu")


def test_a_new_backend_drops_in(monkeypatch, interp_only_backend):
    """A later backend only needs a module and a registry entry; callers are unchanged."""
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    kernels.multi_tower_interpolate([torch.randn(1, 9, 2)], [(3, 3)], (2, 2))
    assert [dst for _, dst in interp_only_backend.calls] == [(2, 2)]
    # it does not implement the attention: the default falls through to the next backend ...
    assert kernels.get_backend("sva_window_attention", "cpu") is not interp_only_backend.module
    # ... but forcing it for that op is an error naming the op
    monkeypatch.setenv(kernels.ENV_VAR, interp_only_backend.name)
    with pytest.raises(kernels.KernelBackendError, match="does not implement sva_window_attention"):
        kernels.get_backend("sva_window_attention", "cpu")
