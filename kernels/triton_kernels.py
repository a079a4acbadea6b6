"""Triton backend for `cambrian.kernels` (GPU; on the CPU only under the Triton interpreter).

Same contract and numbers as `cambrian.kernels.reference` (float32 arithmetic, results cast back to
the input dtype), without the reference's copies:

* `multi_tower_interpolate`: one launch per grid reads the token-major (B, h*w, C_i) input and writes
  its bilinear resize straight into its channel slice of the (B, H*W, sum C_i) output.  The tap math is
  ATen's `area_pixel_compute_source_index` in float32, done per output pixel inside the kernel with
  FMA contraction switched off, so the taps (and, in float32, the values) equal the reference's.
  The backward gathers instead of scattering: every input pixel sums the few output pixels whose taps
  touch it, so there are no atomics and the result is deterministic.
* `sva_window_attention`: one program per block of queries and heads streams the keys of the query's
  window in every tower straight from the (B, n_i, n_i, heads*d) grids (online softmax across all
  towers, float32).  Validity comes from the per-image rectangles (two range tests per key, and a
  closed-form "window has a valid key" test) or from the explicit masks.  The backward recomputes the
  probabilities from the saved log-sum-exp; windows do not overlap, so each key belongs to exactly
  one query and its dK/dV are written directly (no atomics, no second pass).

Launch tiles: on a GPU every kernel goes through `triton.autotune` (`TUNED`), which times the candidate
tiles (`INTERP_CONFIGS`: pixel x channel blocks; `SVA_CONFIGS`: head blocks x warps), pruned to the problem
(`_prune_interp`, `_prune_sva`), once per shape key and dtype, and keeps the fastest.  Under the interpreter
the launches use few, big programs instead (`_BIG_BLOCKS`); tests that switch that off run the autotuned path
on the CPU, where `_cpu_do_bench` replaces Triton's CUDA-event benchmarker and two candidates are tried.

Availability: Triton must import and either a CUDA device exists or `TRITON_INTERPRET=1` was set
before this module was imported (then CPU tensors run in the interpreter, slowly: tests use small
shapes and large blocks).  No `tl.dot` is used (every query has its own keys, so the work is
bandwidth-bound multiply-and-reduce), which also sidesteps the interpreter's wrong bf16 `tl.dot`.
"""
from __future__ import annotations

import struct
import time
from typing import Sequence

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = ["multi_tower_interpolate", "sva_window_attention", "is_available", "supports", "KERNELS", "TUNED", "INTERP_CONFIGS",
           "SVA_CONFIGS", "INTERP_OPTIONS"]

OPS = ("multi_tower_interpolate", "sva_window_attention")


# Launch options of the resize kernels: no FMA contraction, so `(dst + 0.5) * scale - 0.5` and the
# weighted sums round exactly like the reference (tests compile with the same options ahead of time).
INTERP_OPTIONS = {"enable_fp_fusion": False}


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


