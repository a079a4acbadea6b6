"""Triton backend: numbers under the interpreter, and ahead-of-time compilation for sm_80 / sm_90.

The interpreter (TRITON_INTERPRET=1, set by conftest.py) runs the kernels on CPU tensors.  Checks:
* against the reference backend (forward and backward), and
* against float64 truths written independently here (flash-attention's rule: the kernel's error is at
  most twice the error of the same-dtype reference, plus a small atol),
over odd shapes (grid sides 1, 3, 7, 9 -> 8, non-square, r = 1 and > 1, batch 1 and 3, channel and
head sizes that are not multiples of the blocks), rectangles, explicit masks, all-invalid windows and
query sub-rectangles.  The interpreter's float32 -> bfloat16 cast truncates instead of rounding, so
bf16 is only checked to within one bf16 ulp of the reference.

The interpreter misses what only the compiler sees (type errors, unsupported constructs, register
tiling), so one test compiles every kernel with `triton.compile` for GPUTarget("cuda", 80/90, 32) in a
subprocess without TRITON_INTERPRET, using Triton's bundled ptxas, and checks PTX and cubin appear.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from cambrian import kernels
from cambrian.kernels import reference
from cambrian.kernels import triton_kernels as tk

pytestmark = pytest.mark.skipif(not (tk.is_available() and tk.supports("sva_window_attention", "cpu")),
                                reason="needs the Triton interpreter (TRITON_INTERPRET=1 before import)")

def assert_within_2x(got: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, what: str = "") -> None:
    """max|got - truth| <= 2 * max|ref - truth| + atol, ref = the same-dtype reference backend.

    atol = four ulps of the largest true value: the reference and the kernel sum in different orders
    (BLAS einsum vs. an online softmax; the backward's softmax correction from dO.O as in
    flash-attention vs. autograd's sum(p * dp)), which alone moves float32 results by a few ulps.
    """
    err = (got.double() - truth).abs().max().item()
    ref_err = (ref.double() - truth).abs().max().item()
    atol = 4 * torch.finfo(got.dtype).eps * truth.abs().max().item()
    assert err <= 2 * ref_err + atol, f"{what}: kernel error {err:.3g} > 2 x reference error {ref_err:.3g} + {atol:.3g}"


def assert_close_to(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    tol = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}[dtype]
    torch.testing.assert_close(got, want, rtol=tol[0], atol=tol[1], msg=lambda m: f"{what}: {m}")


def within_one_bf16_ulp(got: torch.Tensor, want: torch.Tensor) -> bool:
    ulp = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return bool(((got.float() - want.float()).abs() <= ulp * 1.001).all())


@pytest.fixture
def gpu_blocks(monkeypatch):
    """Run with the GPU tile shapes (autotuned: one query per program, small channel blocks) instead of big
    ones; the autotuners start with empty caches, so they tune (with the CPU benchmarker) in the test."""
    monkeypatch.setattr(tk, "_BIG_BLOCKS", False)
    for tuner in tk.TUNED.values():
        tuner.cache.clear()


# ---------------------------------------------------------------------------------------------------
# availability and dispatch
# ---------------------------------------------------------------------------------------------------
def test_available_under_interpreter_and_dispatch(monkeypatch):
    assert tk.is_available()
    assert tk.supports("multi_tower_interpolate", "cpu") and tk.supports("sva_window_attention", "cpu")
    assert not tk.supports("no_such_op", "cpu")
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    assert kernels.get_backend("sva_window_attention", "cpu") is tk
    x = torch.randn(1, 9, 3)
    assert torch.equal(kernels.multi_tower_interpolate([x], [(3, 3)], (2, 2)),
                       reference.multi_tower_interpolate([x], [(3, 3)], (2, 2)))
    monkeypatch.delenv(kernels.ENV_VAR)
    assert kernels.get_backend("sva_window_attention", "cpu") is not tk  # not a default on CPU


# ---------------------------------------------------------------------------------------------------
# multi_tower_interpolate
# ---------------------------------------------------------------------------------------------------
def interpolate64(x: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """float64 truth: F.interpolate on the (B, C, h, w) layout."""
    b, _, c = x.shape
    conv = x.double().reshape(b, *src, c).permute(0, 3, 1, 2)
    y = F.interpolate(conv, size=dst, mode="bilinear", align_corners=False, antialias=False)
    return y.permute(0, 2, 3, 1).reshape(b, dst[0] * dst[1], c)


SIZES = [((1, 1), (4, 4)), ((3, 3), (7, 7)), ((7, 7), (3, 3)), ((9, 9), (8, 8)), ((9, 6), (8, 5)),
         ((3, 5), (8, 12))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("src,dst", SIZES)
def test_interpolate_forward_backward(src, dst, batch, dtype):
    # two grids: a resized one with 37 channels (not a block multiple) and one already at dst (copied)
    x = (torch.randn(batch, src[0] * src[1], 37) * 2).to(dtype).requires_grad_(True)
    y = torch.randn(batch, dst[0] * dst[1], 5).to(dtype).requires_grad_(True)
    args = ([(src[0], src[1]), (dst[0], dst[1])], dst)
    got = tk.multi_tower_interpolate([x, y], *args)
    want = reference.multi_tower_interpolate([x, y], *args)
    assert got.shape == (batch, dst[0] * dst[1], 42) and got.dtype == dtype
    # same taps, same float32 sums, no FMA: identical numbers (also after the cast to float16)
    assert torch.equal(got, want)
    assert torch.equal(got[..., 37:], y)
    assert_within_2x(got[..., :37], want[..., :37], interpolate64(x, src, dst), "forward")

    grad = torch.randn_like(got)
    gx, gy = torch.autograd.grad((got.float() * grad.float()).sum(), [x, y])
    rx, _ = torch.autograd.grad((want.float() * grad.float()).sum(), [x, y])
    x64 = x.detach().double().requires_grad_(True)
    (tx,) = torch.autograd.grad((interpolate64(x64, src, dst) * grad[..., :37].double()).sum(), [x64])
    assert gx.dtype == dtype and gy.dtype == dtype
    assert torch.equal(gy, grad[..., 37:])  # the copied grid passes its gradient through unchanged
    assert_close_to(gx, rx, dtype, "backward vs reference")
    assert_within_2x(gx, rx, tx, "backward")


def test_interpolate_many_blocks_gpu_tiling(gpu_blocks):
    """Several pixel and channel blocks per grid (GPU tile sizes), three grids written into one output."""
    a = torch.randn(3, 9 * 9, 300, requires_grad=True)
    b = torch.randn(3, 8 * 8, 7, requires_grad=True)
    c = torch.randn(3, 3 * 3, 129, requires_grad=True)
    sizes, dst = [(9, 9), (8, 8), (3, 3)], (8, 8)
    got = tk.multi_tower_interpolate([a, b, c], sizes, dst)
    want = reference.multi_tower_interpolate([a, b, c], sizes, dst)
    assert torch.equal(got, want)
    grad = torch.randn_like(got)
    for g, r in zip(torch.autograd.grad((got * grad).sum(), [a, b, c]),
                    torch.autograd.grad((want * grad).sum(), [a, b, c])):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_autotuned_launch_benchmarks_candidates_on_the_cpu(gpu_blocks):
    """GPU launches go through triton.autotune; under the interpreter it times its candidates with the CPU
    benchmarker (Triton's own needs CUDA events), keeps the fastest per key, and reuses it."""
    x = torch.randn(2, 7 * 5, 40)
    got = tk.multi_tower_interpolate([x], [(7, 5)], (4, 6))
    assert torch.equal(got, reference.multi_tower_interpolate([x], [(7, 5)], (4, 6)))
    tuner = tk.TUNED["interp_fwd"]
    assert len(tuner.cache) == 1
    timings = tuner.configs_timings
    assert len(timings) == tk._INTERPRETED_CANDIDATES
    assert all(len(t) == 3 and 0 < t[0] < float("inf") for t in timings.values())
    best = next(iter(tuner.cache.values()))
    assert best is min(timings, key=timings.get) and best.kwargs["BLOCK_C"] <= 64
    tk.multi_tower_interpolate([x], [(7, 5)], (4, 6))
    assert len(tuner.cache) == 1  # same key: no new tuning
    assert tk._cpu_do_bench(lambda: None, quantiles=(0.5, 0.2, 0.8))[0] >= 0


def test_autotune_candidates_fit_the_problem(monkeypatch):
    """On a GPU: resize tiles no wider than the channels (rounded up to a power of two, at least 16); head blocks
    from all heads (at most 2048 channels) down to a quarter, with 4 and 8 warps."""
    monkeypatch.setattr(tk, "_INTERPRET", False)  # the GPU candidate lists, not the interpreter's subset
    wide = tk._prune_interp(tk.INTERP_CONFIGS, {"C": 1152})
    assert len(wide) == len(tk.INTERP_CONFIGS)
    narrow = tk._prune_interp(tk.INTERP_CONFIGS, {"C": 7})
    assert [c.kwargs["BLOCK_C"] for c in narrow] == [16]
    assert {c.kwargs["BLOCK_C"] for c in tk._prune_interp(tk.INTERP_CONFIGS, {"C": 100})} == {16, 32, 64, 128}
    heads = tk._prune_sva(tk.SVA_CONFIGS, {"heads": 16}, BLOCK_D=64)
    assert sorted((c.kwargs["BLOCK_H"], c.num_warps) for c in heads) == [(h, w) for h in (4, 8, 16) for w in (4, 8)]
    assert all(c.kwargs["BLOCK_Q"] == 1 for c in heads)
    few = tk._prune_sva(tk.SVA_CONFIGS, {"heads": 3}, BLOCK_D=128)
    assert sorted({c.kwargs["BLOCK_H"] for c in few}) == [1, 2, 4]


def test_interpolate_reads_strided_views_in_place():
    """The transposed view of a (B, C, h, w) map (token stride 1) and a channel slice are read as they are."""
    conv = torch.randn(2, 6, 7, 5, requires_grad=True)
    wide = torch.randn(2, 9, 20)
    grids, sizes = [conv.flatten(2).transpose(1, 2), wide[..., 3:14]], [(7, 5), (3, 3)]
    got = tk.multi_tower_interpolate(grids, sizes, (4, 6))
    assert torch.equal(got, reference.multi_tower_interpolate([g.contiguous() for g in grids], sizes, (4, 6)))
    (g,) = torch.autograd.grad(got[..., :6].sum(), [conv])
    (r,) = torch.autograd.grad(reference.multi_tower_interpolate(grids[:1], sizes[:1], (4, 6)).sum(), [conv])
    torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_interpolate_partial_grads_and_mixed_dtypes():
    """Only some grids need a gradient; a float16 grid joins a float32 output (rounded to fp16 first)."""
    a = torch.randn(2, 16, 6, requires_grad=True)
    b = torch.randn(2, 9, 3).half()
    sizes, dst = [(4, 4), (3, 3)], (5, 7)
    got = tk.multi_tower_interpolate([a, b], sizes, dst)
    assert torch.equal(got, reference.multi_tower_interpolate([a, b], sizes, dst))
    (ga,) = torch.autograd.grad(got.sum(), [a])
    (ra,) = torch.autograd.grad(reference.multi_tower_interpolate([a, b], sizes, dst).sum(), [a])
    torch.testing.assert_close(ga, ra, rtol=1e-5, atol=1e-6)


def test_interpolate_bfloat16_within_one_ulp():
    x = torch.randn(2, 7 * 7, 11).bfloat16()
    got = tk.multi_tower_interpolate([x], [(7, 7)], (9, 4))
    want = reference.multi_tower_interpolate([x], [(7, 7)], (9, 4))
    assert got.dtype == torch.bfloat16 and within_one_bf16_ulp(got, want)


# ---------------------------------------------------------------------------------------------------
# sva_window_attention
# ---------------------------------------------------------------------------------------------------
def window_attention64(q, keys, values, num_heads, s, offsets=None, masks=None):
    """float64 truth, written with permutes (not the reference's advanced indexing): every window as a
    (B, s, s, r*r, C) block, the query grid cut out of the window grid per image."""
    b, h, w, dim = q.shape
    d = dim // num_heads
    offsets = [(0, 0)] * b if offsets is None else [tuple(o) for o in offsets]

    def windows(t: torch.Tensor, r: int) -> torch.Tensor:  # (B, n, n, C) -> (B, h, w, r*r, C) at the queries
        c = t.shape[-1]
        t = t.reshape(b, s, r, s, r, c).permute(0, 1, 3, 2, 4, 5).reshape(b, s, s, r * r, c)
        return torch.stack([t[i, y0:y0 + h, x0:x0 + w] for i, (y0, x0) in enumerate(offsets)])

    ks, vs, oks = [], [], []
    for i, (k, v) in enumerate(zip(keys, values)):
        r = k.shape[1] // s
        ks.append(windows(k.double(), r))
        vs.append(windows(v.double(), r))
        if masks is None:
            ok = torch.ones(b, h, w, r * r, dtype=torch.bool)
        else:
            ok = windows(masks[i][..., None], r)[..., 0]
            ok = ok | ~ok.any(-1, keepdim=True)
        oks.append(ok)
    kk = torch.cat(ks, 3).reshape(b, h, w, -1, num_heads, d)
    vv = torch.cat(vs, 3).reshape(b, h, w, -1, num_heads, d)
    ok = torch.cat(oks, 3)
    logits = torch.einsum("byxhe,byxkhe->byxhk", q.double().reshape(b, h, w, num_heads, d), kk) / d ** 0.5
    logits = logits.masked_fill(~ok[:, :, :, None, :], float("-inf"))
    return torch.einsum("byxhk,byxkhe->byxhe", logits.softmax(-1), vv).reshape(b, h, w, dim)


# (batch, s, tower sides, heads, head_dim, validity, sub-rectangle)
ATTN_CASES = [
    pytest.param(1, 1, (1, 3), 3, 5, "none", None, id="s1-r1,3-b1"),
    pytest.param(3, 3, (3, 9, 6), 4, 4, "rects", None, id="s3-r1,3,2-b3-rects"),
    pytest.param(2, 3, (3, 6), 3, 5, "masks", None, id="s3-r1,2-masks"),
    pytest.param(3, 4, (4, 8, 16), 16, 4, "rects", [(1, 0), (0, 2), (2, 1)], id="s4-r1,2,4-b3-rects-subrect"),
    pytest.param(2, 7, (7,), 2, 8, "masks", [(0, 3), (2, 0)], id="s7-r1-masks-subrect"),
]
IMAGE_SIZES = [(100, 70), (30, 64), (512, 512)]


def make_attention_inputs(batch, s, sides, heads, head_dim, validity, sub, dtype):
    dim = heads * head_dim
    h, w = (s, s) if sub is None else (s - max(o[0] for o in sub), s - max(o[1] for o in sub))
    q = torch.randn(batch, h, w, dim).to(dtype).requires_grad_(True)
    keys = [torch.randn(batch, n, n, dim).to(dtype).requires_grad_(True) for n in sides]
    values = [torch.randn(batch, n, n, dim).to(dtype).requires_grad_(True) for n in sides]
    kw: dict = {"query_offsets": None if sub is None else torch.tensor(sub)}
    masks = None
    if validity == "rects":
        rects = [kernels.image_valid_rects(IMAGE_SIZES[:batch], n) for n in sides]
        masks = [kernels.rects_to_mask(r, n) for r, n in zip(rects, sides)]
        kw["valid_rects"] = rects
    elif validity == "masks":
        masks = [torch.rand(batch, n, n) > 0.5 for n in sides]
        r = sides[-1] // s
        masks[-1][0, :r, :r] = False      # an all-invalid window (-> all valid)
        masks[-1][-1, -r:, :] = False     # a row of them
        kw["masks"] = masks
    return q, keys, values, kw, masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch,s,sides,heads,head_dim,validity,sub", ATTN_CASES)
def test_window_attention_forward_backward(batch, s, sides, heads, head_dim, validity, sub, dtype):
    q, keys, values, kw, masks = make_attention_inputs(batch, s, sides, heads, head_dim, validity, sub, dtype)
    got = tk.sva_window_attention(q, keys, values, num_heads=heads, grid_side=s, **kw)
    want = reference.sva_window_attention(q, keys, values, num_heads=heads, grid_side=s, **kw)
    assert got.shape == q.shape and got.dtype == dtype
    assert_close_to(got, want, dtype, "forward vs reference")

    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, *keys, *values)]
    n = len(keys)
    truth = window_attention64(leaves64[0], leaves64[1:1 + n], leaves64[1 + n:], heads, s, sub, masks)
    assert_within_2x(got, want, truth, "forward")

    leaves = [q, *keys, *values]
    grad = torch.randn_like(got)
    grads = torch.autograd.grad((got.float() * grad.float()).sum(), leaves)
    ref_grads = torch.autograd.grad((want.float() * grad.float()).sum(), leaves)
    true_grads = torch.autograd.grad((truth * grad.double()).sum(), leaves64)
    names = ["q"] + [f"k{i}" for i in range(n)] + [f"v{i}" for i in range(n)]
    for name, g, r, t in zip(names, grads, ref_grads, true_grads):
        assert g.dtype == dtype and g.shape == r.shape
        assert_close_to(g, r, dtype, f"d{name} vs reference")
        assert_within_2x(g, r, t, f"d{name}")
    # keys outside the query sub-rectangle (and masked keys) get exactly zero gradient
    for g, r in zip(grads[1:], ref_grads[1:]):
        assert (g[r == 0] == 0).all()


