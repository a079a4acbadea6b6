"""`cambrian.kernels`: the connector's two hot ops, behind a small backend registry.

Ops (public entry points here validate their arguments, then call the chosen backend):

* `multi_tower_interpolate(features, src_sizes, dst_size)`: bilinear resize of token-major grids,
  concatenated on channels.
* `sva_window_attention(q, keys, values, *, num_heads, grid_side, ...)`: the SVA windowed multi-tower
  cross-attention core (after q/k/v projections, before o_proj).
* `multi_tower_interpolate_add_(out, features, src_sizes, dst_size)`: the same resize added in place into an
  existing (B, H*W, sum C_i) tensor (a backend may implement it natively; otherwise `out.add_` of the chosen
  backend's `multi_tower_interpolate`).
* `window_pos_layer_norm(grid, pos, window_side, eps, out=None)`: a window-tiled position embedding added to a
  (B, n, n, C) grid and LayerNorm (no affine) in one pass, optionally into an existing buffer.
* `multi_tower_interpolate_linear(features, src_sizes, dst_size, weight, bias)`: the resize + concatenate
  followed by a Linear, without building the concatenation (a composite op: a backend may implement it
  natively; otherwise it is built from the chosen backend's `multi_tower_interpolate` and torch GEMMs).

Backends are modules exposing the op functions plus `is_available() -> bool` and
`supports(op, device) -> bool`.  `BACKENDS` maps a name to its module path; only `reference` is
shipped now, `cpp` / `triton` / `cuda` are reserved and picked up as soon as their module exists
(nothing in the model changes).  Selection per call:

* `CAMBRIAN_KERNELS=<name>` forces that backend for every op; an unknown name, a backend that cannot
  be imported / is unavailable, or one that lacks the op on that device raises `KernelBackendError`.
* otherwise the first available backend in `PREFERENCE[device.type]` that supports the op.

Also here: the unpad geometry shared by unpadding and attention masks (`image_valid_rect`,
`image_valid_rects`, `rects_to_mask`).
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "multi_tower_interpolate", "multi_tower_interpolate_add_", "multi_tower_interpolate_linear", "sva_window_attention",
    "window_pos_layer_norm", "image_valid_rect",
    "image_valid_rects", "rects_to_mask",
    "get_backend", "available_backends", "register_backend", "KernelBackendError", "BACKENDS", "PREFERENCE",
    "ENV_VAR",
]

ENV_VAR = "CAMBRIAN_KERNELS"

# name -> module path.  A later issue adds the module file; the name is already reserved here.
BACKENDS: dict[str, str] = {
    "reference": "cambrian.kernels.reference",
    "cpp": "cambrian.kernels.cpp",
    "triton": "cambrian.kernels.triton_kernels",
    "cuda": "cambrian.kernels.cuda",
}
# Default order per device type, best first; `reference` always closes the list.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpp", "reference"),
}
OPS = ("multi_tower_interpolate", "sva_window_attention")


class KernelBackendError(RuntimeError):
    """A forced kernel backend is unknown, unavailable, or does not implement the op."""


_modules: dict[str, ModuleType | None] = {}
_import_errors: dict[str, str] = {}


def register_backend(name: str, module_path: str, prefer_on: Sequence[str] = ()) -> None:
    """Add (or repoint) a backend; `prefer_on` device types put it first in their default order."""
    BACKENDS[name] = module_path
    _modules.pop(name, None)
    _import_errors.pop(name, None)
    for dev in prefer_on:
        order = [n for n in PREFERENCE.get(dev, ("reference",)) if n != name]
        PREFERENCE[dev] = (name, *order)


def _load(name: str) -> ModuleType | None:
    """Import a backend module once; None (with the reason kept) when it is missing or unavailable."""
    if name not in _modules:
        module = None
        try:
            module = importlib.import_module(BACKENDS[name])
            if hasattr(module, "is_available") and not module.is_available():
                _import_errors[name] = f"{BACKENDS[name]}.is_available() returned False"
                module = None
        except ImportError as exc:  # not built / not installed / module not written yet
            _import_errors[name] = f"{type(exc).__name__}: {exc}"
        _modules[name] = module
    return _modules[name]


def _supports(module: ModuleType, op: str, device: torch.device) -> bool:
    if not hasattr(module, op):
        return False
    return module.supports(op, device) if hasattr(module, "supports") else True


def available_backends() -> list[str]:
    """Names of the backends that import and report themselves available."""
    return [name for name in BACKENDS if _load(name) is not None]


def get_backend(op: str, device: torch.device | str) -> ModuleType:
    """The backend module that will run `op` on `device` (honours CAMBRIAN_KERNELS)."""
    device = torch.device(device)
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise KernelBackendError(f"{ENV_VAR}={forced!r} is not a kernel backend; "
                                     f"choose one of {', '.join(BACKENDS)}")
        module = _load(forced)
        if module is None:
            raise KernelBackendError(f"{ENV_VAR}={forced!r}: backend is not available here "
                                     f"({_import_errors.get(forced, 'unknown reason')}); "
                                     f"available: {', '.join(available_backends())}")
        if not _supports(module, op, device):
            raise KernelBackendError(f"{ENV_VAR}={forced!r}: backend does not implement {op} "
                                     f"on device type {device.type!r}")
        return module
    for name in PREFERENCE.get(device.type, ("reference",)):
        module = _load(name)
        if module is not None and _supports(module, op, device):
            return module
    return _load("reference")  # supports every op on every device


# ---------------------------------------------------------------------------------------------------
# unpad geometry
# ---------------------------------------------------------------------------------------------------
def image_valid_rect(image_size: Sequence[int], side: int) -> tuple[int, int, int, int]:
    """The part of a side×side grid covered by the original image, as (row0, row1, col0, col1), ends excluded.

    image_size = original (width, height); the image was padded to a square (centred), then resized.
    The original rule, integer floors and float order included (`unpad_image` of Cambrian/LLaVA):
    if W/H > 1: new_h = int(H * (side / W)), p = (side - new_h) // 2, keep rows p .. side-p-1;
    else:       new_w = int(W * (side / H)), p = (side - new_w) // 2, keep cols p .. side-p-1.
    (`H * (side / W)` is what the released code computes; exact `H*side // W` differs for a few sizes,
    e.g. (88, 55) on 24: 14 vs 15 -> p = 5 vs 4.)
    """
    width, height = int(image_size[0]), int(image_size[1])
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be a positive (width, height), got {tuple(image_size)}")
    if width / height > 1.0:
        new_h = int(height * (side / width))
        p = (side - new_h) // 2
        return p, side - p, 0, side
    new_w = int(width * (side / height))
    p = (side - new_w) // 2
    return 0, side, p, side - p


def image_valid_rects(image_sizes: Sequence[Sequence[int]], side: int,
                      device: torch.device | str | None = None) -> Tensor:
    """`image_valid_rect` for a batch -> LongTensor (B, 4) [row0, row1, col0, col1)."""
    rects = [image_valid_rect(size, side) for size in image_sizes]
    return torch.tensor(rects, dtype=torch.long, device=device).reshape(len(rects), 4)


def rects_to_mask(rects: Tensor, side: int) -> Tensor:
    """(B, 4) rectangles -> explicit boolean masks (B, side, side), True inside."""
    idx = torch.arange(side, device=rects.device)
    rows = (idx >= rects[:, 0, None]) & (idx < rects[:, 1, None])  # (B, side)
    cols = (idx >= rects[:, 2, None]) & (idx < rects[:, 3, None])
    return rows[:, :, None] & cols[:, None, :]


# ---------------------------------------------------------------------------------------------------
# public ops
# ---------------------------------------------------------------------------------------------------
def multi_tower_interpolate(features: Sequence[Tensor], src_sizes: Sequence[Sequence[int]],
                            dst_size: Sequence[int]) -> Tensor:
    """Resize token-major grids to one size and concatenate them on channels.

    features: list of (B, h_i*w_i, C_i); src_sizes: list of (h_i, w_i); dst_size: (H, W).
    Returns (B, H*W, sum C_i) in the dtype of features[0].  Each grid is resized with bilinear
    interpolation, align_corners=False, no antialias, computed in float32 and cast back — the numbers of
    `F.interpolate(x.float(), (H, W), mode="bilinear", align_corners=False)` on the (B, C_i, h_i, w_i)
    layout.  A grid already at (H, W) is copied unchanged.
    """
    features, src_sizes = list(features), [tuple(int(v) for v in s) for s in src_sizes]
    dst = tuple(int(v) for v in dst_size)
    _check_grids("multi_tower_interpolate", features, src_sizes, dst)
    return get_backend("multi_tower_interpolate", features[0].device).multi_tower_interpolate(features, src_sizes, dst)


def multi_tower_interpolate_add_(out: Tensor, features: Sequence[Tensor], src_sizes: Sequence[Sequence[int]],
                                 dst_size: Sequence[int]) -> Tensor:
    """In place: out += multi_tower_interpolate(features, src_sizes, dst_size); returns out.

    out: (B, H*W, sum C_i), any float dtype; the resize is rounded to the features' dtype before it is added,
    as in `out.add_(multi_tower_interpolate(...))`, which this equals (autograd included: an in-place op like
    `Tensor.add_`).  A backend's native version writes the sum without a resized temporary; a backend without
    one (even when forced) serves the op as `out.add_` of its own `multi_tower_interpolate`.  The backend is
    the one `multi_tower_interpolate` would use on that device.
    """
    op = "multi_tower_interpolate_add_"
    features, src_sizes = list(features), [tuple(int(v) for v in s) for s in src_sizes]
    dst = tuple(int(v) for v in dst_size)
    _check_grids(op, features, src_sizes, dst)
    shape = (features[0].shape[0], dst[0] * dst[1], sum(x.shape[-1] for x in features))
    if out.shape != shape or not out.is_floating_point() or out.device != features[0].device:
        raise ValueError(f"{op}: out must be a float tensor of shape {shape} on {features[0].device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    return _interpolate_add_op(features[0].device)(out, features, src_sizes, dst)


def _interpolate_add_op(device: torch.device):
    """multi_tower_interpolate_add_ of the backend serving multi_tower_interpolate on `device` (honours
    CAMBRIAN_KERNELS): its native version, else `reference.multi_tower_interpolate_add_` around its resize."""
    backend = get_backend("multi_tower_interpolate", device)
    if backend is not _load("reference") and _supports(backend, "multi_tower_interpolate_add_", device):
        return backend.multi_tower_interpolate_add_
    return functools.partial(_load("reference").multi_tower_interpolate_add_, interpolate=backend.multi_tower_interpolate)


def window_pos_layer_norm(grid: Tensor, pos: Tensor | None, window_side: int, eps: float = 1e-5, *,
                          out: Tensor | None = None) -> Tensor:
    """LayerNorm without affine (over the last dim) of `grid` plus a position embedding tiled over windows.

    grid: (B, n, n, C) float; pos: (r*r, C) in grid's dtype, or None (a plain LayerNorm), r = window_side dividing n:
    token (y, x) gets pos[(y mod r)*r + (x mod r)] (the SVA key/value position embedding).  The sum is rounded to
    grid's dtype, then normalised: the numbers of `F.layer_norm(grid + tiled pos, (C,), eps=eps)` up to float
    rounding, autograd included.  out (keyword): an optional contiguous tensor like grid written in place and
    returned, inference only (ValueError when autograd would need the inputs).  Dispatch: the chosen backend's
    version, the reference one when a forced backend lacks it.
    """
    op = "window_pos_layer_norm"
    r = int(window_side)
    if grid.dim() != 4 or grid.shape[1] != grid.shape[2] or not grid.is_floating_point():
        raise ValueError(f"{op}: grid must be a float (B, n, n, C) tensor, got {grid.dtype} {tuple(grid.shape)}")
    if r <= 0 or grid.shape[1] % r:
        raise ValueError(f"{op}: window side {window_side} does not divide the grid side {grid.shape[1]}")
    if pos is not None and (pos.shape != (r * r, grid.shape[-1]) or pos.dtype != grid.dtype or pos.device != grid.device):
        raise ValueError(f"{op}: pos must be ({r * r}, {grid.shape[-1]}) in {grid.dtype} on {grid.device}, got "
                         f"{pos.dtype} {tuple(pos.shape)} on {pos.device}")
    kw = {}
    if out is not None:
        if out.shape != grid.shape or out.dtype != grid.dtype or out.device != grid.device or not out.is_contiguous():
            raise ValueError(f"{op}: out must be a contiguous {grid.dtype} tensor of shape {tuple(grid.shape)} on "
                             f"{grid.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
        if torch.is_grad_enabled() and (grid.requires_grad or (pos is not None and pos.requires_grad)):
            raise ValueError(f"{op}: out= does not support autograd (an input requires grad)")
        if out.device.type != "meta" and out.data_ptr() == grid.data_ptr():
            raise ValueError(f"{op}: out must not be the grid")
        kw["out"] = out
    try:
        backend = get_backend(op, grid.device)
    except KernelBackendError:
        backend = _load("reference")
    return backend.window_pos_layer_norm(grid, pos, r, float(eps), **kw)


def _check_grids(op: str, features: list[Tensor], src_sizes: list[tuple[int, ...]], dst: tuple[int, ...]) -> None:
    if not features:
        raise ValueError(f"{op}: no feature grids given")
    if len(src_sizes) != len(features):
        raise ValueError(f"{op}: {len(features)} feature grids but {len(src_sizes)} source sizes")
    if len(dst) != 2 or min(dst) <= 0:
        raise ValueError(f"{op}: dst_size must be a positive (H, W), got {dst}")
    batch = features[0].shape[0]
    for i, (x, (h, w)) in enumerate(zip(features, src_sizes)):
        if x.dim() != 3 or x.shape[0] != batch or x.shape[1] != h * w:
            raise ValueError(f"{op}: grid {i} has shape {tuple(x.shape)}, expected "
                             f"({batch}, {h}*{w}={h * w}, C) for source size ({h}, {w})")
        if not x.is_floating_point():
            raise ValueError(f"{op}: grid {i} has dtype {x.dtype}, expected a float type")


def multi_tower_interpolate_linear(features: Sequence[Tensor], src_sizes: Sequence[Sequence[int]],
                                   dst_size: Sequence[int], weight: Tensor, bias: Tensor | None = None, *,
                                   out: Tensor | None = None) -> Tensor:
    """`F.linear(multi_tower_interpolate(features, src_sizes, dst_size), weight, bias)`, never building the concatenation.

    features: list of (B, h_i*w_i, C_i) token-major grids (any strides: the transposed view
    `x.flatten(2).transpose(1, 2)` of a (B, C, h, w) map is read in place); src_sizes: list of (h_i, w_i);
    dst_size: (H, W); weight: (out, sum C_i); bias: (out,) or None.  Returns (B, H*W, out).
    out (keyword): an optional contiguous (B, H*W, out) tensor of the result's dtype and device to write the
    result into (returned); inference only (ValueError when autograd would need the inputs).

    Because bilinear resizing is linear per channel, the result is sum_i resize(x_i @ W_i^T) + b with W_i the
    column block of grid i: grids smaller than the target are projected first, larger ones resized first.
    Equal to the unfused form up to float rounding.  Dispatch: a backend's native
    `multi_tower_interpolate_linear` if the chosen backend has one, else the composite of
    `reference.multi_tower_interpolate_linear` around the chosen backend's `multi_tower_interpolate`
    (so a forced backend without the native op still serves it).
    """
    op = "multi_tower_interpolate_linear"
    features, src_sizes = list(features), [tuple(int(v) for v in s) for s in src_sizes]
    dst = tuple(int(v) for v in dst_size)
    _check_grids(op, features, src_sizes, dst)
    channels = sum(x.shape[-1] for x in features)
    if weight.dim() != 2 or weight.shape[1] != channels:
        raise ValueError(f"{op}: weight must be (out, {channels}) for grids with {channels} channels in total, "
                         f"got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{op}: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    device = features[0].device
    kw = {}
    if out is not None:
        shape = (features[0].shape[0], dst[0] * dst[1], weight.shape[0])
        if out.shape != shape or out.dtype != features[0].dtype or out.device != device or not out.is_contiguous():
            raise ValueError(f"{op}: out must be a contiguous {features[0].dtype} tensor of shape {shape} on {device}, "
                             f"got {out.dtype} {tuple(out.shape)} on {out.device}")
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*features, weight, bias)):
            raise ValueError(f"{op}: out= does not support autograd (an input requires grad)")
        kw["out"] = out
    try:
        backend = get_backend(op, device)
    except KernelBackendError:
        backend = None  # forced backend without a native version: compose it from that backend's resize
    reference = _load("reference")
    if backend is not None and backend is not reference:
        return backend.multi_tower_interpolate_linear(features, src_sizes, dst, weight, bias, **kw)
    interp_backend = get_backend("multi_tower_interpolate", device)
    interpolate_add = None  # native in-place resize-and-add only: the composite's own y.add_ is the same otherwise
    if interp_backend is not reference and _supports(interp_backend, "multi_tower_interpolate_add_", device):
        interpolate_add = interp_backend.multi_tower_interpolate_add_
    return reference.multi_tower_interpolate_linear(features, src_sizes, dst, weight, bias,
                                                    interpolate=interp_backend.multi_tower_interpolate,
                                                    interpolate_add=interpolate_add, **kw)


def sva_window_attention(q: Tensor, keys: Sequence[Tensor], values: Sequence[Tensor], *, num_heads: int,
                         grid_side: int, query_offsets: Tensor | Sequence[Sequence[int]] | None = None,
                         valid_rects: Sequence[Tensor] | None = None, masks: Sequence[Tensor] | None = None,
                         scale: float | None = None) -> Tensor:
    """SVA windowed cross-attention over several towers (projected q/k/v in, pre-o_proj output out).

    Args:
        q: (B, h, w, heads*d) queries on a query grid.  Query (b, y, x) sits at cell
            (y + row0_b, x + col0_b) of the s×s window grid (s = `grid_side`); h + row0_b <= s, w + col0_b <= s.
        keys, values: one (B, n_i, n_i, heads*d) tensor per tower, token-major grid (already through
            pos_embed + k_proj / v_proj).  n_i must be a multiple of s; r_i = n_i / s.  The query at window
            (wy, wx) attends to the r_i×r_i tokens (wy*r_i + dy, wx*r_i + dx) of every tower (key order
            dy*r_i + dx, towers in list order), jointly softmaxed: sum_i r_i^2 keys per query.
        num_heads: heads; d = q.shape[-1] / num_heads.
        grid_side: s.
        query_offsets: (B, 2) ints (row0_b, col0_b) or None (= 0): the query sub-rectangle, used inside the
            LLM where the queries are the kept (unpadded) cells of the final grid.
        valid_rects: rectangle validity, one (B, 4) int tensor per tower, [row0, row1, col0, col1) on that
            tower's own grid; keys outside are masked.  (Inference form: no mask tensor is stored.)
        masks: explicit validity, one (B, n_i, n_i) bool tensor per tower (training form).
            At most one of valid_rects / masks; neither = every key valid.
            In both forms, per tower: a window with no valid key is made all valid.
        scale: logit scale, default 1/sqrt(d).

    Returns:
        (B, h, w, heads*d) in q's dtype (computed in float32 by the reference backend).
    """
    if q.dim() != 4:
        raise ValueError(f"sva_window_attention: q must be (B, h, w, heads*d), got shape {tuple(q.shape)}")
    b, h, w, dim = q.shape
    if num_heads <= 0 or dim % num_heads:
        raise ValueError(f"sva_window_attention: q width {dim} is not divisible by num_heads={num_heads}")
    keys, values = list(keys), list(values)
    if not keys or len(keys) != len(values):
        raise ValueError(f"sva_window_attention: need the same non-zero number of key and value grids, "
                         f"got {len(keys)} and {len(values)}")
    s = int(grid_side)
    if s <= 0:
        raise ValueError(f"sva_window_attention: grid_side must be positive, got {grid_side}")
    for i, (k, v) in enumerate(zip(keys, values)):
        if k.dim() != 4 or k.shape[0] != b or k.shape[1] != k.shape[2] or k.shape[3] != dim:
            raise ValueError(f"sva_window_attention: keys[{i}] has shape {tuple(k.shape)}, expected ({b}, n, n, {dim})")
        if v.shape != k.shape:
            raise ValueError(f"sva_window_attention: values[{i}] shape {tuple(v.shape)} != keys[{i}] shape {tuple(k.shape)}")
        if k.shape[1] % s:
            raise ValueError(f"sva_window_attention: tower {i} grid side {k.shape[1]} is not divisible by the "
                             f"window grid side {s} (windows must tile the grid)")
    if valid_rects is not None and masks is not None:
        raise ValueError("sva_window_attention: give valid_rects or masks, not both")
    if valid_rects is not None:
        valid_rects = [torch.as_tensor(r, dtype=torch.long, device=q.device) for r in valid_rects]
        if len(valid_rects) != len(keys) or any(r.shape != (b, 4) for r in valid_rects):
            raise ValueError(f"sva_window_attention: valid_rects must be {len(keys)} tensors of shape ({b}, 4), got "
                             f"{[tuple(r.shape) for r in valid_rects]}")
    if masks is not None:
        masks = list(masks)
        if len(masks) != len(keys):
            raise ValueError(f"sva_window_attention: {len(masks)} masks for {len(keys)} towers")
        for i, (m, k) in enumerate(zip(masks, keys)):
            if m.dtype != torch.bool or m.shape != k.shape[:3]:
                raise ValueError(f"sva_window_attention: masks[{i}] must be bool of shape {tuple(k.shape[:3])}, "
                                 f"got {m.dtype} {tuple(m.shape)}")
    if query_offsets is not None:
        query_offsets = torch.as_tensor(query_offsets, dtype=torch.long, device=q.device).reshape(-1, 2)
        if query_offsets.shape[0] != b:
            raise ValueError(f"sva_window_attention: query_offsets has {query_offsets.shape[0]} rows for batch {b}")
        lo = query_offsets.min(dim=0).values.tolist()
        hi = query_offsets.max(dim=0).values.tolist()
        if min(lo) < 0 or hi[0] + h > s or hi[1] + w > s:
            raise ValueError(f"sva_window_attention: a {h}x{w} query grid at offsets {query_offsets.tolist()} "
                             f"does not fit the {s}x{s} window grid")
    elif h != s or w != s:
        raise ValueError(f"sva_window_attention: q grid {h}x{w} differs from the {s}x{s} window grid; "
                         "pass query_offsets for a sub-rectangle")
    backend = get_backend("sva_window_attention", q.device)
    return backend.sva_window_attention(q, keys, values, num_heads=num_heads, grid_side=s,
                                        query_offsets=query_offsets, valid_rects=valid_rects, masks=masks,
                                        scale=scale)
