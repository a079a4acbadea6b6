"""Reference kernels: plain, readable PyTorch (any device, autograd through ordinary ops).

These define the numbers every other backend (`cpp`, `triton`, `cuda`) must reproduce.  They are
called through `cambrian.kernels`, which validates the arguments first, so nothing here re-checks
shapes.  Both kernels compute in float32 and cast the result back to the input dtype.

Layouts
-------
* token-major grid: a tower's features are (B, h*w, C) or (B, h, w, C), row-major over the grid
  (token index = y*w + x), channels last.  No (B, C, H, W) copies are made.
* windows: the key grid of side n = s*r is cut into s×s windows of r×r tokens; window (wy, wx) holds
  the tokens (wy*r + dy, wx*r + dx), in key order dy*r + dx.  Windows are read through the view
  (B, s, r, s, r, C) of the token-major grid.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["multi_tower_interpolate", "multi_tower_interpolate_add_", "multi_tower_interpolate_linear",
           "window_pos_layer_norm", "sva_window_attention", "is_available", "supports"]


def is_available() -> bool:
    """The reference backend needs nothing but torch."""
    return True


def supports(op: str, device: torch.device) -> bool:
    """Every op on every device."""
    return op in ("multi_tower_interpolate", "multi_tower_interpolate_add_", "multi_tower_interpolate_linear",
                  "window_pos_layer_norm", "sva_window_attention")


# ---------------------------------------------------------------------------------------------------
# bilinear resize
# ---------------------------------------------------------------------------------------------------
def _linear_taps(n_in: int, n_out: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Source indices and weights of 1-D linear interpolation, align_corners=False.

    This is PyTorch's rule (`area_pixel_compute_source_index`), in float32 like its kernels:
    src = (dst + 0.5) * (n_in / n_out) - 0.5, clamped at 0; i0 = floor(src), i1 = min(i0 + 1, n_in - 1);
    out = (1 - l) * x[i0] + l * x[i1] with l = src - i0.
    """
    scale = torch.tensor(float(n_in), dtype=torch.float32, device=device) / n_out  # float32 ratio, as in torch
    dst = torch.arange(n_out, dtype=torch.float32, device=device)
    src = ((dst + 0.5) * scale - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    l1 = (src - i0.float()).clamp(0.0, 1.0)
    return i0, i1, 1.0 - l1, l1


def _bilinear_grid(x: Tensor, out_h: int, out_w: int) -> Tensor:
    """(B, h, w, C) float32 -> (B, out_h, out_w, C); along the columns first, then the rows (torch's order)."""
    _, h, w, _ = x.shape
    c0, c1, wc0, wc1 = _linear_taps(w, out_w, x.device)
    cols = x[:, :, c0] * wc0[:, None] + x[:, :, c1] * wc1[:, None]            # (B, h, out_w, C)
    r0, r1, wr0, wr1 = _linear_taps(h, out_h, x.device)
    return cols[:, r0] * wr0[:, None, None] + cols[:, r1] * wr1[:, None, None]  # (B, out_h, out_w, C)


def multi_tower_interpolate(features: Sequence[Tensor], src_sizes: Sequence[tuple[int, int]],
                            dst_size: tuple[int, int]) -> Tensor:
    """Resize each (B, h_i*w_i, C_i) grid to dst_size and concatenate on channels -> (B, H*W, sum C_i).

    Bilinear, align_corners=False, no antialias, computed in float32 and cast back to each input's dtype
    (the numbers of `F.interpolate(x.float(), size, mode="bilinear")` on (B, C, h, w), same weights and
    summation order; float32 results may differ in the last bit where torch's kernel fuses a multiply-add).  A grid already
    at dst_size is copied unchanged.  The result has the dtype of `features[0]`.
    """
    out_h, out_w = dst_size
    parts = []
    for x, (h, w) in zip(features, src_sizes):
        b, _, c = x.shape
        if (h, w) == (out_h, out_w):
            parts.append(x)
            continue
        y = _bilinear_grid(x.reshape(b, h, w, c).float(), out_h, out_w)
        parts.append(y.to(x.dtype).reshape(b, out_h * out_w, c))
    dtype = features[0].dtype
    return torch.cat([p.to(dtype) for p in parts], dim=-1)


def multi_tower_interpolate_add_(out: Tensor, features: Sequence[Tensor], src_sizes: Sequence[tuple[int, int]],
                                 dst_size: tuple[int, int], *,
                                 interpolate: Callable[..., Tensor] = multi_tower_interpolate) -> Tensor:
    """In place: out += multi_tower_interpolate(features, src_sizes, dst_size); returns out (autograd as `add_`).

    `interpolate` is the resize used (the dispatcher passes the chosen backend's `multi_tower_interpolate`).
    """
    return out.add_(interpolate(features, src_sizes, dst_size))


def multi_tower_interpolate_linear(features: Sequence[Tensor], src_sizes: Sequence[tuple[int, int]],
                                   dst_size: tuple[int, int], weight: Tensor, bias: Tensor | None = None, *,
                                   interpolate: Callable[..., Tensor] = multi_tower_interpolate,
                                   interpolate_add: Callable[..., Tensor] | None = None,
                                   out: Tensor | None = None) -> Tensor:
    """`F.linear(multi_tower_interpolate(features, src_sizes, dst_size), weight, bias)` without the concatenation.

    Bilinear resizing is linear and acts on each channel separately, so with W_i the column block of
    `weight` for grid i's channels: Linear(concat_i(resize(x_i))) = sum_i resize(x_i @ W_i^T) + b.  Per grid
    the cheaper order is taken: project first when the grid has fewer tokens than the target (fewer rows to
    project), resize first when it has more; a grid already at the target size is only projected.  The
    (B, H*W, sum C_i) concatenation is never built; the largest intermediate is one (B, H*W, max(C_i, out)).

    features: list of (B, h_i*w_i, C_i), any strides (e.g. the transposed view of a (B, C, h, w) map);
    weight: (out, sum C_i); bias: (out,) or None.  Returns (B, H*W, out) in the features' dtype.
    `interpolate` is the resize used (the dispatcher passes the chosen backend's `multi_tower_interpolate`);
    `interpolate_add(y, features, src_sizes, dst_size)`, when given, adds a project-first part's resize straight
    into the accumulated result without autograd (`multi_tower_interpolate_add_`: no resized temporary, no add pass).
    out: optional contiguous (B, H*W, out) buffer the result is written into (and returned); no autograd.
    Same numbers as the unfused form up to float rounding (sums are reassociated).
    """
    out_h, out_w = dst_size
    n_dst = out_h * out_w
    batch, out_dim = features[0].shape[0], weight.shape[0]
    # accumulate into one buffer unless autograd needs the parts
    inplace = not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*features, weight, bias)))
    y: Tensor | None = None
    # GEMM parts first (resize-first / same-size grids), so the bias rides on the first addmm
    order = sorted(range(len(features)), key=lambda i: src_sizes[i][0] * src_sizes[i][1] < n_dst)
    offsets = [0]
    for x in features:
        offsets.append(offsets[-1] + x.shape[-1])
    for i in order:
        x, (h, w) = features[i], src_sizes[i]
        w_i = weight[:, offsets[i]:offsets[i + 1]]                        # (out, C_i) column block, a view
        if h * w >= n_dst:
            if (h, w) != (out_h, out_w):
                x = interpolate([x], [(h, w)], (out_h, out_w))             # (B, H*W, C_i): resize first
            x2 = x.reshape(batch * n_dst, x.shape[-1])
            if y is None and out is not None:
                y2 = out.view(batch * n_dst, out_dim)
                if bias is not None:
                    torch.addmm(bias, x2, w_i.t(), out=y2)
                else:
                    torch.mm(x2, w_i.t(), out=y2)
                y = out
            elif y is None:
                y = (torch.addmm(bias, x2, w_i.t()) if bias is not None else x2 @ w_i.t()).view(batch, n_dst, out_dim)
            elif inplace:  # accumulate in place (out= rather than addmm_, which FLOP counters do not see)
                y2 = y.view(batch * n_dst, out_dim)
                torch.addmm(y2, x2, w_i.t(), out=y2)
            else:
                y = y + (x2 @ w_i.t()).view(batch, n_dst, out_dim)
        else:
            z = torch.matmul(x, w_i.t())                                  # (B, h*w, out): project first
            if y is not None and inplace and interpolate_add is not None:
                interpolate_add(y, [z], [(h, w)], (out_h, out_w))          # y += resize(z), in place
                continue
            z = interpolate([z], [(h, w)], (out_h, out_w))                 # (B, H*W, out)
            if y is None and out is not None:
                y = torch.add(z, bias, out=out) if bias is not None else out.copy_(z)
            elif y is None:
                y = z + bias if bias is not None else z
            elif inplace:
                y.add_(z)
            else:
                y = y + z
    return y


