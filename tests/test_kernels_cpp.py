"""cambrian.kernels.cpp: the C++ CPU kernels against F.interpolate, the reference backend and float64.

* interpolation: bit-identical to `F.interpolate(bilinear, align_corners=False)` on the (B, C, h, w) view in
  float32 (and after rounding, float16/bfloat16), for token-major and channel-planar inputs;
* attention: forward and backward within FlashAttention's rule of the float64 truth (the kernel's error is at
  most 2x the same-dtype reference backend's error + a small atol), gradcheck in float64, opcheck;
* dispatch (CAMBRIAN_KERNELS=cpp), the whole connector with cpp == reference, the ISA variants agree, and
  the benchmark's --quick mode writes well-formed JSON.
"""
from __future__ import annotations

import importlib.util
import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cambrian import kernels
from cambrian.kernels import cpp, reference

pytestmark = pytest.mark.skipif(not cpp.is_available(), reason=f"C++ kernels unavailable: {cpp.UNAVAILABLE_REASON}")

ROOT = Path(__file__).resolve().parents[1]
LOW = (torch.float16, torch.bfloat16)
# The ATen builds whose bilinear rounding the kernel models (x86; see csrc/cpu/ops.cpp aten_math)
EXACT = platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX2", "DEFAULT")


# ---------------------------------------------------------------------------------------------------
# multi_tower_interpolate
# ---------------------------------------------------------------------------------------------------
def f_interpolate_tokens(x: torch.Tensor, src, dst) -> torch.Tensor:
    """The definition: F.interpolate on the (B, C, h, w) view, in float32 (float64 stays float64), cast back."""
    b, _, c = x.shape
    conv = x.reshape(b, *src, c).permute(0, 3, 1, 2)
    conv = conv if conv.dtype == torch.float64 else conv.float()
    y = F.interpolate(conv, size=dst, mode="bilinear", align_corners=False, antialias=False)
    return y.to(x.dtype).permute(0, 2, 3, 1).reshape(b, dst[0] * dst[1], c)


def planar(x: torch.Tensor, src) -> torch.Tensor:
    """The same values as a (B, C, h, w) conv map seen as (B, h*w, C) (token stride 1), as the towers hand over."""
    b, _, c = x.shape
    return x.transpose(1, 2).reshape(b, c, *src).contiguous().flatten(2).transpose(1, 2)


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    if EXACT:
        assert torch.equal(got, want), f"max diff {(got.double() - want.double()).abs().max().item():.3g}"
    else:  # an ATen build whose rounding is not modelled: one float32 rounding step apart
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-6, atol=1e-6)