if triton is not None:
    # -----------------------------------------------------------------------------------------------
    # bilinear resize (align_corners=False), token-major in, channel slice of the concatenation out
    # -----------------------------------------------------------------------------------------------
    @triton.jit
    def _source_taps(dst, scale, n_in):
        """ATen's 1-D taps for integer output indices `dst`: (i0, i1, l0, l1), all float32 math.

        src = max((dst + 0.5) * scale - 0.5, 0); i0 = floor(src) (src >= 0, so truncation);
        i1 = min(i0 + 1, n_in - 1); l1 = src - i0; l0 = 1 - l1.  The caller launches with FMA
        fusion off so `* scale - 0.5` rounds twice, exactly like the reference and ATen's CPU code.
        """
        src = tl.maximum((dst.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
        i0 = tl.minimum(src.to(tl.int32), n_in - 1)
        i1 = tl.minimum(i0 + 1, n_in - 1)
        l1 = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
        return i0, i1, 1.0 - l1, l1

    @triton.jit
    def _interp_fwd_kernel(x_ptr, out_ptr, n_pix, h, w, C, H, W, x_sb, x_st, x_sc, out_tokstride, c_off,
                           scale_h, scale_w, COPY: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        # x: (B, h*w, C) with element strides (x_sb, x_st, x_sc) -- token-major, or the transposed view of
        # a (B, C, h, w) map, read in place; out: (B, H*W, out_tokstride), this grid's channels at c_off.
        # Program = BLOCK_P output pixels (flattened over b, oy, ox) x BLOCK_C channels.
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        pm = p < n_pix
        cm = c < C
        m2 = pm[:, None] & cm[None, :]
        b = p // (H * W)
        oyx = p % (H * W)
        out_ptrs = out_ptr + p.to(tl.int64)[:, None] * out_tokstride + c_off + c[None, :]
        xb = x_ptr + b.to(tl.int64)[:, None] * x_sb + c.to(tl.int64)[None, :] * x_sc   # (P, C) image + channel
        if COPY:  # already at the target size: copied unchanged (no 0 * x terms, so inf/nan stay put)
            val = tl.load(xb + oyx.to(tl.int64)[:, None] * x_st, mask=m2, other=0.0)
            tl.store(out_ptrs, val.to(out_ptr.dtype.element_ty), mask=m2)
        else:
            oy = oyx // W
            ox = oyx % W
            y0, y1, ly0, ly1 = _source_taps(oy, scale_h, h)
            x0, x1, lx0, lx1 = _source_taps(ox, scale_w, w)
            row0 = y0.to(tl.int64) * w
            row1 = y1.to(tl.int64) * w
            v00 = tl.load(xb + ((row0 + x0) * x_st)[:, None], mask=m2, other=0.0).to(tl.float32)
            v01 = tl.load(xb + ((row0 + x1) * x_st)[:, None], mask=m2, other=0.0).to(tl.float32)
            v10 = tl.load(xb + ((row1 + x0) * x_st)[:, None], mask=m2, other=0.0).to(tl.float32)
            v11 = tl.load(xb + ((row1 + x1) * x_st)[:, None], mask=m2, other=0.0).to(tl.float32)
            # columns first, then rows: the reference's (and ATen's) order of the float32 sums
            top = v00 * lx0[:, None] + v01 * lx1[:, None]
            bot = v10 * lx0[:, None] + v11 * lx1[:, None]
            val = top * ly0[:, None] + bot * ly1[:, None]
            # round to the grid's own dtype first (the reference casts each part, then concatenates)
            val = val.to(x_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty)
            tl.store(out_ptrs, val, mask=m2)

    @triton.jit
    def _tap_weight(i, n_in, dst, n_out, scale):
        """Weight of input index i in output indices dst (0 where dst is out of range or not a tap)."""
        i0, i1, l0, l1 = _source_taps(dst, scale, n_in)
        wgt = tl.where(i0 == i, l0, 0.0) + tl.where(i1 == i, l1, 0.0)
        return tl.where(dst < n_out, wgt, 0.0)

    @triton.jit
    def _first_candidate(i, inv_scale):
        """First output index that can have a non-zero tap on input index i (one before, for rounding).

        Outputs touching i have src >= i - 1, i.e. dst >= (i - 0.5) * n_out / n_in - 0.5.
        """
        t = tl.maximum((i.to(tl.float32) - 0.5) * inv_scale - 0.5, 0.0)
        return tl.maximum(t.to(tl.int32) - 1, 0)

    @triton.jit
    def _interp_bwd_kernel(g_ptr, gx_ptr, n_pix, h, w, C, H, W, g_tokstride, c_off, scale_h, scale_w,
                           inv_h, inv_w, SPAN_H, SPAN_W,
                           COPY: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        # g: (B, H*W, g_tokstride) gradient of the concatenation; gx: (B, h*w, C) gradient of this grid.
        # Program = BLOCK_P input pixels x BLOCK_C channels; each gathers the output pixels in a
        # SPAN_H x SPAN_W candidate box and keeps those whose taps hit it (exact same tap math).
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        pm = p < n_pix
        cm = c < C
        m2 = pm[:, None] & cm[None, :]
        gx_ptrs = gx_ptr + p.to(tl.int64)[:, None] * C + c[None, :]
        if COPY:
            val = tl.load(g_ptr + p.to(tl.int64)[:, None] * g_tokstride + c_off + c[None, :], mask=m2, other=0.0)
            tl.store(gx_ptrs, val.to(gx_ptr.dtype.element_ty), mask=m2)
        else:
            b = p // (h * w)
            iyx = p % (h * w)
            iy = iyx // w
            ix = iyx % w
            oy_start = _first_candidate(iy, inv_h)
            ox_start = _first_candidate(ix, inv_w)
            acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
            # outer loop over columns, inner over rows: the reference's backward order (rows pass first)
            for dx in range(SPAN_W):
                ox = ox_start + dx
                wx = _tap_weight(ix, w, ox, W, scale_w)
                inner = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
                for dy in range(SPAN_H):
                    oy = oy_start + dy
                    wy = _tap_weight(iy, h, oy, H, scale_h)
                    hit = pm & (wx != 0.0) & (wy != 0.0)
                    tok = (b.to(tl.int64) * H + oy) * W + ox
                    g = tl.load(g_ptr + tok[:, None] * g_tokstride + c_off + c[None, :],
                                mask=hit[:, None] & cm[None, :], other=0.0).to(tl.float32)
                    inner += g * wy[:, None]
                acc += inner * wx[:, None]
            tl.store(gx_ptrs, acc.to(gx_ptr.dtype.element_ty), mask=m2)

    # -----------------------------------------------------------------------------------------------
    # SVA windowed multi-tower attention
    # -----------------------------------------------------------------------------------------------
    @triton.jit
    def _query_coords(pid_q, pid_h, n_q, h, w, heads, head_dim, off_ptr,
                      HAS_OFFSETS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_D: tl.constexpr):
        """Per-program indices: flat query ids, their image, window cell, and the (Q, H, D) tile masks."""
        qi = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        qm = qi < n_q
        b = qi // (h * w)
        y = (qi // w) % h
        x = qi % w
        if HAS_OFFSETS:  # query sub-rectangle: query (y, x) of image b sits at cell (y + row0_b, x + col0_b)
            y += tl.load(off_ptr + b * 2, mask=qm, other=0)
            x += tl.load(off_ptr + b * 2 + 1, mask=qm, other=0)
        hh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        dd = tl.arange(0, BLOCK_D)
        col = hh[:, None] * head_dim + dd[None, :]                      # (H, D) channel within heads*d
        cm = (hh < heads)[:, None] & (dd < head_dim)[None, :]
        m3 = qm[:, None, None] & cm[None, :, :]                          # (Q, H, D)
        return qi, qm, b, y, x, hh, col, m3

    @triton.jit
    def _window_any_valid(rect_ptr, mask_ptr, t, n_img, b, wy, wx, qm, s,
                          R: tl.constexpr, MASK_MODE: tl.constexpr):
        """Per query: does tower t's window hold a valid key?  (False -> the whole window counts as valid.)"""
        if MASK_MODE == 1:
            # rectangles: rows [wy*R, wy*R+R) meet [row0, row1) and cols likewise -- closed form
            base = rect_ptr + (t * n_img + b) * 4
            ry0 = tl.load(base + 0, mask=qm, other=0)
            ry1 = tl.load(base + 1, mask=qm, other=0)
            rx0 = tl.load(base + 2, mask=qm, other=0)
            rx1 = tl.load(base + 3, mask=qm, other=0)
            any_y = tl.maximum(wy * R, ry0) < tl.minimum(wy * R + R, ry1)
            any_x = tl.maximum(wx * R, rx0) < tl.minimum(wx * R + R, rx1)
            return any_y & any_x
        else:
            n = s * R
            found = b < 0  # all False, shaped like the query block
            for kk in range(R * R):
                gy = wy * R + kk // R
                gx = wx * R + kk % R
                found |= tl.load(mask_ptr + (b.to(tl.int64) * n + gy) * n + gx, mask=qm, other=0) != 0
            return found

    @triton.jit
    def _key_valid(rect_ptr, mask_ptr, t, n_img, b, gy, gx, n, qm, any_valid, MASK_MODE: tl.constexpr):
        """Per query: is the key at tower-t grid cell (gy, gx) valid (after the all-invalid rule)?"""
        if MASK_MODE == 1:
            base = rect_ptr + (t * n_img + b) * 4
            inside = ((gy >= tl.load(base + 0, mask=qm, other=0)) & (gy < tl.load(base + 1, mask=qm, other=0))
                      & (gx >= tl.load(base + 2, mask=qm, other=0)) & (gx < tl.load(base + 3, mask=qm, other=0)))
        else:
            inside = tl.load(mask_ptr + (b.to(tl.int64) * n + gy) * n + gx, mask=qm, other=0) != 0
        return inside | (~any_valid)

    @triton.jit
    def _sva_fwd_kernel(q_ptr, k_ptrs, v_ptrs, rect_ptr, mask_ptrs, off_ptr, out_ptr, o32_ptr, lse_ptr,
                        n_q, n_img, h, w, s, heads, head_dim, scale,
                        RS: tl.constexpr, NUM_TOWERS: tl.constexpr, MASK_MODE: tl.constexpr,
                        HAS_OFFSETS: tl.constexpr, STORE_O32: tl.constexpr,
                        BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        # q/out: (B, h, w, heads*d); k_ptrs[t]/v_ptrs[t]: (B, n_t, n_t, heads*d), n_t = s * RS[t];
        # rect: (T, B, 4) int32 [row0, row1, col0, col1); mask_ptrs[t]: (B, n_t, n_t) uint8;
        # off: (B, 2) int32; lse: (B*h*w, heads) float32; o32: float32 copy of out (for the backward).
        dim = heads * head_dim
        qi, qm, b, wy, wx, hh, col, m3 = _query_coords(
            tl.program_id(0), tl.program_id(1), n_q, h, w, heads, head_dim, off_ptr,
            HAS_OFFSETS, BLOCK_Q, BLOCK_H, BLOCK_D)
        q_off = qi.to(tl.int64)[:, None, None] * dim + col[None, :, :]
        qs = tl.load(q_ptr + q_off, mask=m3, other=0.0).to(tl.float32) * scale   # (Q, H, D)

        m_i = tl.full([BLOCK_Q, BLOCK_H], float("-inf"), dtype=tl.float32)       # running max
        l_i = tl.zeros([BLOCK_Q, BLOCK_H], dtype=tl.float32)                      # running sum
        acc = tl.zeros([BLOCK_Q, BLOCK_H, BLOCK_D], dtype=tl.float32)
        for t in tl.static_range(NUM_TOWERS):
            R = RS[t]  # constexpr (RS is a constexpr tuple, t a static index)
            n = s * R
            if MASK_MODE != 0:
                any_valid = _window_any_valid(rect_ptr, mask_ptrs[t], t, n_img, b, wy, wx, qm, s, R, MASK_MODE)
            for kk in range(R * R):  # key order dy*R + dx inside the window
                gy = wy * R + kk // R
                gx = wx * R + kk % R
                kv_off = ((b.to(tl.int64) * n + gy) * n + gx)[:, None, None] * dim + col[None, :, :]
                k = tl.load(k_ptrs[t] + kv_off, mask=m3, other=0.0).to(tl.float32)
                v = tl.load(v_ptrs[t] + kv_off, mask=m3, other=0.0).to(tl.float32)
                sc = tl.sum(qs * k, axis=2)                                       # (Q, H)
                if MASK_MODE != 0:
                    ok = _key_valid(rect_ptr, mask_ptrs[t], t, n_img, b, gy, gx, n, qm, any_valid, MASK_MODE)
                    sc = tl.where(ok[:, None], sc, float("-inf"))
                m_new = tl.maximum(m_i, sc)
                # no valid key seen yet -> keep everything at zero instead of exp(-inf - -inf) = nan
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_i - m_ref)
                p = tl.exp(sc - m_ref)
                l_i = l_i * alpha + p
                acc = acc * alpha[:, :, None] + p[:, :, None] * v
                m_i = m_new
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # only padding rows of the tile have l == 0
        o = acc / l_safe[:, :, None]
        tl.store(out_ptr + q_off, o.to(out_ptr.dtype.element_ty), mask=m3)
        if STORE_O32:
            tl.store(o32_ptr + q_off, o, mask=m3)
        hm = qm[:, None] & (hh < heads)[None, :]
        tl.store(lse_ptr + qi.to(tl.int64)[:, None] * heads + hh[None, :], m_i + tl.log(l_safe), mask=hm)

    @triton.jit
    def _sva_bwd_kernel(q_ptr, k_ptrs, v_ptrs, rect_ptr, mask_ptrs, off_ptr, o_ptr, do_ptr, lse_ptr,
                        dq_ptr, dk_ptrs, dv_ptrs,
                        n_q, n_img, h, w, s, heads, head_dim, scale,
                        RS: tl.constexpr, NUM_TOWERS: tl.constexpr, MASK_MODE: tl.constexpr,
                        HAS_OFFSETS: tl.constexpr,
                        BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        # p_j = exp(s_j - lse); dV_j = p_j dO; dS_j = p_j (dO.v_j - dO.O); dQ = scale sum_j dS_j k_j;
        # dK_j = dS_j * scale * q.  Each key lies in one window, read by one query: written, not added.
        dim = heads * head_dim
        qi, qm, b, wy, wx, hh, col, m3 = _query_coords(
            tl.program_id(0), tl.program_id(1), n_q, h, w, heads, head_dim, off_ptr,
            HAS_OFFSETS, BLOCK_Q, BLOCK_H, BLOCK_D)
        q_off = qi.to(tl.int64)[:, None, None] * dim + col[None, :, :]
        qs = tl.load(q_ptr + q_off, mask=m3, other=0.0).to(tl.float32) * scale
        do = tl.load(do_ptr + q_off, mask=m3, other=0.0).to(tl.float32)
        o = tl.load(o_ptr + q_off, mask=m3, other=0.0).to(tl.float32)
        delta = tl.sum(do * o, axis=2)                                             # (Q, H) = sum_j p_j dp_j
        hm = qm[:, None] & (hh < heads)[None, :]
        lse = tl.load(lse_ptr + qi.to(tl.int64)[:, None] * heads + hh[None, :], mask=hm, other=0.0)

        dq = tl.zeros([BLOCK_Q, BLOCK_H, BLOCK_D], dtype=tl.float32)
        for t in tl.static_range(NUM_TOWERS):
            R = RS[t]  # constexpr (RS is a constexpr tuple, t a static index)
            n = s * R
            if MASK_MODE != 0:
                any_valid = _window_any_valid(rect_ptr, mask_ptrs[t], t, n_img, b, wy, wx, qm, s, R, MASK_MODE)
            for kk in range(R * R):
                gy = wy * R + kk // R
                gx = wx * R + kk % R
                kv_off = ((b.to(tl.int64) * n + gy) * n + gx)[:, None, None] * dim + col[None, :, :]
                k = tl.load(k_ptrs[t] + kv_off, mask=m3, other=0.0).to(tl.float32)
                v = tl.load(v_ptrs[t] + kv_off, mask=m3, other=0.0).to(tl.float32)
                p = tl.exp(tl.sum(qs * k, axis=2) - lse)                             # (Q, H)
                if MASK_MODE != 0:
                    ok = _key_valid(rect_ptr, mask_ptrs[t], t, n_img, b, gy, gx, n, qm, any_valid, MASK_MODE)
                    p = tl.where(ok[:, None], p, 0.0)
                dp = tl.sum(do * v, axis=2)
                ds = p * (dp - delta)
                dq += ds[:, :, None] * k
                tl.store(dk_ptrs[t] + kv_off, (ds[:, :, None] * qs).to(dk_ptrs[t].dtype.element_ty), mask=m3)
                tl.store(dv_ptrs[t] + kv_off, (p[:, :, None] * do).to(dv_ptrs[t].dtype.element_ty), mask=m3)
        tl.store(dq_ptr + q_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=m3)

    KERNELS = {
        "interp_fwd": _interp_fwd_kernel, "interp_bwd": _interp_bwd_kernel,
        "sva_fwd": _sva_fwd_kernel, "sva_bwd": _sva_bwd_kernel,
    }
    _INTERPRET = type(_interp_fwd_kernel).__name__ == "InterpretedFunction"
else:  # pragma: no cover
    KERNELS = {}
    _INTERPRET = False
# Block shapes: the interpreter's cost is per program and per op, not per element, so under it the
# launch helpers use few, large programs (`_interp_blocks`, `_sva_blocks`).  Otherwise -- on a GPU, or when
# tests set this to False under the interpreter -- the tiles come from triton.autotune (`TUNED`).
_BIG_BLOCKS = _INTERPRET


# ---------------------------------------------------------------------------------------------------
# autotuning (GPU tiles)
# ---------------------------------------------------------------------------------------------------
# Candidate tiles.  Resize: (BLOCK_P pixels, BLOCK_C channels, warps), 4K-8K elements per program, from
# narrow channel blocks (grids with few channels) to wide ones (long contiguous runs of one pixel).
# Attention: one query per program (each query has its own keys) and BLOCK_H heads of BLOCK_D channels.
_INTERP_TILES = ((256, 16, 4), (128, 32, 4), (64, 64, 4), (32, 128, 4), (16, 256, 4), (8, 512, 4), (64, 128, 8),
                 (32, 256, 8))
_SVA_HEAD_BLOCKS, _SVA_WARPS = (1, 2, 4, 8, 16, 32), (4, 8)
# Under the interpreter timings say nothing about a GPU: tuning there only exercises the path (tests), so
# it tries this many candidates.
_INTERPRETED_CANDIDATES = 2


def _cpu_do_bench(kernel_call, quantiles=(0.5, 0.2, 0.8), reps: int = 2) -> list[float]:
    """Autotuner benchmark without a GPU (the interpreter): wall-clock ms of `reps` calls at `quantiles`.

    Triton's default benchmarker times with CUDA events and cannot run on a CPU-only machine.
    """
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        kernel_call()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return [times[min(len(times) - 1, round(q * (len(times) - 1)))] for q in quantiles]


def _interpreted_subset(configs: list) -> list:
    return configs[:_INTERPRETED_CANDIDATES] if _INTERPRET else configs


def _prune_interp(configs, named_args, **kwargs) -> list:
    """Resize tiles no wider in channels than the grid (its channel count rounded up to a power of two, >= 16)."""
    widest = max(16, _next_pow2(named_args["C"]))
    kept = [c for c in configs if c.kwargs["BLOCK_C"] <= widest]
    return _interpreted_subset(sorted(kept, key=lambda c: -c.kwargs["BLOCK_C"]))


def _prune_sva(configs, named_args, **kwargs) -> list:
    """Head blocks from the widest useful one (all heads, at most 2048 channels) down to a quarter of it."""
    block_d = kwargs["BLOCK_D"]
    widest = max(1, min(_next_pow2(named_args["heads"]), 2048 // block_d))
    kept = [c for c in configs if widest // 4 <= c.kwargs["BLOCK_H"] <= widest]
    return _interpreted_subset(sorted(kept, key=lambda c: (-c.kwargs["BLOCK_H"], c.num_warps)))


if triton is not None:
    INTERP_CONFIGS = [triton.Config({"BLOCK_P": bp, "BLOCK_C": bc}, num_warps=nw) for bp, bc, nw in _INTERP_TILES]
    SVA_CONFIGS = [triton.Config({"BLOCK_Q": 1, "BLOCK_H": bh}, num_warps=nw)
                   for bh in _SVA_HEAD_BLOCKS for nw in _SVA_WARPS]
    _do_bench = _cpu_do_bench if _INTERPRET else None  # None: Triton's GPU benchmarker

    def _tuned(kernel, configs, key, prune):
        return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune},
                               do_bench=_do_bench)(kernel)

    # Tuned once per key (and input dtypes, which the autotuner adds); every run writes its outputs whole, so
    # repeated launches while tuning change nothing.
    TUNED = {
        "interp_fwd": _tuned(_interp_fwd_kernel, INTERP_CONFIGS, ["C", "H", "W", "x_sc", "COPY"], _prune_interp),
        "interp_bwd": _tuned(_interp_bwd_kernel, INTERP_CONFIGS, ["C", "h", "w", "H", "W", "COPY"], _prune_interp),
        "sva_fwd": _tuned(_sva_fwd_kernel, SVA_CONFIGS, ["heads", "head_dim", "s", "RS", "MASK_MODE"], _prune_sva),
        "sva_bwd": _tuned(_sva_bwd_kernel, SVA_CONFIGS, ["heads", "head_dim", "s", "RS", "MASK_MODE"], _prune_sva),
    }
else:  # pragma: no cover
    INTERP_CONFIGS, SVA_CONFIGS, TUNED = [], [], {}


def is_available() -> bool:
    """Triton imports and can run: a CUDA device, or the interpreter (TRITON_INTERPRET=1 at import)."""
    return triton is not None and (torch.cuda.is_available() or _INTERPRET)


def supports(op: str, device: torch.device | str) -> bool:
    """CUDA tensors when a GPU is present; CPU tensors only under the interpreter."""
    if op not in OPS or triton is None:
        return False
    device = torch.device(device)
    if _INTERPRET:
        return device.type == "cpu"
    return device.type == "cuda" and torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------
# launch helpers
# ---------------------------------------------------------------------------------------------------
def _interp_blocks(n_pix: int, channels: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) under the interpreter: few, big programs (up to 64K elements)."""
    block_c = min(_next_pow2(channels), 256)
    return max(1, min(_next_pow2(n_pix), (1 << 16) // block_c)), block_c


def _launch_interp(name: str, n_pix: int, channels: int, *args, **constexprs) -> None:
    """Launch a resize kernel over (pixels, channels): big blocks under the interpreter, else autotuned tiles."""
    if _BIG_BLOCKS:
        block_p, block_c = _interp_blocks(n_pix, channels)
        grid = (triton.cdiv(n_pix, block_p), triton.cdiv(channels, block_c))
        KERNELS[name][grid](*args, **constexprs, BLOCK_P=block_p, BLOCK_C=block_c, **INTERP_OPTIONS)
    else:
        def grid(meta):
            return triton.cdiv(n_pix, meta["BLOCK_P"]), triton.cdiv(channels, meta["BLOCK_C"])
        TUNED[name][grid](*args, **constexprs, **INTERP_OPTIONS)


def _f32_ratio(a: int, b: int) -> float:
    """float32(a) / float32(b) rounded to float32 (ATen's `area_pixel_compute_scale` for float).

    Dividing in float64 and rounding once more to float32 is exact here: float64 has more than
    2 * 24 + 2 bits, so double rounding of a quotient of float32 values cannot differ.
    """
    return struct.unpack("f", struct.pack("f", float(a) / float(b)))[0]


class _MultiTowerInterpolate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src_sizes: tuple[tuple[int, int], ...], dst_size: tuple[int, int], *features: Tensor) -> Tensor:
        out_h, out_w = dst_size
        batch = features[0].shape[0]
        total_c = sum(x.shape[2] for x in features)
        out = torch.empty(batch, out_h * out_w, total_c, dtype=features[0].dtype, device=features[0].device)
        n_pix = batch * out_h * out_w
        c_off = 0
        for x, (h, w) in zip(features, src_sizes):
            c = x.shape[2]
            if c:
                _launch_interp("interp_fwd", n_pix, c, x, out, n_pix, h, w, c, out_h, out_w, *x.stride(), total_c,
                               c_off, _f32_ratio(h, out_h), _f32_ratio(w, out_w), COPY=(h, w) == (out_h, out_w))
            c_off += c
        ctx.src_sizes, ctx.dst_size = src_sizes, dst_size
        ctx.meta = [(x.shape, x.dtype) for x in features]
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_out = grad_out.contiguous()
        out_h, out_w = ctx.dst_size
        total_c = grad_out.shape[2]
        grads, c_off = [], 0
        for (shape, dtype), (h, w), need in zip(ctx.meta, ctx.src_sizes, ctx.needs_input_grad[2:]):
            c = shape[2]
            if not need:
                grads.append(None)
                c_off += c
                continue
            gx = torch.empty(shape, dtype=dtype, device=grad_out.device)
            n_pix = shape[0] * h * w
            if c and n_pix:
                # candidate boxes: outputs with a non-zero tap on one input index span < 2*n_out/n_in + 1
                span_h = min(out_h, -(-2 * out_h // h) + 3)
                span_w = min(out_w, -(-2 * out_w // w) + 3)
                _launch_interp("interp_bwd", n_pix, c, grad_out, gx, n_pix, h, w, c, out_h, out_w, total_c, c_off,
                               _f32_ratio(h, out_h), _f32_ratio(w, out_w), _f32_ratio(out_h, h), _f32_ratio(out_w, w),
                               span_h, span_w, COPY=(h, w) == (out_h, out_w))
            grads.append(gx)
            c_off += c
        return (None, None, *grads)


def multi_tower_interpolate(features: Sequence[Tensor], src_sizes: Sequence[tuple[int, int]],
                            dst_size: tuple[int, int]) -> Tensor:
    """Resize each (B, h_i*w_i, C_i) grid to dst_size into one (B, H*W, sum C_i) tensor (see the reference)."""
    src = tuple((int(h), int(w)) for h, w in src_sizes)
    dst = (int(dst_size[0]), int(dst_size[1]))
    return _MultiTowerInterpolate.apply(src, dst, *features)


def _sva_blocks(n_q: int, heads: int, block_d: int) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_H) under the interpreter: many queries per program, all heads up to 1024 channels."""
    block_h = min(_next_pow2(heads), max(1, 1024 // block_d))
    return min(_next_pow2(n_q), max(1, (1 << 15) // (block_h * block_d))), block_h


def _launch_sva(name: str, n_q: int, heads: int, head_dim: int, *args, **constexprs) -> None:
    """Launch an attention kernel over (queries, head blocks): big blocks under the interpreter, else autotuned."""
    block_d = _next_pow2(head_dim)
    if _BIG_BLOCKS:
        block_q, block_h = _sva_blocks(n_q, heads, block_d)
        grid = (triton.cdiv(n_q, block_q), triton.cdiv(heads, block_h))
        KERNELS[name][grid](*args, **constexprs, BLOCK_Q=block_q, BLOCK_H=block_h, BLOCK_D=block_d)
    else:
        def grid(meta):
            return triton.cdiv(n_q, meta["BLOCK_Q"]), triton.cdiv(heads, meta["BLOCK_H"])
        TUNED[name][grid](*args, **constexprs, BLOCK_D=block_d)


class _SvaWindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg: dict, q: Tensor, *kv: Tensor) -> Tensor:
        # kv = keys then values; validity tensors and offsets ride in cfg (no gradient)
        num_towers = cfg["num_towers"]
        keys = [k.contiguous() for k in kv[:num_towers]]
        values = [v.contiguous() for v in kv[num_towers:]]
        rects, masks, offsets = cfg["rects"], cfg["masks"], cfg["offsets"]
        q = q.contiguous()
        b, h, w, dim = q.shape
        heads = cfg["num_heads"]
        head_dim = dim // heads
        s = cfg["grid_side"]
        n_q = b * h * w
        out = torch.empty_like(q)
        store_o32 = q.dtype != torch.float32
        o32 = torch.empty(q.shape, dtype=torch.float32, device=q.device) if store_o32 else out
        lse = torch.empty(n_q, heads, dtype=torch.float32, device=q.device)
        rs = tuple(k.shape[1] // s for k in keys)
        mask_mode = 1 if rects is not None else 2 if masks is not None else 0
        dummy = q  # never dereferenced: the constexpr mode removes those loads
        if n_q:
            _launch_sva(
                "sva_fwd", n_q, heads, head_dim,
                q, tuple(keys), tuple(values), rects if rects is not None else dummy,
                tuple(masks) if masks is not None else tuple(keys), offsets if offsets is not None else dummy,
                out, o32, lse, n_q, b, h, w, s, heads, head_dim, cfg["scale"],
                RS=rs, NUM_TOWERS=num_towers, MASK_MODE=mask_mode, HAS_OFFSETS=offsets is not None,
                STORE_O32=store_o32)
        ctx.cfg = cfg
        ctx.rs, ctx.mask_mode = rs, mask_mode
        ctx.save_for_backward(q, o32, lse, *keys, *values)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        cfg = ctx.cfg
        num_towers = cfg["num_towers"]
        q, o32, lse, *kv = ctx.saved_tensors
        keys, values = kv[:num_towers], kv[num_towers:]
        rects, masks, offsets = cfg["rects"], cfg["masks"], cfg["offsets"]
        do = grad_out.contiguous()
        b, h, w, dim = q.shape
        heads = cfg["num_heads"]
        head_dim = dim // heads
        s = cfg["grid_side"]
        n_q = b * h * w
        # keys outside the query sub-rectangle are read by no query: their gradient is zero
        alloc = torch.empty_like if (h, w) == (s, s) else torch.zeros_like
        dq = torch.empty_like(q)
        dks = tuple(alloc(k) for k in keys)
        dvs = tuple(alloc(v) for v in values)
        dummy = q
        if n_q:
            _launch_sva(
                "sva_bwd", n_q, heads, head_dim,
                q, tuple(keys), tuple(values), rects if rects is not None else dummy,
                tuple(masks) if masks is not None else tuple(keys), offsets if offsets is not None else dummy,
                o32, do, lse, dq, dks, dvs, n_q, b, h, w, s, heads, head_dim, cfg["scale"],
                RS=ctx.rs, NUM_TOWERS=num_towers, MASK_MODE=ctx.mask_mode, HAS_OFFSETS=offsets is not None)
        return (None, dq, *dks, *dvs)


def sva_window_attention(q: Tensor, keys: Sequence[Tensor], values: Sequence[Tensor], *, num_heads: int,
                         grid_side: int, query_offsets: Tensor | None = None,
                         valid_rects: Sequence[Tensor] | None = None, masks: Sequence[Tensor] | None = None,
                         scale: float | None = None) -> Tensor:
    """Windowed multi-tower cross-attention (contract: `cambrian.kernels.sva_window_attention`).

    q: (B, h, w, heads*d); keys[i] / values[i]: (B, n_i, n_i, heads*d) -> (B, h, w, heads*d) in q's dtype.
    Arguments arrive validated by `cambrian.kernels`.
    """
    keys, values = list(keys), list(values)
    dim = q.shape[-1]
    cfg = {
        "num_towers": len(keys),
        "num_heads": int(num_heads),
        "grid_side": int(grid_side),
        "scale": float((dim // num_heads) ** -0.5 if scale is None else scale),
        # validity and offsets as small int32 tables the kernel indexes by (tower, image)
        "rects": (torch.stack([torch.as_tensor(r, device=q.device) for r in valid_rects]).to(torch.int32).contiguous()
                  if valid_rects is not None else None),                                    # (T, B, 4)
        "masks": [m.contiguous().view(torch.uint8) for m in masks] if masks is not None else None,
        "offsets": (torch.as_tensor(query_offsets, device=q.device).to(torch.int32).reshape(-1, 2).contiguous()
                    if query_offsets is not None else None),                                 # (B, 2)
    }
    return _SvaWindowAttention.apply(cfg, q, *keys, *values)