# ---------------------------------------------------------------------------------------------------
# position embedding + LayerNorm
# ---------------------------------------------------------------------------------------------------
def window_pos_layer_norm(grid: Tensor, pos: Tensor | None, window_side: int, eps: float = 1e-5, *,
                          out: Tensor | None = None) -> Tensor:
    """LayerNorm without affine of grid + pos tiled over the r×r windows (token (y, x) gets pos[(y mod r)*r + (x mod r)]).

    grid: (B, n, n, C); pos: (r*r, C) of grid's dtype, or None (plain LayerNorm); r = window_side.  The sum is
    rounded to grid's dtype before it is normalised (as a separate add would).  out: optional buffer (no autograd).
    """
    b, n, _, c = grid.shape
    t = grid
    if pos is not None:
        r = window_side
        s = n // r
        t = (grid.reshape(b, s, r, s, r, c) + pos.view(1, 1, r, 1, r, c)).reshape(b, n, n, c)
    y = F.layer_norm(t, (c,), eps=eps)
    return y if out is None else out.copy_(y)


# ---------------------------------------------------------------------------------------------------
# windowed cross-attention
# ---------------------------------------------------------------------------------------------------
def _window_index(b: int, h: int, w: int, offsets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Index tensors (B,1,1), (B,h,1), (B,1,w): query (b, y, x) reads window (y + row0_b, x + col0_b)."""
    dev = offsets.device
    bi = torch.arange(b, device=dev)[:, None, None]
    wy = (offsets[:, 0, None] + torch.arange(h, device=dev))[:, :, None]
    wx = (offsets[:, 1, None] + torch.arange(w, device=dev))[:, None, :]
    return bi, wy, wx


def _rect_validity(rect: Tensor, wy: Tensor, wx: Tensor, r: int) -> Tensor:
    """Key validity (B, h, w, r, r) of the windows read by (wy, wx), from rect = (B, 4) [row0, row1, col0, col1).

    Computed from row and column ranges (outer product of two 1-D tests), never from a stored mask.
    """
    d = torch.arange(r, device=rect.device)
    ys = wy[:, :, 0, None] * r + d                                  # (B, h, r) grid rows of the keys
    xs = wx[:, 0, :, None] * r + d                                  # (B, w, r) grid cols of the keys
    vy = (ys >= rect[:, 0, None, None]) & (ys < rect[:, 1, None, None])
    vx = (xs >= rect[:, 2, None, None]) & (xs < rect[:, 3, None, None])
    return vy[:, :, None, :, None] & vx[:, None, :, None, :]


def sva_window_attention(q: Tensor, keys: Sequence[Tensor], values: Sequence[Tensor], *, num_heads: int,
                         grid_side: int, query_offsets: Tensor | None = None,
                         valid_rects: Sequence[Tensor] | None = None, masks: Sequence[Tensor] | None = None,
                         scale: float | None = None) -> Tensor:
    """Windowed multi-tower cross-attention (see `cambrian.kernels.sva_window_attention` for the contract).

    q: (B, h, w, heads*d); keys[i] / values[i]: (B, n_i, n_i, heads*d); returns (B, h, w, heads*d).
    """
    b, h, w, dim = q.shape
    head_dim = dim // num_heads
    s = grid_side
    scale = head_dim ** -0.5 if scale is None else scale
    if query_offsets is None:
        query_offsets = torch.zeros(b, 2, dtype=torch.long, device=q.device)
    bi, wy, wx = _window_index(b, h, w, query_offsets)

    qh = q.float().reshape(b, h, w, num_heads, head_dim) * scale     # (B, h, w, H, d)
    logits, vwins = [], []
    for i, (k, v) in enumerate(zip(keys, values)):
        r = k.shape[1] // s
        # (B, s, r, s, r, D) view of the grid; advanced indexing on (batch, window row, window col)
        # puts the broadcast (B, h, w) first: -> (B, h, w, r, r, D), key order dy*r + dx.
        kw = k.reshape(b, s, r, s, r, dim)[bi, wy, :, wx, :].reshape(b, h, w, r * r, num_heads, head_dim)
        vw = v.reshape(b, s, r, s, r, dim)[bi, wy, :, wx, :].reshape(b, h, w, r * r, num_heads, head_dim)
        li = torch.einsum("byxhe,byxkhe->byxhk", qh, kw.float())  # (B, h, w, H, r*r)

        valid = None
        if valid_rects is not None:
            valid = _rect_validity(valid_rects[i], wy, wx, r)
        elif masks is not None:
            valid = masks[i].reshape(b, s, r, s, r)[bi, wy, :, wx, :]
        if valid is not None:
            valid = valid.reshape(b, h, w, r * r)
            valid = valid | ~valid.any(dim=-1, keepdim=True)  # a window with no valid key is all valid
            li = li.masked_fill(~valid[:, :, :, None, :], float("-inf"))
        logits.append(li)
        vwins.append(vw.float())

    probs = torch.softmax(torch.cat(logits, dim=-1), dim=-1)  # (B, h, w, H, sum r_i^2)
    out = None
    for p, vw in zip(probs.split([l.shape[-1] for l in logits], dim=-1), vwins):
        o = torch.einsum("byxhk,byxkhe->byxhe", p, vw)
        out = o if out is None else out + o
    return out.reshape(b, h, w, dim).to(q.dtype)