SIZES = [((1, 1), (24, 24)), ((3, 3), (24, 24)), ((7, 7), (24, 24)), ((27, 27), (24, 24)), ((5, 9), (6, 4)),
         ((3, 5), (8, 12)), ((16, 16), (4, 4)), ((13, 11), (100, 90))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("src,dst", SIZES)
def test_interpolate_bit_identical_to_f_interpolate(src, dst, dtype):
    # channels: 3 (ATen's generic kernel for planar inputs with H+W > 128), 37 (channels-last kernel:
    # a vector body plus a scalar tail), 1 (degenerate strides); batch 1 and 3
    for batch, c in [(1, 37), (3, 3), (3, 1)]:
        x = (torch.randn(batch, src[0] * src[1], c) * 3).to(dtype)
        for inp in (x, planar(x, src)):
            got = cpp.multi_tower_interpolate([inp], [src], dst)
            assert got.shape == (batch, dst[0] * dst[1], c) and got.dtype == dtype and got.is_contiguous()
            assert_same(got, f_interpolate_tokens(inp, src, dst))


@pytest.mark.parametrize("batch", [1, 3])
def test_interpolate_planar_streamed_output_bit_identical(batch):
    """Outputs over the streaming threshold (16 MB): the planar separable path writes them with non-temporal
    stores straight from the blend.  Up- and downsampling stages, channel counts that are not multiples of 16,
    and a 3-channel tower in front so every run starts off a 64-byte boundary (the scalar head); every ISA."""
    c = 467 if batch == 1 else 157
    lead = torch.randn(batch, 9 * 9, 3)
    stages = [torch.randn(batch, c, n, n) for n in (40, 120)]
    feats = [lead, *[m.flatten(2).transpose(1, 2) for m in stages]]
    sizes = [(9, 9), (40, 40), (120, 120)]
    want = torch.cat([f_interpolate_tokens(f, s, (96, 96)) for f, s in zip(feats, sizes)], dim=-1)
    from cambrian.kernels import _C
    default = _C.isa()
    try:
        for name in [isa for isa in ("base", "avx2", "avx512") if _C.cpu_supports(isa)]:  # each ISA's streaming
            _C.set_isa(name)
            out = cpp.multi_tower_interpolate(feats, sizes, (96, 96))
            assert out.nbytes > 16 << 20
            assert_same(out, want)
    finally:
        _C.set_isa(default)


def test_interpolate_towers_concatenated_in_place():
    """Several towers (token-major, planar, same-size copy, a strided slice) land in one output."""
    a = torch.randn(2, 27 * 27, 19)
    stages = [torch.randn(2, c, n, n) for c, n in [(6, 16), (10, 8), (12, 4)]]
    b = torch.randn(2, 8 * 8, 40)[..., ::2]                   # channel stride 2: read through a copy
    same = torch.randn(2, 8 * 8, 5)
    feats = [a, *[s.flatten(2).transpose(1, 2) for s in stages], b, same]
    sizes = [(27, 27), (16, 16), (8, 8), (4, 4), (8, 8), (8, 8)]
    out = cpp.multi_tower_interpolate(feats, sizes, (8, 8))
    want = torch.cat([f if s == (8, 8) else f_interpolate_tokens(f, s, (8, 8)) for f, s in zip(feats, sizes)], dim=-1)
    assert out.shape == (2, 64, 19 + 28 + 20 + 5)
    assert_same(out, want)
    assert torch.equal(out[..., -5:], same)  # already at the target size: copied unchanged
    # the reference backend (unfused float32 arithmetic) agrees to float32 rounding
    torch.testing.assert_close(out, reference.multi_tower_interpolate(feats, sizes, (8, 8)), rtol=1e-6, atol=1e-6)


def test_interpolate_float64_and_mixed_dtypes():
    x = torch.randn(3, 7 * 5, 4, dtype=torch.float64)
    torch.testing.assert_close(cpp.multi_tower_interpolate([x], [(7, 5)], (24, 10)),
                               f_interpolate_tokens(x, (7, 5), (24, 10)), rtol=1e-14, atol=1e-14)
    y = torch.randn(3, 9, 6, dtype=torch.bfloat16)
    out = cpp.multi_tower_interpolate([x.float(), y], [(7, 5), (3, 3)], (4, 4))
    assert out.dtype == torch.float32
    # each grid computed in float32, rounded to its own dtype, then to the output's (as the reference)
    assert_same(out[..., 4:], f_interpolate_tokens(y, (3, 3), (4, 4)).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpolate_backward_vs_float64(dtype):
    """Gradients (token-major and planar inputs, several towers) vs float64 autograd through F.interpolate."""
    sizes = [(27, 27), (7, 5), (1, 1), (16, 16)]
    base = [torch.randn(2, h * w, c, dtype=torch.float64) for (h, w), c in zip(sizes, [5, 3, 2, 17])]
    dst = (12, 10)
    g = torch.randn(2, dst[0] * dst[1], 27, dtype=torch.float64)

    def grads(fn, xs):
        leaves = [x.detach().clone().requires_grad_(True) for x in xs]
        inputs = [leaves[0], leaves[1], leaves[2], planar(leaves[3], sizes[3])]
        (fn(inputs).double() * g).sum().backward()
        return [leaf.grad for leaf in leaves]

    truth = grads(lambda fs: torch.cat([f_interpolate_tokens(f, s, dst) for f, s in zip(fs, sizes)], -1), base)
    low = [x.to(dtype) for x in base]
    got = grads(lambda fs: cpp.multi_tower_interpolate(fs, sizes, dst), low)
    ref = grads(lambda fs: reference.multi_tower_interpolate(fs, sizes, dst), low)
    for gc, gr, gt in zip(got, ref, truth):
        assert gc.dtype == dtype
        err, ref_err = (gc.double() - gt).abs().max().item(), (gr.double() - gt).abs().max().item()
        assert err <= 2 * ref_err + (1e-5 if dtype == torch.float32 else 1e-2), (err, ref_err)


@pytest.mark.parametrize("batch", [1, 3])
def test_interpolate_backward_chunks_blocks_and_streaming(batch):
    """The backward's code paths the small shapes above do not reach: rows-first (inputs wider than the output)
    and columns-first orders, several channel chunks (wide rows), blocks of input rows, a gradient larger than
    the streaming threshold (16 MB) -- with channel counts that are not multiples of 16, planar and token-major,
    up- and downsampling.  Against float64 autograd through F.interpolate, and the same bits at 1 and 2 threads
    (fixed summation order)."""
    cases = [((5, 700), (7, 600), 301, False),     # rows first (w > W), two channel chunks
             ((3, 1500), (40, 1600), 37, True),     # columns first, chunks of 16, 16 and 5 channels
             ((64, 64), (96, 96), 1041 // batch, True),  # columns first, gx > 16 MB: streamed; row blocks
             ((40, 33), (17, 24), 37, True),        # rows first, downsampling
             ((33, 24), (17, 40), 37, False)]       # columns first, downsampling rows
    for src, dst, c, conv in cases:
        x = torch.randn(batch, src[0] * src[1], c, dtype=torch.float64)
        g = torch.randn(batch, dst[0] * dst[1], c, dtype=torch.float64)

        def grad(fn, x0):
            leaf = x0.detach().clone().requires_grad_(True)
            (fn(planar(leaf, src) if conv else leaf).double() * g).sum().backward()
            return leaf.grad

        truth = grad(lambda f: f_interpolate_tokens(f, src, dst), x)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = grad(lambda f: cpp.multi_tower_interpolate([f], [src], dst), x.float())
            torch.set_num_threads(2)
            two = grad(lambda f: cpp.multi_tower_interpolate([f], [src], dst), x.float())
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, two)
        ref = grad(lambda f: reference.multi_tower_interpolate([f], [src], dst), x.float())
        err, ref_err = (one.double() - truth).abs().max().item(), (ref.double() - truth).abs().max().item()
        assert err <= 2 * ref_err + 1e-5, (src, dst, c, err, ref_err)


def test_interpolate_autograd_mixed_dtypes_and_partial_grads():
    """The C++ autograd (ops.cpp InterpolateFunction): each grid's gradient comes back in that grid's dtype,
    grids that do not require grad get none, and the values match the reference backend's autograd."""
    a = torch.randn(3, 7 * 5, 19, requires_grad=True)                          # float32, token-major
    b = torch.randn(3, 4, 9, 9, dtype=torch.bfloat16, requires_grad=True)      # bfloat16 conv map
    c = torch.randn(3, 6 * 6, 5)                                               # no grad
    sizes, dst = [(7, 5), (9, 9), (6, 6)], (8, 4)
    g = torch.randn(3, 32, 28)
    got = torch.autograd.grad(cpp.multi_tower_interpolate([a, b.flatten(2).transpose(1, 2), c], sizes, dst), [a, b], g)
    want = torch.autograd.grad(reference.multi_tower_interpolate([a, b.flatten(2).transpose(1, 2), c], sizes, dst),
                               [a, b], g)
    assert [t.dtype for t in got] == [torch.float32, torch.bfloat16]
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1].float(), want[1].float(), rtol=2e-2, atol=2e-2)