def test_window_attention_gpu_tiling(gpu_blocks):
    """BLOCK_Q = 1 and head blocks, as launched on a GPU (16 heads x d=64 -> one 1024-wide head block)."""
    q, keys, values, kw, _ = make_attention_inputs(2, 2, (2, 8), 16, 64, "rects", [(0, 1), (1, 0)], torch.float32)
    got = tk.sva_window_attention(q, keys, values, num_heads=16, grid_side=2, **kw)
    want = reference.sva_window_attention(q, keys, values, num_heads=16, grid_side=2, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    leaves = [q, *keys, *values]
    grad = torch.randn_like(got)
    for g, r in zip(torch.autograd.grad((got * grad).sum(), leaves), torch.autograd.grad((want * grad).sum(), leaves)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_window_attention_all_invalid_windows_are_all_valid():
    q, keys, values, _, _ = make_attention_inputs(2, 2, (2, 8), 4, 4, "none", None, torch.float32)
    free = tk.sva_window_attention(q, keys, values, num_heads=4, grid_side=2)
    empty = [torch.zeros(2, 4, dtype=torch.long)] * 2
    assert torch.equal(tk.sva_window_attention(q, keys, values, num_heads=4, grid_side=2, valid_rects=empty), free)
    nothing = [torch.zeros(2, n, n, dtype=torch.bool) for n in (2, 8)]
    assert torch.equal(tk.sva_window_attention(q, keys, values, num_heads=4, grid_side=2, masks=nothing), free)
    # rect and mask forms of the same validity agree
    rects = [kernels.image_valid_rects([(100, 45), (20, 64)], n) for n in (2, 8)]
    masks = [kernels.rects_to_mask(r, n) for r, n in zip(rects, (2, 8))]
    torch.testing.assert_close(tk.sva_window_attention(q, keys, values, num_heads=4, grid_side=2, valid_rects=rects),
                               tk.sva_window_attention(q, keys, values, num_heads=4, grid_side=2, masks=masks),
                               rtol=0, atol=0)


def test_window_attention_bfloat16_within_one_ulp():
    q, keys, values, kw, _ = make_attention_inputs(2, 2, (2, 4), 4, 8, "rects", None, torch.bfloat16)
    got = tk.sva_window_attention(q, keys, values, num_heads=4, grid_side=2, **kw)
    want = reference.sva_window_attention(q, keys, values, num_heads=4, grid_side=2, **kw)
    assert got.dtype == torch.bfloat16
    # the online softmax may land a float32 value on the other side of a bf16 rounding boundary
    assert (got.float() - want.float()).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * want.float().abs().max()


# ---------------------------------------------------------------------------------------------------
# ahead-of-time compilation for real GPUs
# ---------------------------------------------------------------------------------------------------
AOT_SCRIPT = textwrap.dedent('''
    """Compile every Triton kernel of cambrian.kernels.triton_kernels for sm_80 and sm_90 (no GPU needed)."""
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from cambrian.kernels import triton_kernels as tk

    assert not tk._INTERPRET, "TRITON_INTERPRET must be unset for ahead-of-time compilation"
    FLOATS = {"scale", "scale_h", "scale_w", "inv_h", "inv_w"}
    FIXED_PTRS = {"rect_ptr": "*i32", "off_ptr": "*i32", "o32_ptr": "*fp32", "o_ptr": "*fp32", "lse_ptr": "*fp32"}

    def signature(kernel, dtype, num_towers, constexprs):
        """Argument types by name, from the kernel's own parameter list (a renamed or new argument fails here)."""
        sig = {}
        for param in kernel.params:
            name = param.name
            if param.is_constexpr:
                assert name in constexprs, f"{kernel.fn.__name__}: no value for constexpr {name}"
                sig[name] = "constexpr"
            elif name == "mask_ptrs":
                sig[name] = ("*u8",) * num_towers            # bool masks are passed as uint8 views
            elif name.endswith("_ptrs"):
                sig[name] = ("*" + dtype,) * num_towers
            elif name in FIXED_PTRS:
                sig[name] = FIXED_PTRS[name]
            elif name.endswith("_ptr"):
                sig[name] = "*" + dtype
            elif name in FLOATS:
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        return sig

    # the autotuner's candidates for cambrian-8b shapes (SigLIP grid: 1152 channels; 16 heads x 64)
    interp_tiles = tk._prune_interp(tk.INTERP_CONFIGS, {"C": 1152})
    sva_tiles = tk._prune_sva(tk.SVA_CONFIGS, {"heads": 16}, BLOCK_D=64)

    def interp_job(name, dtype, copy, cfg):
        return (name, dtype, 1, dict(cfg.kwargs, COPY=copy), dict(tk.INTERP_OPTIONS, num_warps=cfg.num_warps))

    def sva_job(name, dtype, rs, mode, offsets, cfg):
        const = dict(cfg.kwargs, BLOCK_D=64, RS=rs, NUM_TOWERS=len(rs), MASK_MODE=mode, HAS_OFFSETS=offsets)
        if name == "sva_fwd":
            const["STORE_O32"] = dtype != "fp32"
        return (name, dtype, len(rs), const, {"num_warps": cfg.num_warps})

    # every variant (dtype, mask mode, towers) with the first candidate, on both architectures ...
    jobs = [interp_job(name, dtype, copy, interp_tiles[0]) for name, dtype, copy in
            [("interp_fwd", "fp16", False), ("interp_fwd", "bf16", True), ("interp_bwd", "fp32", False)]]
    jobs += [sva_job(*v, sva_tiles[0]) for v in
             [("sva_fwd", "fp16", (1, 1, 1, 4), 1, True), ("sva_fwd", "bf16", (2, 1, 8), 2, False),
              ("sva_fwd", "fp32", (1,), 0, False), ("sva_bwd", "fp16", (1, 1, 1, 4), 1, True),
              ("sva_bwd", "fp32", (2, 1, 8), 2, False)]]
    # ... and every other candidate tile once (sm_80, float32): a tile that does not compile would fail tuning
    extra = [interp_job(name, "fp32", False, cfg) for name in ("interp_fwd", "interp_bwd") for cfg in interp_tiles[1:]]
    extra += [sva_job(name, "fp32", (1, 1, 1, 4), 1, False, cfg) for name in ("sva_fwd", "sva_bwd") for cfg in sva_tiles[1:]]

    results = []
    for arch, arch_jobs in ((80, jobs + extra), (90, jobs)):
        for name, dtype, towers, const, options in arch_jobs:
            kernel = tk.KERNELS[name]
            src = ASTSource(kernel, signature(kernel, dtype, towers, const), const)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
            ptx = compiled.asm.get("ptx", "")
            results.append({"kernel": name, "dtype": dtype, "arch": arch, "ptx_target": f".target sm_{arch}" in ptx,
                            "cubin_bytes": len(compiled.asm.get("cubin", b"")), "fma": "fma.rn.f32" in ptx})
    json.dump(results, sys.stdout)
''')


def test_triton_kernels_compile_ahead_of_time_for_sm80_sm90(tmp_path):
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip(f"Triton's bundled ptxas is missing ({ptxas})")
    script = tmp_path / "aot.py"
    script.write_text(AOT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, and leave no cache behind
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout)
    compiled = {(r["kernel"], r["arch"]) for r in results}
    assert compiled == {(name, arch) for name in tk.KERNELS for arch in (80, 90)}
    for r in results:
        assert r["ptx_target"] and r["cubin_bytes"] > 0, r
        if r["kernel"].startswith("interp"):
            assert not r["fma"], f"FMA contraction in {r}: the resize taps would differ from the reference"
