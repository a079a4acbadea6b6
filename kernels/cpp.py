"""C++ CPU backend: OpenMP kernels from `csrc/cpu/`, registered as real torch ops.

The extension `cambrian.kernels._C` (built by setup.py from csrc/cpu/*.cpp) defines, through
`TORCH_LIBRARY(cambrian, ...)`, the ops

* ``torch.ops.cambrian.multi_tower_interpolate(Tensor[] features, int[] src_sizes, int[] dst_size) -> Tensor``
  (src_sizes flattened ``[h0, w0, h1, w1, ...]``), and its ``multi_tower_interpolate_backward``;
* ``torch.ops.cambrian.multi_tower_interpolate_accumulate_(Tensor(a!) out, Tensor[] features, int[] src_sizes,
  int[] dst_size) -> ()``: ``out += multi_tower_interpolate(...)`` in place (a mutable op: its autograd is the
  `torch.autograd.Function` `_InterpolateAdd` here);
* ``torch.ops.cambrian.window_pos_layer_norm(Tensor grid, Tensor? pos, int window_side, float eps) -> Tensor``
  (autograd: the LayerNorm backward formula in torch ops, `_pln_backward`) and its in-place form
  ``window_pos_layer_norm_out_(Tensor(a!) out, ...) -> ()`` (inference);
* ``torch.ops.cambrian.sva_window_attention(Tensor q, Tensor[] keys, Tensor[] values, int num_heads,
  int grid_side, Tensor? query_offsets, Tensor? valid_rects, Tensor? masks, float scale) -> (out, lse)``
  (valid_rects stacked to (towers, B, 4), masks flattened and concatenated to (B, sum n_i^2)), and its
  ``sva_window_attention_backward``.

This module adds their autograd formulas (`torch.library.register_autograd`; multi_tower_interpolate's and
sva_window_attention's are in C++, ops.cpp `InterpolateFunction` / `AttentionFunction`, so calls do not pass
through Python) and fake/meta implementations
(`torch.library.register_fake`), so autograd, `torch.compile` and `torch.export` see
opaque ops with known shapes, and exposes the backend interface of `cambrian.kernels`
(`is_available`, `supports`, and the two ops with the reference signatures).

Numerics (see csrc/cpu/kernels_impl.h):

* interpolation reproduces ATen's CPU `upsample_bilinear2d` for the (B, C, h, w) view of the input bit
  for bit in float32 (the same kernel choice, source indices, weights and fused multiply-adds as this
  torch build), float16/bfloat16 round those float32 values once; float64 is computed in float64;
* attention accumulates in float32 (float64 for float64 inputs), never materialises windows or masks,
  and saves only the logsumexp (B, h, w, heads) for the backward.

``_C.kernel_time_ns()`` is the wall time spent inside the kernel bodies since the extension loaded (a clock
read around every kernel launch); benchmarks/bench_kernels.py uses it to tell the kernels from the fixed cost
of reaching them.

Runtime knobs (environment): ``CAMBRIAN_CPU_ISA=base|avx2|avx512`` caps the instruction-set variant
(default: the best the CPU has; ``_C.set_isa`` switches at run time).  ``CAMBRIAN_CPU_HUGEPAGES=1`` / ``0``
makes outputs of 32 MB and more ask / not ask for transparent huge pages (first-touch page faults cost
more than these kernels themselves); by default they ask only when the kernel's THP defrag setting
cannot stall a fault on compaction ("defer" or "never").  Threads follow ``torch.get_num_threads()``;
calls moving less than 1 MB run on the calling thread.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import Tensor

from . import reference

__all__ = ["multi_tower_interpolate", "multi_tower_interpolate_add_", "window_pos_layer_norm", "sva_window_attention", "is_available", "supports", "isa",
           "UNAVAILABLE_REASON"]

try:
    from . import _C  # noqa: F401  (importing registers torch.ops.cambrian.* for the CPU)
    UNAVAILABLE_REASON = ""
except ImportError as exc:  # extension not built (e.g. CAMBRIAN_SKIP_NATIVE=1 or a source checkout)
    _C = None
    UNAVAILABLE_REASON = (f"the C++ extension cambrian.kernels._C is not built ({exc}); "
                          "run `pip install --no-build-isolation --no-deps -e .`")

_OPS = ("multi_tower_interpolate", "multi_tower_interpolate_add_", "window_pos_layer_norm", "sva_window_attention")
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def is_available() -> bool:
    """True when the compiled extension imported (its ops are registered)."""
    return _C is not None


def supports(op: str, device: torch.device) -> bool:
    """The ops of `_OPS`, CPU tensors only."""
    return op in _OPS and torch.device(device).type == "cpu"


def isa() -> str:
    """Instruction-set variant the kernels run with ('avx512', 'avx2', 'base'); '' if not built."""
    return _C.isa() if _C is not None else ""


# ---------------------------------------------------------------------------------------------------
# backend entry points (same signatures as cambrian.kernels.reference; arguments already validated)
# ---------------------------------------------------------------------------------------------------
def multi_tower_interpolate(features: Sequence[Tensor], src_sizes: Sequence[Sequence[int]],
                            dst_size: Sequence[int]) -> Tensor:
    """(B, h_i*w_i, C_i) grids -> (B, H*W, sum C_i), written straight into the concatenated output.

    Any strides with channel stride 1 (token-major) or token stride 1 (a (B, C, h, w) map seen through
    `.flatten(2).transpose(1, 2)`) are read in place; anything else is made contiguous first.
    """
    features = list(features)
    if any(f.dtype not in _DTYPES for f in features):
        return reference.multi_tower_interpolate(features, src_sizes, dst_size)
    flat = [int(v) for size in src_sizes for v in size]
    return torch.ops.cambrian.multi_tower_interpolate(features, flat, [int(dst_size[0]), int(dst_size[1])])


def multi_tower_interpolate_add_(out: Tensor, features: Sequence[Tensor], src_sizes: Sequence[Sequence[int]],
                                 dst_size: Sequence[int]) -> Tensor:
    """out += multi_tower_interpolate(features, src_sizes, dst_size), in place, without a resized temporary.

    The native op needs every grid in out's dtype and out's channel stride 1; otherwise `out.add_` of
    `multi_tower_interpolate` (same numbers).  Autograd: `_InterpolateAdd` (grad of out passes through, the
    grids get `multi_tower_interpolate_backward`).
    """
    features = list(features)
    if out.dtype not in _DTYPES or any(f.dtype != out.dtype for f in features) or (out.numel() and out.stride(2) != 1):
        return out.add_(multi_tower_interpolate(features, src_sizes, dst_size))
    flat = [int(v) for size in src_sizes for v in size]
    dst = [int(dst_size[0]), int(dst_size[1])]
    if torch.is_grad_enabled() and (out.requires_grad or any(f.requires_grad for f in features)):
        return _InterpolateAdd.apply(out, flat, dst, *features)
    torch.ops.cambrian.multi_tower_interpolate_accumulate_(out, features, flat, dst)
    return out


def window_pos_layer_norm(grid: Tensor, pos: Tensor | None, window_side: int, eps: float, *,
                          out: Tensor | None = None) -> Tensor:
    """Window-tiled position embedding + LayerNorm (no affine) in one pass; see `cambrian.kernels.window_pos_layer_norm`."""
    if grid.dtype not in _DTYPES:
        return reference.window_pos_layer_norm(grid, pos, window_side, eps, out=out)
    if out is not None:
        torch.ops.cambrian.window_pos_layer_norm_out_(out, grid, pos, int(window_side), float(eps))
        return out
    return torch.ops.cambrian.window_pos_layer_norm(grid, pos, int(window_side), float(eps))


class _InterpolateAdd(torch.autograd.Function):
    """Autograd of the in-place accumulate op (torch.library cannot register autograd for mutable ops)."""

    @staticmethod
    def forward(ctx, out, src_sizes, dst_size, *features):
        ctx.src_sizes, ctx.dst_size = src_sizes, dst_size
        ctx.channels = [f.shape[-1] for f in features]
        torch.ops.cambrian.multi_tower_interpolate_accumulate_(out, list(features), src_sizes, dst_size)
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grads = torch.ops.cambrian.multi_tower_interpolate_backward(grad, ctx.src_sizes, ctx.dst_size, ctx.channels)
        return (grad, None, None, *grads)


def sva_window_attention(q: Tensor, keys: Sequence[Tensor], values: Sequence[Tensor], *, num_heads: int,
                         grid_side: int, query_offsets: Tensor | None = None,
                         valid_rects: Sequence[Tensor] | None = None, masks: Sequence[Tensor] | None = None,
                         scale: float | None = None) -> Tensor:
    """Windowed multi-tower cross-attention; see `cambrian.kernels.sva_window_attention` for the contract.

    q: (B, h, w, heads*d); keys[i] / values[i]: (B, n_i, n_i, heads*d) -> (B, h, w, heads*d) in q's dtype.
    """
    keys, values = list(keys), list(values)
    out_dtype = q.dtype
    dtypes = {t.dtype for t in (q, *keys, *values)}
    if len(dtypes) > 1 or q.dtype not in _DTYPES:  # mixed / unsupported dtypes: compute in a common dtype
        common = functools.reduce(torch.promote_types, dtypes)
        common = common if common in _DTYPES else torch.float32
        q, keys, values = q.to(common), [k.to(common) for k in keys], [v.to(common) for v in values]
    b = q.shape[0]
    head_dim = q.shape[-1] // num_heads
    scale = head_dim ** -0.5 if scale is None else float(scale)
    rects = None
    if valid_rects is not None:
        rects = torch.stack([torch.as_tensor(r, dtype=torch.long, device=q.device).reshape(b, 4) for r in valid_rects])
    mask = None
    if masks is not None:
        mask = torch.cat([m.reshape(b, -1).to(torch.bool) for m in masks], dim=1)
    out, _ = torch.ops.cambrian.sva_window_attention(q, keys, values, int(num_heads), int(grid_side),
                                                     query_offsets, rects, mask, scale)
    return out if out.dtype == out_dtype else out.to(out_dtype)


# ---------------------------------------------------------------------------------------------------
# autograd + fake (meta) registrations
# ---------------------------------------------------------------------------------------------------
def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _interp_fake(features, src_sizes, dst_size):
    channels = sum(f.shape[-1] for f in features)
    return features[0].new_empty((features[0].shape[0], dst_size[0] * dst_size[1], channels))


def _interp_backward_fake(grad_out, src_sizes, dst_size, channels):
    b = grad_out.shape[0]
    return [grad_out.new_empty((b, src_sizes[2 * i] * src_sizes[2 * i + 1], c)) for i, c in enumerate(channels)]


def _attn_fake(q, keys, values, num_heads, grid_side, query_offsets, valid_rects, masks, scale):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((*q.shape[:3], num_heads), dtype=_lse_dtype(q.dtype))
    return out, lse


def _attn_backward_fake(grad_out, q, keys, values, lse, num_heads, grid_side, query_offsets, valid_rects, masks,
                        scale):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format)
    return like(q), [like(k) for k in keys], [like(v) for v in values]


def _pln_setup_context(ctx, inputs, output):
    grid, pos, window_side, eps = inputs
    ctx.window_side, ctx.eps = window_side, eps
    ctx.has_pos = pos is not None
    ctx.save_for_backward(grid, pos)


def _pln_backward(ctx, grad):
    """LayerNorm backward (no affine) on the recomputed sum, in float32 (float64 stays float64); pos gets the
    gradient summed over every window position it was added at."""
    grid, pos = ctx.saved_tensors
    acc = torch.float64 if grid.dtype == torch.float64 else torch.float32
    b, n, _, c = grid.shape
    r = ctx.window_side
    s = n // r
    v = grid.to(acc)
    if ctx.has_pos:
        v = (grid.reshape(b, s, r, s, r, c) + pos.view(1, 1, r, 1, r, c)).reshape(b, n, n, c).to(acc)
    xc = v - v.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + ctx.eps)
    xhat = xc * rstd
    g = grad.to(acc)
    gx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    gpos = None
    if ctx.has_pos:
        gpos = gx.reshape(b, s, r, s, r, c).sum(dim=(0, 1, 3)).reshape(r * r, c).to(pos.dtype)
    return gx.to(grid.dtype), gpos, None, None


def _register() -> None:
    lib = "cambrian::"
    torch.library.register_fake(lib + "multi_tower_interpolate", _interp_fake)
    torch.library.register_fake(lib + "multi_tower_interpolate_backward", _interp_backward_fake)
    torch.library.register_fake(lib + "multi_tower_interpolate_accumulate_", lambda out, features, src_sizes, dst_size: None)
    torch.library.register_fake(lib + "window_pos_layer_norm",
                                lambda grid, pos, window_side, eps: torch.empty_like(grid, memory_format=torch.contiguous_format))
    torch.library.register_fake(lib + "window_pos_layer_norm_out_", lambda out, grid, pos, window_side, eps: None)
    torch.library.register_autograd(lib + "window_pos_layer_norm", _pln_backward, setup_context=_pln_setup_context)
    torch.library.register_fake(lib + "sva_window_attention", _attn_fake)
    torch.library.register_fake(lib + "sva_window_attention_backward", _attn_backward_fake)


if _C is not None:
    _register()