def test_interpolate_gradcheck_float64():
    xs = [torch.randn(2, 15, 3, dtype=torch.float64, requires_grad=True),
          torch.randn(2, 4, 2, dtype=torch.float64, requires_grad=True),
          torch.randn(2, 3, 7, 4, dtype=torch.float64, requires_grad=True)]  # planar (B, C, h, w) map

    def fn(a, b, m):
        return cpp.multi_tower_interpolate([a, b, m.flatten(2).transpose(1, 2)], [(3, 5), (2, 2), (7, 4)], (5, 4))

    assert torch.autograd.gradcheck(fn, xs)


def test_interpolate_opcheck():
    feats = [torch.randn(2, 15, 3, requires_grad=True), torch.randn(2, 49, 4, requires_grad=True)]
    torch.library.opcheck(torch.ops.cambrian.multi_tower_interpolate.default, (feats, [3, 5, 7, 7], [5, 4]))
    g = torch.randn(2, 20, 7)
    torch.library.opcheck(torch.ops.cambrian.multi_tower_interpolate_backward.default, (g, [3, 5, 7, 7], [5, 4], [3, 4]))


# ---------------------------------------------------------------------------------------------------
# multi_tower_interpolate_add_ (in-place accumulate variant)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("batch", [1, 3])
def test_interpolate_add_equals_add_of_f_interpolate(batch, dtype):
    """out += resize: the exact numbers of out.add_(F.interpolate result) for token-major, planar, same-size and
    odd-shaped grids, into a contiguous out and into a channel slice of a wider tensor."""
    torch.manual_seed(0)
    sizes = [(27, 27), (5, 9), (3, 5), (16, 16), (8, 8), (1, 1)]
    chans = [19, 3, 33, 7, 5, 2]
    grids = [torch.randn(batch, h * w, c, dtype=dtype) for (h, w), c in zip(sizes, chans)]
    feats = [grids[0], grids[1], planar(grids[2], sizes[2]), planar(grids[3], sizes[3]), grids[4], grids[5]]
    dst = (8, 8)
    resized = torch.cat([f if s == dst else f_interpolate_tokens(f, s, dst) for f, s in zip(feats, sizes)], dim=-1)
    for wide in (False, True):
        base = torch.randn(batch, 64, sum(chans) + (6 if wide else 0), dtype=dtype)
        out = base[..., 2:2 + sum(chans)] if wide else base.clone()
        edges = [base[..., :2].clone(), base[..., 2 + sum(chans):].clone()]
        want = out.clone().add_(resized)
        got = cpp.multi_tower_interpolate_add_(out, feats, sizes, dst)
        assert got is out
        if dtype == torch.float64:
            torch.testing.assert_close(out, want, rtol=1e-14, atol=1e-14)
        else:
            assert_same(out, want)
        if wide:  # the channels around the slice are untouched
            assert torch.equal(base[..., :2], edges[0]) and torch.equal(base[..., 2 + sum(chans):], edges[1])
        # the public op (dispatched to cpp) and the reference backend agree
        again = want.clone() - resized
        kernels.multi_tower_interpolate_add_(again, feats, sizes, dst)
        ref = reference.multi_tower_interpolate_add_(want.clone() - resized, feats, sizes, dst)
        tol = dict(rtol=1e-6, atol=1e-6) if dtype in (torch.float32, torch.float64) else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(again, ref, **tol)


def test_interpolate_add_mixed_dtypes_and_validation():
    x = torch.randn(2, 9, 4, dtype=torch.bfloat16)
    out = torch.randn(2, 16, 4)
    want = out.clone().add_(reference.multi_tower_interpolate([x], [(3, 3)], (4, 4)))
    cpp.multi_tower_interpolate_add_(out, [x], [(3, 3)], (4, 4))   # falls back to out.add_(resize)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="out must be a float tensor of shape"):
        kernels.multi_tower_interpolate_add_(torch.empty(2, 16, 5), [x], [(3, 3)], (4, 4))
    with pytest.raises(RuntimeError, match="out has shape"):
        torch.ops.cambrian.multi_tower_interpolate_accumulate_(torch.empty(2, 15, 4), [x.float()], [3, 3], [4, 4])
    with pytest.raises(RuntimeError, match="differs from out"):
        torch.ops.cambrian.multi_tower_interpolate_accumulate_(torch.empty(2, 16, 4), [x], [3, 3], [4, 4])


@pytest.mark.parametrize("batch", [1, 2])
def test_interpolate_add_backward_equals_reference(batch):
    """Autograd through the in-place op (out a non-leaf, grids token-major and planar) == the reference's add_."""
    torch.manual_seed(1)
    sizes = [(7, 5), (16, 16), (6, 10)]
    base = [torch.randn(batch, h * w, c) for (h, w), c in zip(sizes, [3, 17, 1])]
    start = torch.randn(batch, 12 * 10, 21)
    g = torch.randn(batch, 12 * 10, 21)

    def run(fn):
        leaves = [x.clone().requires_grad_(True) for x in [start, *base]]
        feats = [leaves[1], planar(leaves[2], sizes[1]), leaves[3]]
        out = fn(leaves[0] * 2.0, feats, sizes, (12, 10))
        (out * g).sum().backward()
        return out.detach(), [leaf.grad for leaf in leaves]

    got, got_g = run(cpp.multi_tower_interpolate_add_)
    want, want_g = run(reference.multi_tower_interpolate_add_)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_interpolate_add_gradcheck_float64():
    xs = [torch.randn(2, 20, 14, dtype=torch.float64, requires_grad=True),
          torch.randn(2, 15, 3, dtype=torch.float64, requires_grad=True),
          torch.randn(2, 4, 2, dtype=torch.float64, requires_grad=True),
          torch.randn(2, 9, 7, 4, dtype=torch.float64, requires_grad=True)]  # planar (B, C, h, w) map

    def fn(out, a, b, m):
        return cpp.multi_tower_interpolate_add_(out.clone(), [a, b, m.flatten(2).transpose(1, 2)],
                                                [(3, 5), (2, 2), (7, 4)], (5, 4))

    assert torch.autograd.gradcheck(fn, xs)


def test_interpolate_add_opcheck():
    out = torch.randn(2, 20, 7)
    feats = [torch.randn(2, 15, 3), torch.randn(2, 49, 4)]
    torch.library.opcheck(torch.ops.cambrian.multi_tower_interpolate_accumulate_.default,
                          (out, feats, [3, 5, 7, 7], [5, 4]))


# ---------------------------------------------------------------------------------------------------
# window_pos_layer_norm
# ---------------------------------------------------------------------------------------------------
def pos_layer_norm_f64(grid, pos, r, eps=1e-5):
    """The definition in float64: the sum rounded to grid's dtype (as a separate add), then LayerNorm."""
    b, n, _, c = grid.shape
    t = grid
    if pos is not None:
        t = (grid.reshape(b, n // r, r, n // r, r, c) + pos.view(1, 1, r, 1, r, c)).reshape(b, n, n, c)
    return F.layer_norm(t.double(), (c,), eps=eps)


PLN_CASES = [(1, 8, 2, 5), (2, 12, 4, 33), (3, 6, 1, 17), (2, 10, 5, 1024), (1, 3, 3, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", PLN_CASES, ids=[f"b{b}n{n}r{r}c{c}" for b, n, r, c in PLN_CASES])
def test_window_pos_layer_norm_forward(case, dtype):
    """Against float64 LayerNorm of the rounded sum: within the reference backend's own error (+ tiny atol);
    with and without pos, contiguous and strided grids, functional and out= forms."""
    b, n, r, c = case
    torch.manual_seed(0)
    grid = (torch.randn(b, n, n, c, dtype=torch.float64) * 3 + 1).to(dtype)
    pos = torch.randn(r * r, c, dtype=dtype)
    strided = torch.randn(b, n, n, 2 * c, dtype=dtype)[..., ::2]
    strided.copy_(grid)
    atol = {torch.float32: 1e-6, torch.float64: 1e-12}.get(dtype, 1e-2)
    for g in (grid, strided):
        for p in (pos, None):
            truth = pos_layer_norm_f64(g, p, r)
            got = cpp.window_pos_layer_norm(g, p, r, 1e-5)
            ref = reference.window_pos_layer_norm(g, p, r, 1e-5)
            assert got.dtype == dtype and got.shape == g.shape and got.is_contiguous()
            err, ref_err = (got.double() - truth).abs().max().item(), (ref.double() - truth).abs().max().item()
            assert err <= 2 * ref_err + atol, (err, ref_err)
            out = torch.full_like(grid, float("nan"))
            assert kernels.window_pos_layer_norm(g, p, r, 1e-5, out=out) is out
            assert torch.equal(out, got)


@pytest.mark.parametrize("batch", [1, 3])
def test_window_pos_layer_norm_backward_equals_reference(batch):
    torch.manual_seed(1)
    grid = torch.randn(batch, 12, 12, 40) * 2 - 1
    pos = torch.randn(9, 40)
    g = torch.randn(batch, 12, 12, 40)

    def grads(fn, p):
        leaves = [grid.clone().requires_grad_(True)] + ([p.clone().requires_grad_(True)] if p is not None else [])
        y = fn(leaves[0] * 1.5, leaves[1] if p is not None else None, 3, 1e-5)
        (y * g).sum().backward()
        return y.detach(), [leaf.grad for leaf in leaves]

    for p in (pos, None):
        got, got_g = grads(cpp.window_pos_layer_norm, p)
        want, want_g = grads(reference.window_pos_layer_norm, p)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(got_g, want_g):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_window_pos_layer_norm_gradcheck_float64():
    grid = torch.randn(2, 6, 6, 5, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, p: cpp.window_pos_layer_norm(a, p, 2, 1e-5), (grid, pos))
    assert torch.autograd.gradcheck(lambda a: cpp.window_pos_layer_norm(a, None, 2, 1e-5), (grid,))


def test_window_pos_layer_norm_opcheck_and_validation():
    grid, pos = torch.randn(2, 6, 6, 5, requires_grad=True), torch.randn(9, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.cambrian.window_pos_layer_norm.default, (grid, pos, 3, 1e-5))
    torch.library.opcheck(torch.ops.cambrian.window_pos_layer_norm_out_.default,
                          (torch.empty(2, 6, 6, 5), grid.detach(), pos.detach(), 3, 1e-5))
    with pytest.raises(ValueError, match="does not divide"):
        kernels.window_pos_layer_norm(grid, pos, 4)
    with pytest.raises(ValueError, match="pos must be"):
        kernels.window_pos_layer_norm(grid, pos.double(), 3)
    with pytest.raises(ValueError, match="does not support autograd"):
        kernels.window_pos_layer_norm(grid, pos, 3, out=torch.empty(2, 6, 6, 5))
    with torch.no_grad():
        with pytest.raises(ValueError, match="out must be a contiguous"):
            kernels.window_pos_layer_norm(grid, pos, 3, out=torch.empty(2, 6, 5, 6).transpose(2, 3))
        with pytest.raises(ValueError, match="must not be the grid"):
            kernels.window_pos_layer_norm(grid, pos, 3, out=grid)
    with pytest.raises(RuntimeError, match="pos must be"):
        torch.ops.cambrian.window_pos_layer_norm(grid.detach(), torch.randn(4, 5), 3, 1e-5)


# ---------------------------------------------------------------------------------------------------
# sva_window_attention
# ---------------------------------------------------------------------------------------------------
def attention_f64(q, keys, values, heads, s, offsets=None, rects=None, masks=None, scale=None):
    """The contract, in float64, by gathering windows with index tensors (independent of both backends)."""
    b, h, w, dim = q.shape
    d = dim // heads
    scale = d ** -0.5 if scale is None else scale
    off = torch.zeros(b, 2, dtype=torch.long) if offsets is None else torch.as_tensor(offsets).reshape(b, 2)
    bi = torch.arange(b)[:, None, None, None, None]
    logits, vals = [], []
    for i, (k, v) in enumerate(zip(keys, values)):
        r = k.shape[1] // s
        dr = torch.arange(r)
        gy = ((off[:, 0, None] + torch.arange(h)) * r)[:, :, None, None, None] + dr[:, None]   # (b, h, 1, r, 1)
        gx = ((off[:, 1, None] + torch.arange(w)) * r)[:, None, :, None, None] + dr          # (b, 1, w, 1, r)
        kw = k.double()[bi, gy, gx].reshape(b, h, w, r * r, heads, d)
        vw = v.double()[bi, gy, gx].reshape(b, h, w, r * r, heads, d)
        li = torch.einsum("byxhe,byxkhe->byxhk", q.double().reshape(b, h, w, heads, d) * scale, kw)
        valid = None
        if rects is not None:
            rc = torch.as_tensor(rects[i])[:, :, None, None, None, None]
            valid = (gy >= rc[:, 0]) & (gy < rc[:, 1]) & (gx >= rc[:, 2]) & (gx < rc[:, 3])
        elif masks is not None:
            valid = masks[i][bi, gy, gx]
        if valid is not None:
            valid = valid.expand(b, h, w, r, r).reshape(b, h, w, r * r)
            valid = valid | ~valid.any(-1, keepdim=True)
            li = li.masked_fill(~valid[:, :, :, None, :], float("-inf"))
        logits.append(li)
        vals.append(vw)
    p = torch.softmax(torch.cat(logits, -1), -1)
    out = torch.einsum("byxhk,byxkhe->byxhe", p, torch.cat(vals, 3))
    return out.reshape(b, h, w, dim)


def make_case(b, s, sides, heads, d, dtype=torch.float32, validity=None, sub=None, seed=0):
    """Random q/k/v plus keyword arguments (validity: None | 'rects' | 'masks'; sub: query sub-rectangle)."""
    g = torch.Generator().manual_seed(seed)
    dim = heads * d
    keys = [torch.randn(b, n, n, dim, generator=g).to(dtype) for n in sides]
    values = [torch.randn(b, n, n, dim, generator=g).to(dtype) for n in sides]
    kw = {}
    hq = wq = s
    if sub is not None:
        hq, wq = sub
        kw["query_offsets"] = torch.tensor([[(i * 2) % (s - hq + 1), (i * 3 + 1) % (s - wq + 1)] for i in range(b)])
    q = torch.randn(b, hq, wq, dim, generator=g).to(dtype)
    image_sizes = [(100, 70), (30, 64), (512, 512), (640, 200)][:b]
    if validity is not None:
        rects = [kernels.image_valid_rects(image_sizes, n) for n in sides]
        kw["valid_rects" if validity == "rects" else "masks"] = (
            rects if validity == "rects" else [kernels.rects_to_mask(r, n) for r, n in zip(rects, sides)])
    return q, keys, values, kw


CASES = [  # (batch, s, tower sides, heads, head_dim, validity, query sub-rectangle)
    (2, 2, (4, 8), 16, 4, "rects", None),        # r = 2, 4; some windows fully invalid
    (3, 4, (4, 8, 16), 4, 8, "masks", None),     # r = 1, 2, 4
    (1, 1, (1, 3), 2, 3, None, None),            # one window, heads*d = 6
    (3, 3, (3, 9), 3, 5, "rects", (2, 2)),       # r = 1, 3; odd head_dim; sub-rectangle of queries
    (1, 7, (7, 14), 1, 17, "masks", (3, 5)),     # grid side 7, one head, non-square query grid
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[f"b{c[0]}s{c[1]}r{'-'.join(str(n // c[1]) for n in c[2])}" for c in CASES])
def test_attention_forward_backward_vs_float64(case, dtype):
    b, s, sides, heads, d, validity, sub = case
    q, keys, values, kw = make_case(b, s, sides, heads, d, dtype, validity, sub)
    g = torch.randn(q.shape, dtype=torch.float64)

    def run(fn, tensors):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        t = len(keys)
        out = fn(leaves[0], leaves[1:1 + t], leaves[1 + t:])
        grads = torch.autograd.grad((out.double() * g).sum(), leaves)
        return out, grads

    tensors = [q, *keys, *values]
    truth = run(lambda q_, k_, v_: attention_f64(q_, k_, v_, heads, s, kw.get("query_offsets"),
                                                 kw.get("valid_rects"), kw.get("masks")),
                [t.double() for t in tensors])
    got = run(lambda q_, k_, v_: cpp.sva_window_attention(q_, k_, v_, num_heads=heads, grid_side=s, **kw), tensors)
    ref = run(lambda q_, k_, v_: reference.sva_window_attention(q_, k_, v_, num_heads=heads, grid_side=s, **kw),
              tensors)
    atol = 1e-6 if dtype == torch.float32 else 2e-3
    assert got[0].dtype == dtype and got[0].shape == q.shape
    for name, c, r, t in [("out", got[0], ref[0], truth[0])] + [
            (f"grad{i}", gc, gr, gt) for i, (gc, gr, gt) in enumerate(zip(got[1], ref[1], truth[1]))]:
        err, ref_err = (c.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
        assert err <= 2 * ref_err + atol, f"{name}: kernel error {err:.3g} vs reference error {ref_err:.3g}"
    if sub is not None:  # windows outside the query rectangle get exactly zero gradient
        assert got[1][1].abs().sum() > 0


def test_attention_float64_truth_matches_reference():
    """The float64 truth above is itself the contract: it agrees with the reference backend."""
    q, keys, values, kw = make_case(2, 3, (3, 9), 3, 5, validity="masks", sub=(2, 3))
    torch.testing.assert_close(attention_f64(q, keys, values, 3, 3, kw["query_offsets"], masks=kw["masks"]).float(),
                               reference.sva_window_attention(q, keys, values, num_heads=3, grid_side=3, **kw),
                               rtol=1e-5, atol=1e-5)


def test_attention_all_invalid_windows_become_valid():
    q, keys, values, _ = make_case(2, 2, (2, 8), 4, 4)
    free = cpp.sva_window_attention(q, keys, values, num_heads=4, grid_side=2)
    empty = [torch.zeros(2, 4, dtype=torch.long)] * 2
    assert torch.equal(cpp.sva_window_attention(q, keys, values, num_heads=4, grid_side=2, valid_rects=empty), free)
    rects = [torch.tensor([[0, 2, 0, 2]] * 2), torch.tensor([[5, 8, 0, 8]] * 2)]  # window row 0 of tower 1 empty
    out = cpp.sva_window_attention(q, keys, values, num_heads=4, grid_side=2, valid_rects=rects)
    assert torch.equal(out[:, 0], free[:, 0]) and not torch.allclose(out[:, 1], free[:, 1])
    masks = [kernels.rects_to_mask(r, n) for r, n in zip(rects, (2, 8))]
    assert torch.equal(cpp.sva_window_attention(q, keys, values, num_heads=4, grid_side=2, masks=masks), out)


def test_attention_gradcheck_float64():
    for validity, sub in [("rects", None), ("masks", (2, 1)), (None, None)]:
        q, keys, values, kw = make_case(2, 2, (2, 4), 2, 3, torch.float64, validity, sub)
        t = len(keys)
        leaves = [x.requires_grad_(True) for x in (q, *keys, *values)]

        def fn(*xs):
            return cpp.sva_window_attention(xs[0], xs[1:1 + t], xs[1 + t:], num_heads=2, grid_side=2, scale=0.7, **kw)

        assert torch.autograd.gradcheck(fn, leaves)


def test_attention_autograd_only_where_needed():
    """The C++ autograd node is recorded only when some input needs a gradient, and then only those inputs get one
    (here only the value grids): the same values as with every input requiring one, and the reference backend's
    (which computes in float32) to float32 rounding."""
    q, keys, values, kw = make_case(2, 2, (2, 4), 2, 3, torch.float64, "rects", None)
    assert cpp.sva_window_attention(q, keys, values, num_heads=2, grid_side=2, **kw).grad_fn is None
    leaves = [v.clone().requires_grad_(True) for v in values]
    with torch.no_grad():
        assert cpp.sva_window_attention(q, keys, leaves, num_heads=2, grid_side=2, **kw).grad_fn is None
    out = cpp.sva_window_attention(q, keys, leaves, num_heads=2, grid_side=2, **kw)
    assert out.grad_fn is not None
    got = torch.autograd.grad(out.square().sum(), leaves)
    every = [x.clone().requires_grad_(True) for x in (q, *keys, *values)]
    t = len(keys)
    out_all = cpp.sva_window_attention(every[0], every[1:1 + t], every[1 + t:], num_heads=2, grid_side=2, **kw)
    want = torch.autograd.grad(out_all.square().sum(), every)[1 + t:]
    ref_leaves = [v.clone().requires_grad_(True) for v in values]
    ref_out = reference.sva_window_attention(q, keys, ref_leaves, num_heads=2, grid_side=2, **kw)
    ref = torch.autograd.grad(ref_out.square().sum(), ref_leaves)
    for a, b, r in zip(got, want, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, r.to(a.dtype), rtol=1e-5, atol=1e-5)


def test_attention_opcheck():
    q, keys, values, kw = make_case(2, 2, (2, 4), 2, 3, validity="rects", sub=(1, 2))
    rects = torch.stack(kw["valid_rects"])
    leaves = [x.requires_grad_(True) for x in (q, *keys, *values)]
    args = (leaves[0], leaves[1:3], leaves[3:], 2, 2, kw["query_offsets"], rects, None, 0.5)
    torch.library.opcheck(torch.ops.cambrian.sva_window_attention.default, args)
    q, keys, values, kw = make_case(1, 2, (2, 4), 2, 3, validity="masks")
    mask = torch.cat([m.reshape(1, -1) for m in kw["masks"]], 1)
    torch.library.opcheck(torch.ops.cambrian.sva_window_attention.default,
                          (q, keys, values, 2, 2, None, None, mask, 0.5))
    out, lse = torch.ops.cambrian.sva_window_attention(q, keys, values, 2, 2, None, None, mask, 0.5)
    torch.library.opcheck(torch.ops.cambrian.sva_window_attention_backward.default,
                          (torch.randn_like(out), q, keys, values, lse, 2, 2, None, None, mask, 0.5))


def test_torch_compile_sees_the_ops():
    q, keys, values, kw = make_case(1, 2, (2, 4), 2, 4, validity="rects")

    def fn(q, k0, k1, v0, v1, x):
        a = cpp.sva_window_attention(q, [k0, k1], [v0, v1], num_heads=2, grid_side=2, **kw)
        return a.sum() + cpp.multi_tower_interpolate([x], [(3, 3)], (2, 2)).sum()

    args = [t.requires_grad_(True) for t in (q, *keys, *values, torch.randn(1, 9, 3))]
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), fn(*args))
    g1 = torch.autograd.grad(compiled(*args), args)
    g2 = torch.autograd.grad(fn(*args), args)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------
# dispatch, connector, ISA variants, benchmark smoke test
# ---------------------------------------------------------------------------------------------------
def test_forced_cpp_backend(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "cpp")
    assert kernels.get_backend("sva_window_attention", "cpu") is cpp
    assert kernels.get_backend("multi_tower_interpolate", "cpu") is cpp
    q, keys, values, kw = make_case(2, 2, (4, 8), 16, 4, validity="rects")
    torch.testing.assert_close(kernels.sva_window_attention(q, keys, values, num_heads=16, grid_side=2, **kw),
                               reference.sva_window_attention(q, keys, values, num_heads=16, grid_side=2, **kw),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(kernels.KernelBackendError, match="does not implement sva_window_attention on device type 'meta'"):
        kernels.get_backend("sva_window_attention", "meta")


def _tiny_connector():
    from cambrian.model.connector import build_connector
    cfg = dict(mm_projector_type="sva", hidden_size=48, vision_hidden_size=64,
               mm_vision_tower_aux_list=["tower_a", "tower_b"], mm_vision_tower_aux_token_len_list=[16, 64],
               image_token_len=16, num_query_group=1, query_num_list=[16], connector_depth=2,
               connector_only=False, num_of_vision_sampler_layers=2)
    torch.manual_seed(3)
    conn = build_connector(cfg, [8, 12])
    with torch.no_grad():
        for p in conn.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return conn


@pytest.mark.parametrize("training", [False, True])
def test_connector_cpp_equals_reference(monkeypatch, training):
    conn = _tiny_connector().train(training)
    feats = [torch.randn(2, 16, 8), torch.randn(2, 64, 12)]
    sizes = [(100, 70), (30, 64)]
    hidden = torch.randn(2, 40, 48)
    results = {}
    for backend in ("reference", "cpp"):
        monkeypatch.setenv(kernels.ENV_VAR, backend)
        conn.zero_grad()
        out = conn(feats, image_sizes=sizes, keep_full_grid=training)
        tokens = torch.cat(out.image_tokens)
        h = conn.apply_sampler_layer(0, hidden, [1, (1, 20)] if not training else [0, 1], out)
        (tokens.square().sum() + h.square().sum()).backward()
        results[backend] = (tokens.detach(), h.detach(), [p.grad.clone() for p in conn.parameters() if p.grad is not None])
    (t_ref, h_ref, g_ref), (t_cpp, h_cpp, g_cpp) = results["reference"], results["cpp"]
    torch.testing.assert_close(t_cpp, t_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_cpp, h_ref, rtol=1e-5, atol=1e-5)
    assert len(g_cpp) == len(g_ref) > 0
    for a, b in zip(g_cpp, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_isa_variants_agree():
    from cambrian.kernels import _C
    isas = [name for name in ("base", "avx2", "avx512") if _C.cpu_supports(name)]
    x = torch.randn(2, 27 * 27, 37)
    q, keys, values, kw = make_case(2, 2, (4, 8), 4, 8, validity="rects")
    default = _C.isa()
    results = []
    try:
        for name in isas:
            _C.set_isa(name)
            assert cpp.isa() == name
            results.append((cpp.multi_tower_interpolate([x, planar(x, (27, 27))], [(27, 27)] * 2, (24, 24)),
                            cpp.sva_window_attention(q, keys, values, num_heads=4, grid_side=2, **kw)))
    finally:
        _C.set_isa(default)
    for interp, attn in results[1:]:
        assert torch.equal(interp, results[0][0])  # the ATen formulas are explicit, so bit-identical
        torch.testing.assert_close(attn, results[0][1], rtol=1e-6, atol=1e-6)


def test_kernel_time_counter_covers_every_kernel():
    """_C.kernel_time_ns (what bench_kernels.py reports as kernel time) advances on every op's kernel launch,
    and not on a call that launches none (the same-grid copy path of the resize)."""
    from cambrian.kernels import _C
    x = torch.randn(1, 9 * 9, 40, requires_grad=True)
    grid = torch.randn(1, 4, 4, 24)
    q, keys, values, kw = make_case(1, 2, (4, 8), 4, 8, validity="rects")
    for t in (q, *keys, *values):
        t.requires_grad_(True)
    calls = {
        "interpolate": lambda: cpp.multi_tower_interpolate([x], [(9, 9)], (7, 5)),
        "interpolate backward": lambda: torch.autograd.grad(cpp.multi_tower_interpolate([x], [(9, 9)], (7, 5)).sum(), x),
        "pos layer norm": lambda: cpp.window_pos_layer_norm(grid, torch.randn(4, 24), 2, 1e-6),
        "attention": lambda: cpp.sva_window_attention(q, keys, values, num_heads=4, grid_side=2, **kw),
        "attention backward": lambda: torch.autograd.grad(
            cpp.sva_window_attention(q, keys, values, num_heads=4, grid_side=2, **kw).sum(), [q, *keys, *values]),
    }
    for name, call in calls.items():
        before = _C.kernel_time_ns()
        call()
        assert _C.kernel_time_ns() > before, name
    before = _C.kernel_time_ns()
    same = cpp.multi_tower_interpolate([x.detach()], [(9, 9)], (9, 9))  # already on the grid: a copy, no kernel
    assert _C.kernel_time_ns() == before and torch.equal(same, x.detach())


def test_benchmark_quick_writes_json(tmp_path):
    out = tmp_path / "kernels.json"
    # one thread: small shapes, and robust against a busy machine (never asserts on time)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--quick", "--threads", "1",
                           "--max-reps", "2", "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["copy_bandwidth_gbps"] > 0 and data["rows"]
    for row in data["rows"]:
        for key in ("cpp_ms", "reference_ms", "speedup", "floor_ms", "cpp_over_floor", "bytes_moved",
                    "cpp_peak_mb", "reference_peak_mb", "cpp_kernel_ms", "kernel_over_floor", "fixed_overhead_ms"):
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["cpp_kernel_ms"] <= row["cpp_ms"]  # the kernel bodies are part of the call
    chart = out.with_suffix(".png")  # written beside the JSON by default
    if importlib.util.find_spec("matplotlib") is None:  # pinned in requirements.txt, so normally present
        assert "matplotlib is not installed" in proc.stdout and not chart.exists()
    else:
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 10_000
