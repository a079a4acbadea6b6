"""The vision-language connector: `sva` (Spatial Vision Aggregator) or a plain `linear` / `mlp2x_gelu` projector.

SVA (see the design note `cambrian-sva.md`):

1. per tower i: `mm_projector_aux_i` = Linear(C_i, V) -> GELU -> Linear(V, V) -> LayerNorm(V), V = vision_hidden_size;
2. global context = mean of tower 0's projected tokens;
3. per query group g (side s_g): s_g×s_g copies of the learned `vision_query[g]` go through
   `vision_sampler_g` (depth D cross-attention layers); query (y, x) attends to window (y, x) of every
   tower (r_i×r_i tokens, r_i = n_i / s_g); a group whose side differs from the final grid is resized
   bilinearly to it;
4. group outputs concatenated on channels -> `mm_projector` = Linear(V·G, hidden) -> GELU -> Linear;
5. inference: unpad each image to its valid rectangle, append `image_newline` after every row
   (h·(w+1) tokens).  Training keeps the full grid and masks the padded keys in the attention.

Inside the LLM (`connector_only: false`), `vision_sampler_layers[k]` (one layer each, q_dim = hidden)
re-attend from the image tokens' hidden states to the same projected tower features, windows cut at the
final grid: `apply_sampler_layer`.

Tensors stay token-major: tower features are (B, n_i, n_i, V) grids; the attention core is
`cambrian.kernels.sva_window_attention` and every resize `cambrian.kernels.multi_tower_interpolate`, so
fused backends drop in without touching this file.  Parameter names are the checkpoint names minus the
leading `model.`.

Fused path (default; `connector.set_fused(False)` runs the straightforward math, the reference the
fused path is tested against — same parameters, same numbers up to float rounding):

* K/V folding: k_proj_i and v_proj_i see the same LayerNorm input x + pos, so it is normalised once
  without affine, and their LayerNorm affines fold into one Linear: [W_k·diag(γ_k); W_v·diag(γ_v)] with bias
  [W_k·β_k; W_v·β_v] -> K and V from a single (batch-2, shared-input) GEMM.  Folded weights are cached while no gradient is needed
  (keyed on the parameters' identity, version counters and storage) and recomputed with autograd otherwise.
* proj_in(concat(q, proj_context(c))) = q·W_q^T + proj_context(c)·W_c^T: the context half is one row per
  image instead of one per query.
* multi-stage towers (ConvNeXt): `forward` accepts the list of stage maps (B, C_k, h_k, w_k) for a tower;
  the first Linear of `mm_projector_aux_i` is applied per stage (`kernels.multi_tower_interpolate_linear`:
  project first where a stage is smaller than the tower grid, resize first where it is larger), never
  building the (B, n_i², ΣC_k) concatenation.
"""
from __future__ import annotations

import math
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from cambrian import kernels

from .config import SVA_NUM_HEADS, CambrianConfig, ConfigError

__all__ = ["build_connector", "CambrianConnector", "ConnectorOutput", "VisionSampler",
           "VisionCrossAttentionLayer", "MultiKVCrossAttention", "MLP"]

LAYER_NORM_EPS = 1e-5

# (row0, row1, col0, col1), ends excluded: the part of a grid kept for one image.
Rect = tuple[int, int, int, int]


# ---------------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """linear_1 -> exact-erf GELU -> linear_2, no biases (the layer's `proj_out`)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_hidden, bias=False)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class MultiKVCrossAttention(nn.Module):
    """q_proj / k_proj_i / v_proj_i (LayerNorm + Linear each) and o_proj around the windowed attention kernel."""

    def __init__(self, dim: int, num_towers: int, num_heads: int = SVA_NUM_HEADS):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.num_towers = num_towers
        self.fused = True
        self.q_proj = nn.Sequential(nn.LayerNorm(dim, eps=LAYER_NORM_EPS), nn.Linear(dim, dim, bias=False))
        for i in range(num_towers):
            setattr(self, f"k_proj_{i}", nn.Sequential(nn.LayerNorm(dim, eps=LAYER_NORM_EPS), nn.Linear(dim, dim, bias=False)))
            setattr(self, f"v_proj_{i}", nn.Sequential(nn.LayerNorm(dim, eps=LAYER_NORM_EPS), nn.Linear(dim, dim, bias=False)))
        self.o_proj = nn.Linear(dim, dim, bias=False)
        # tower -> (validity key, folded weight (2*dim, dim), folded bias (2*dim,)); not module state
        self._kv_cache: dict[int, tuple[tuple, Tensor, Tensor]] = {}

    def forward(self, x: Tensor, towers: Sequence[Tensor], grid_side: int,
                add_pos: Callable[..., Tensor] | None = None, workspace: dict | None = None,
                window_pos: Callable[[int, torch.dtype], tuple[Tensor | None, int]] | None = None,
                **window: Any) -> Tensor:
        """x: (B, h, w, dim) queries; towers: (B, n_i, n_i, dim) grids -> (B, h, w, dim).

        add_pos(i, grid, out=None) adds tower i's position embedding (None: the grids already carry it);
        applied one tower at a time, so only one position-embedded grid is alive at once.
        window_pos(i, dtype) -> (pos (r*r, dim) or None, r): tower i's window position embedding, added and
        normalised in one pass (`kernels.window_pos_layer_norm`, fused path; takes precedence over add_pos).
        workspace: a dict the caller keeps across the layers of one forward (fused path, no autograd): each
        tower's (2, M, dim) K/V buffer and one normalised-grid buffer (shared by the towers, sized for the
        largest) are reused by the next layer instead of allocated afresh (fresh allocations this large cost
        more in first-touch page faults than the passes that fill them).
        `window` is passed to `kernels.sva_window_attention` (query_offsets, valid_rects, masks).
        """
        q = self.q_proj(x)
        # Each grid token belongs to exactly one window, so projecting the whole grid once is the same
        # work as projecting the windows, and keeps the token-major layout the kernel reads.
        if self.fused:
            reuse = workspace is not None and not (torch.is_grad_enabled() and (
                any(t.requires_grad for t in towers) or any(p.requires_grad for p in self.parameters())))
            keys, values = [], []
            for i, t in enumerate(towers):
                shape, dim = t.shape, t.shape[-1]
                weight, bias = self.folded_kv(i)
                buf = normed_buf = None
                if reuse:
                    buf = _workspace_buffer(workspace, i, (2, t.numel() // dim, dim), t)
                    if window_pos is not None:   # one normalised-grid buffer shared by the towers (used at once)
                        normed_buf = _workspace_prefix(workspace, "normed", shape, t)
                if window_pos is not None:   # + pos and LayerNorm in one pass, into the reused buffer
                    pos, r = window_pos(i, t.dtype)
                    normed = kernels.window_pos_layer_norm(t, pos, r, LAYER_NORM_EPS, out=normed_buf)
                    normed = normed.reshape(-1, dim)                                    # (M, dim), shared by K and V
                else:
                    if add_pos is not None:
                        t = add_pos(i, t) if buf is None else add_pos(i, t, out=buf[0].view(shape))
                    normed = F.layer_norm(t, (dim,), eps=LAYER_NORM_EPS).reshape(-1, dim)
                del t  # the position-embedded grid is not needed past the normalisation
                # one batched GEMM over [W_k'; W_v'] with the input broadcast (stride 0, not copied): K and V
                # come out as two contiguous (M, dim) blocks, the layout the attention kernels read
                kv = torch.baddbmm(bias.view(2, 1, dim), normed.expand(2, -1, -1),
                                   weight.view(2, dim, dim).transpose(1, 2), out=buf)    # (2, M, dim)
                keys.append(kv[0].view(shape))
                values.append(kv[1].view(shape))
        else:
            towers = [add_pos(i, t) for i, t in enumerate(towers)] if add_pos is not None else towers
            keys = [getattr(self, f"k_proj_{i}")(t) for i, t in enumerate(towers)]
            values = [getattr(self, f"v_proj_{i}")(t) for i, t in enumerate(towers)]
        o = kernels.sva_window_attention(q, keys, values, num_heads=self.num_heads, grid_side=grid_side, **window)
        return self.o_proj(o)

    def _kv_params(self, i: int) -> tuple[Tensor, ...]:
        k_norm, k_lin = getattr(self, f"k_proj_{i}")
        v_norm, v_lin = getattr(self, f"v_proj_{i}")
        return k_norm.weight, k_norm.bias, k_lin.weight, v_norm.weight, v_norm.bias, v_lin.weight

    def folded_kv(self, i: int) -> tuple[Tensor, Tensor]:
        """Tower i's K/V projection with both LayerNorm affines folded in: weight (2*dim, dim), bias (2*dim,).

        LN_k(t) W_k^T = ((t - mu)/sigma * g_k + b_k) W_k^T = norm(t) (W_k diag(g_k))^T + W_k b_k, the same for v;
        K and V are the two halves of norm(t) @ weight^T + bias.  Computed in (at least) float32, cast to the
        Linear's dtype.  Cached while no gradient can flow (eval / no_grad / frozen); recomputed with autograd
        otherwise, so training updates reach the original parameters.
        """
        params = self._kv_params(i)
        cacheable = not (torch.is_grad_enabled() and any(p.requires_grad for p in params)) and _can_cache(params)
        if cacheable:
            hit = self._kv_cache.get(i)
            if hit is not None and _cache_key_matches(hit[0], params):
                return hit[1], hit[2]
        dtype = params[2].dtype
        g_k, b_k, w_k, g_v, b_v, w_v = (p.to(torch.promote_types(dtype, torch.float32)) for p in params)
        weight = torch.cat([w_k * g_k, w_v * g_v]).to(dtype)     # (2*dim, dim): column j scaled by g_j
        bias = torch.cat([w_k @ b_k, w_v @ b_v]).to(dtype)       # (2*dim,)
        if cacheable:
            self._kv_cache[i] = (_cache_key(params), weight, bias)
        return weight, bias


def _workspace_buffer(workspace: dict, key: Any, shape: Sequence[int], like: Tensor) -> Tensor:
    """workspace[key] if it is a buffer of that shape, dtype and device, else a new one stored there."""
    buf = workspace.get(key)
    if buf is None or buf.shape != tuple(shape) or buf.dtype != like.dtype or buf.device != like.device:
        buf = workspace[key] = like.new_empty(tuple(shape))
    return buf


def _workspace_prefix(workspace: dict, key: Any, shape: Sequence[int], like: Tensor) -> Tensor:
    """A `shape` view of the start of a flat buffer workspace[key], grown (replaced) when it is too small."""
    numel = math.prod(shape)
    buf = workspace.get(key)
    if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
        buf = None
        workspace.pop(key, None)  # free the old one before allocating its replacement
        buf = workspace[key] = like.new_empty(numel)
    return buf[:numel].view(tuple(shape))


def _can_cache(params: Sequence[Tensor]) -> bool:
    """Caching needs version counters (not inference tensors) and real storage (not tracing / compiling)."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return not any(p.is_inference() or p.is_meta for p in params)


def _cache_key(params: Sequence[Tensor]) -> tuple:
    # weakref: the cache never keeps a replaced parameter alive, and a new tensor reusing its id / address
    # cannot pass for it; _version counts in-place updates (optimizer steps, load_state_dict, copy_ under
    # no_grad); data_ptr / dtype / device catch `.data =` swaps and `.to()`.  Edits through `p.data` bypass
    # the version counter: call `CambrianConnector.clear_fused_cache()` after those.
    return tuple((weakref.ref(p), p._version, p.data_ptr(), p.dtype, p.device) for p in params)


def _cache_key_matches(key: tuple, params: Sequence[Tensor]) -> bool:
    return len(key) == len(params) and all(
        ref() is p and version == p._version and ptr == p.data_ptr() and dtype == p.dtype and device == p.device
        for (ref, version, ptr, dtype, device), p in zip(key, params))



class VisionCrossAttentionLayer(nn.Module):
    """One SVA cross-attention layer.

    x   = proj_in(concat(q, proj_context(c)))
    x   = x + o_proj(windowed_attention(q_proj(x), k_proj_i(tower_i + pos_i), v_proj_i(...)))
    out = proj_out(norm(x)) + q

    q_dim = V in the connector, the LLM width inside the LLM; all internal widths are V (= `dim`).
    `pos_embed_i` (r_i², V) exists only for towers whose window is bigger than one token.
    """

    def __init__(self, q_dim: int, dim: int, window_sides: Sequence[int], num_heads: int = SVA_NUM_HEADS):
        super().__init__()
        self.window_sides = [int(r) for r in window_sides]
        self.proj_context = nn.Linear(dim, dim, bias=False)
        self.proj_in = nn.Linear(q_dim + dim, dim, bias=False)
        self.proj_out = MLP(dim, dim, q_dim)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.cross_attn = MultiKVCrossAttention(dim, len(self.window_sides), num_heads)
        for i, r in enumerate(self.window_sides):
            if r > 1:
                pos = nn.Parameter(torch.empty(r * r, dim))
                nn.init.normal_(pos, std=1.0 / math.sqrt(dim))
                setattr(self, f"pos_embed_{i}", pos)

    def grid_side(self, towers: Sequence[Tensor]) -> int:
        """The window grid side s implied by the tower grids (n_i = s * r_i for every tower)."""
        if len(towers) != len(self.window_sides):
            raise ValueError(f"this sampler layer attends to {len(self.window_sides)} towers, got {len(towers)} grids")
        s = towers[0].shape[1] // self.window_sides[0]
        for i, (t, r) in enumerate(zip(towers, self.window_sides)):
            if t.dim() != 4 or t.shape[1] != t.shape[2] or t.shape[1] != s * r:
                raise ValueError(f"tower {i}: grid of shape {tuple(t.shape)} does not hold {s}x{s} windows of "
                                 f"{r}x{r} tokens (expected (B, {s * r}, {s * r}, C))")
        return s

    def window_pos_embed(self, i: int, dtype: torch.dtype) -> tuple[Tensor | None, int]:
        """(pos_embed_i in `dtype`, r_i), or (None, 1) for a tower whose windows are single tokens."""
        r = self.window_sides[i]
        if r == 1:
            return None, 1
        return getattr(self, f"pos_embed_{i}").to(dtype), r

    def add_pos_embed(self, i: int, grid: Tensor, out: Tensor | None = None) -> Tensor:
        """grid (B, n, n, V) + pos_embed_i at every window: token (y, x) gets row (y mod r)*r + (x mod r).

        out: an optional contiguous (B, n, n, V) buffer for the sum (no autograd); a tower without a
        position embedding (r = 1) returns `grid` itself either way.
        """
        r = self.window_sides[i]
        if r == 1:
            return grid
        b, n, _, c = grid.shape
        s = n // r
        pos = getattr(self, f"pos_embed_{i}").to(grid.dtype).view(1, 1, r, 1, r, c)
        if out is not None:
            torch.add(grid.reshape(b, s, r, s, r, c), pos, out=out.view(b, s, r, s, r, c))
            return out
        return (grid.reshape(b, s, r, s, r, c) + pos).reshape(b, n, n, c)

    def forward(self, queries: Tensor, context: Tensor, towers: Sequence[Tensor], workspace: dict | None = None,
                **window: Any) -> Tensor:
        """queries (B, h, w, q_dim), context (B, V), towers (B, n_i, n_i, V) -> (B, h, w, q_dim).

        workspace: see `MultiKVCrossAttention.forward` (fused path; None = no buffer reuse)."""
        s = self.grid_side(towers)
        b, h, w, q_dim = queries.shape
        if self.cross_attn.fused:
            # proj_in(concat(q, c')) = q W_q^T + c' W_c^T: the context half once per image, broadcast to the queries
            w_in = self.proj_in.weight                                           # (V, q_dim + V)
            ctx = F.linear(self.proj_context(context), w_in[:, q_dim:])         # (B, V)
            # 2-D GEMM: the layer-0 queries are a stride-0 broadcast, which 4-D matmul would run as a batched
            # GEMM with the weight copied per batch row
            x = F.linear(queries.reshape(b * h * w, q_dim), w_in[:, :q_dim]).view(b, h, w, -1)
            x = x + ctx[:, None, None, :]                                        # (B, h, w, V)
        else:
            ctx = self.proj_context(context)[:, None, None, :].expand(b, h, w, -1)  # same context for every query
            x = self.proj_in(torch.cat([queries, ctx], dim=-1))                     # (B, h, w, V)
        if self.cross_attn.fused:  # position embeddings added tower by tower inside, one grid alive at a time
            x = x + self.cross_attn(x, towers, s, window_pos=self.window_pos_embed, workspace=workspace, **window)
        else:
            grids = [self.add_pos_embed(i, t) for i, t in enumerate(towers)]
            x = x + self.cross_attn(x, grids, s, **window)
        return self.proj_out(self.norm(x)) + queries


class VisionSampler(nn.Module):
    """`depth` cross-attention layers applied in sequence (`vision_sampler_g`, `vision_sampler_layers.k`)."""

    def __init__(self, q_dim: int, dim: int, window_sides: Sequence[int], depth: int,
                 num_heads: int = SVA_NUM_HEADS):
        super().__init__()
        self.layers = nn.ModuleList([VisionCrossAttentionLayer(q_dim, dim, window_sides, num_heads)
                                     for _ in range(depth)])

    def forward(self, queries: Tensor, context: Tensor, towers: Sequence[Tensor], workspace: dict | None = None,
                **window: Any) -> Tensor:
        """workspace: K/V buffers shared by the layers (`MultiKVCrossAttention.forward`); None = a fresh dict."""
        workspace = {} if workspace is None else workspace
        for layer in self.layers:
            queries = layer(queries, context, towers, workspace=workspace, **window)
        return queries


# ---------------------------------------------------------------------------------------------------
# connector
# ---------------------------------------------------------------------------------------------------
@dataclass
class ConnectorOutput:
    """What the connector hands to the LLM wrapper.

    image_tokens: B tensors (h*(w+1), hidden), row-major, each row followed by `image_newline`.
    grid_sizes: B (h, w) kept grid sizes.
    kept_rects: B (row0, row1, col0, col1) kept part of the final grid (full grid when nothing is unpadded).
    For the in-LLM sampler layers (sva only, else None):
    tower_features: per tower (B, n_i, n_i, V) projected features; global_context: (B, V);
    valid_rects: per tower (B, 4) validity rectangles on the tower grid (inference form) or None;
    masks: per tower (B, n_i, n_i) bool validity (training form) or None.  Both None = no masking.
    """

    image_tokens: list[Tensor]
    grid_sizes: list[tuple[int, int]]
    kept_rects: list[Rect]
    full_grid: bool = False
    tower_features: list[Tensor] | None = None
    global_context: Tensor | None = None
    valid_rects: list[Tensor] | None = None
    masks: list[Tensor] | None = None

    @property
    def num_images(self) -> int:
        return len(self.image_tokens)

    def token_counts(self) -> list[int]:
        return [h * (w + 1) for h, w in self.grid_sizes]


@dataclass
class _Spec:
    """The connector's settings, from a `CambrianConfig` or a config.json dict."""

    projector_type: str
    hidden_size: int
    vision_hidden_size: int
    tower_names: list[str]
    token_lens: list[int]
    image_token_len: int
    query_num_list: list[int]
    connector_depth: int
    connector_only: bool
    num_sampler_layers: int
    tower_sides: list[int] = field(init=False)
    query_sides: list[int] = field(init=False)
    final_side: int = field(init=False)

    def __post_init__(self) -> None:
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"config key '{key}': {msg}")

        def side(n: int, key: str) -> int:
            s = math.isqrt(n) if isinstance(n, int) and n > 0 else -1
            if s * s != n:
                raise bad(key, f"{n!r} is not a square number of tokens")
            return s

        if self.projector_type not in ("linear", "mlp2x_gelu", "sva"):
            raise bad("mm_projector_type", f"unknown projector {self.projector_type!r}; expected linear, mlp2x_gelu or sva")
        if not self.token_lens:
            raise bad("mm_vision_tower_aux_token_len_list", "no vision towers")
        if len(self.tower_names) != len(self.token_lens):
            raise bad("mm_vision_tower_aux_token_len_list", f"has {len(self.token_lens)} entries but "
                      f"mm_vision_tower_aux_list names {len(self.tower_names)} towers")
        self.tower_sides = [side(n, "mm_vision_tower_aux_token_len_list") for n in self.token_lens]
        self.final_side = side(self.image_token_len, "image_token_len")
        self.query_sides = [side(q, "query_num_list") for q in self.query_num_list]
        if self.projector_type != "sva":
            return
        if not self.query_num_list:
            raise bad("query_num_list", "needs at least one query group")
        if self.vision_hidden_size % SVA_NUM_HEADS:
            raise bad("vision_hidden_size", f"{self.vision_hidden_size} is not divisible by the {SVA_NUM_HEADS} heads")
        if self.connector_depth < 1:
            raise bad("connector_depth", "must be >= 1")
        for g, s in enumerate(self.query_sides):
            for name, n in zip(self.tower_names, self.tower_sides):
                if n % s:
                    raise bad("query_num_list", f"group {g}: query grid side {s} does not divide the grid side {n} "
                              f"of tower {name!r} (windows must tile the tower grid)")
        if not self.connector_only:
            for name, n in zip(self.tower_names, self.tower_sides):
                if n % self.final_side:
                    raise bad("image_token_len", f"final grid side {self.final_side} does not divide the grid side "
                              f"{n} of tower {name!r} (needed by the in-LLM vision sampler layers)")
            if self.num_sampler_layers < 0:
                raise bad("num_of_vision_sampler_layers", "must be >= 0")

    @classmethod
    def from_config(cls, config: CambrianConfig | Mapping[str, Any]) -> "_Spec":
        defaults = CambrianConfig()  # no llm_config: not validated, just the field defaults
        if isinstance(config, CambrianConfig):
            get = lambda k: getattr(config, k)  # noqa: E731
            hidden = config.hidden_size
        elif isinstance(config, Mapping):
            if "hidden_size" not in config:
                raise ConfigError("config key 'hidden_size': missing (the LLM width the projector maps to)")
            get = lambda k: config.get(k, getattr(defaults, k))  # noqa: E731
            hidden = config["hidden_size"]
        else:
            raise TypeError(f"build_connector: config must be a CambrianConfig or a dict, got {type(config).__name__}")
        token_lens = list(get("mm_vision_tower_aux_token_len_list") or [])
        if not token_lens and isinstance(config, Mapping):
            token_lens = list(config.get("vision_tower_aux_token_len_list") or [])
        names = list(get("mm_vision_tower_aux_list") or []) or [f"tower_{i}" for i in range(len(token_lens))]
        query_num_list = list(get("query_num_list"))
        num_groups = get("num_query_group")
        if get("mm_projector_type") == "sva" and num_groups != len(query_num_list):
            raise ConfigError(f"config key 'query_num_list': has {len(query_num_list)} entries but "
                              f"num_query_group is {num_groups}")
        return cls(projector_type=get("mm_projector_type"), hidden_size=int(hidden),
                   vision_hidden_size=int(get("vision_hidden_size")), tower_names=[str(n) for n in names],
                   token_lens=[int(n) for n in token_lens], image_token_len=int(get("image_token_len")),
                   query_num_list=[int(q) for q in query_num_list], connector_depth=int(get("connector_depth")),
                   connector_only=bool(get("connector_only")),
                   num_sampler_layers=int(get("num_of_vision_sampler_layers")))


class CambrianConnector(nn.Module):
    """Tower features -> image tokens for the LLM (+ the in-LLM vision sampler layers). Build with `build_connector`."""

    def __init__(self, spec: _Spec, tower_hidden_sizes: Sequence[int], fused: bool = True):
        super().__init__()
        tower_hidden_sizes = [int(c) for c in tower_hidden_sizes]
        if len(tower_hidden_sizes) != len(spec.token_lens):
            raise ValueError(f"got hidden sizes for {len(tower_hidden_sizes)} towers but the config lists "
                             f"{len(spec.token_lens)} ({', '.join(spec.tower_names)})")
        self.spec = spec
        self.projector_type = spec.projector_type
        self.tower_hidden_sizes = tower_hidden_sizes
        self.tower_sides = spec.tower_sides
        self.final_side = spec.final_side
        self.query_sides = spec.query_sides
        hidden, v = spec.hidden_size, spec.vision_hidden_size

        if spec.projector_type == "sva":
            for i, c in enumerate(tower_hidden_sizes):
                setattr(self, f"mm_projector_aux_{i}", nn.Sequential(
                    nn.Linear(c, v), nn.GELU(), nn.Linear(v, v), nn.LayerNorm(v, eps=LAYER_NORM_EPS)))
            self.vision_query = nn.Parameter(torch.empty(len(spec.query_sides), v))
            nn.init.normal_(self.vision_query, std=1.0 / math.sqrt(v))
            for g, s in enumerate(spec.query_sides):
                setattr(self, f"vision_sampler_{g}",
                        VisionSampler(v, v, [n // s for n in self.tower_sides], spec.connector_depth))
            self.mm_projector = nn.Sequential(nn.Linear(v * len(spec.query_sides), hidden), nn.GELU(),
                                              nn.Linear(hidden, hidden))
            if not spec.connector_only:
                windows = [n // self.final_side for n in self.tower_sides]
                self.vision_sampler_layers = nn.ModuleList(
                    [VisionSampler(hidden, v, windows, 1) for _ in range(spec.num_sampler_layers)])
        elif spec.projector_type == "linear":
            self.mm_projector = nn.Linear(sum(tower_hidden_sizes), hidden)
        else:  # mlp2x_gelu
            self.mm_projector = nn.Sequential(nn.Linear(sum(tower_hidden_sizes), hidden), nn.GELU(),
                                              nn.Linear(hidden, hidden))
        self.image_newline = nn.Parameter(torch.empty(hidden))
        nn.init.normal_(self.image_newline, std=1.0 / math.sqrt(hidden))
        self.set_fused(fused)

    @property
    def num_sampler_layers(self) -> int:
        """How many in-LLM vision sampler layers exist (0 for connector_only or non-sva projectors)."""
        layers = getattr(self, "vision_sampler_layers", None)
        return len(layers) if layers is not None else 0

    # ------------------------------------------------------------------ fused / reference path
    @property
    def fused(self) -> bool:
        """True: the fused path (folded K/V, per-stage first projection); False: the straightforward math."""
        return self._fused

    def set_fused(self, enabled: bool = True) -> "CambrianConnector":
        """Switch every layer between the fused path and the reference (unfused) path; returns self."""
        self._fused = bool(enabled)
        for m in self.modules():
            if isinstance(m, MultiKVCrossAttention):
                m.fused = self._fused
        return self

    def clear_fused_cache(self) -> None:
        """Drop the cached folded K/V weights (needed only after editing parameters through `.data`)."""
        for m in self.modules():
            if isinstance(m, MultiKVCrossAttention):
                m._kv_cache.clear()

    # ------------------------------------------------------------------ checks
    def _check_features(self, tower_features: Sequence[Tensor | Sequence[Tensor]]) -> list[Tensor | list[Tensor]]:
        """Validate and cast: per tower a (B, L_i, C_i) tensor or a list of (B, C_k, h_k, w_k) stage maps."""
        names, lens = self.spec.tower_names, self.spec.token_lens
        if isinstance(tower_features, Tensor) or len(tower_features) != len(lens):
            got = "one tensor" if isinstance(tower_features, Tensor) else f"{len(tower_features)}"
            raise ValueError(f"connector expects features from {len(lens)} towers ({', '.join(names)}), got {got}")
        dtype = self.mm_projector_dtype
        batch = _batch_of(tower_features[0])
        out: list[Tensor | list[Tensor]] = []
        for i, (f, n, c) in enumerate(zip(tower_features, lens, self.tower_hidden_sizes)):
            if isinstance(f, Tensor):
                if f.dim() != 3:
                    raise ValueError(f"tower {i} ({names[i]!r}): features must be (B, tokens, channels) or a list of "
                                     f"(B, C_k, h_k, w_k) stage maps, got shape {tuple(f.shape)}")
                if f.shape[1] != n:
                    raise ValueError(f"tower {i} ({names[i]!r}): got {f.shape[1]} tokens, expected {n} "
                                     f"(a {math.isqrt(n)}x{math.isqrt(n)} grid, mm_vision_tower_aux_token_len_list)")
                if f.shape[2] != c:
                    raise ValueError(f"tower {i} ({names[i]!r}): got {f.shape[2]} channels, expected {c}")
                if f.shape[0] != batch:
                    raise ValueError(f"tower {i} ({names[i]!r}): batch {f.shape[0]} differs from tower 0's batch {batch}")
                out.append(f.to(dtype))
                continue
            stages = list(f)
            if not stages or any(not isinstance(m, Tensor) or m.dim() != 4 for m in stages):
                raise ValueError(f"tower {i} ({names[i]!r}): a multi-stage tower's features must be a non-empty list of "
                                 f"(B, C_k, h_k, w_k) stage maps")
            if sum(m.shape[1] for m in stages) != c:
                raise ValueError(f"tower {i} ({names[i]!r}): stage maps have {[m.shape[1] for m in stages]} channels, "
                                 f"{sum(m.shape[1] for m in stages)} in total, expected {c}")
            if any(m.shape[0] != batch for m in stages):
                raise ValueError(f"tower {i} ({names[i]!r}): stage batches {[m.shape[0] for m in stages]} differ from "
                                 f"tower 0's batch {batch}")
            out.append([m.to(dtype) for m in stages])
        return out

    def _token_grid(self, i: int, f: Tensor | list[Tensor]) -> Tensor:
        """Tower i's (B, n_i², C_i) grid; a stage list is resized to n_i and concatenated (`to_token_grid`'s math)."""
        if isinstance(f, Tensor):
            return f
        n = self.tower_sides[i]
        tokens = [m.flatten(2).transpose(1, 2) for m in f]   # (B, h*w, C_k) views of the conv layout, no copy
        return kernels.multi_tower_interpolate(tokens, [tuple(m.shape[-2:]) for m in f], (n, n))

    def _project_tower(self, i: int, f: Tensor | list[Tensor], workspace: dict | None = None) -> Tensor:
        """mm_projector_aux_i on tower i -> (B, n_i², V).

        Fused path with a stage list: the first Linear per stage, without the (B, n_i², ΣC_k) concatenation.
        Without autograd, the two (B, n_i², V) intermediates (first Linear, GELU in place; second Linear) are
        written into tower i's (2, B·n_i², V) K/V buffer in `workspace` (see `MultiKVCrossAttention.forward`),
        which the sampler layers then reuse: one allocation, first-touched once, instead of four.
        """
        proj = getattr(self, f"mm_projector_aux_{i}")
        if isinstance(f, Tensor) or not self._fused:
            return proj(self._token_grid(i, f))
        n, first = self.tower_sides[i], proj[0]
        tokens = [m.flatten(2).transpose(1, 2) for m in f]   # (B, h*w, C_k) views of the conv layout, no copy
        sizes = [tuple(m.shape[-2:]) for m in f]
        plain = (len(proj) == 4 and isinstance(proj[1], nn.GELU) and isinstance(proj[2], nn.Linear)
                 and proj[2].in_features == proj[2].out_features and isinstance(proj[3], nn.LayerNorm))
        needs_grad = torch.is_grad_enabled() and (any(m.requires_grad for m in f)
                                                  or any(p.requires_grad for p in proj.parameters()))
        if workspace is None or not plain or needs_grad:
            x = kernels.multi_tower_interpolate_linear(tokens, sizes, (n, n), first.weight, first.bias)  # (B, n², V)
            return proj[1:](x)
        b, v = f[0].shape[0], first.out_features
        buf = tokens[0].new_empty((2, b * n * n, v))
        workspace[i] = buf
        x = kernels.multi_tower_interpolate_linear(tokens, sizes, (n, n), first.weight, first.bias,
                                                   out=buf[0].view(b, n * n, v))
        x = torch.ops.aten.gelu_(x, approximate=proj[1].approximate)  # in place: no second (B, n², V) tensor
        second = proj[2]
        y = buf[1]
        if second.bias is not None:
            torch.addmm(second.bias, x.view(-1, v), second.weight.t(), out=y)
        else:
            torch.mm(x.view(-1, v), second.weight.t(), out=y)
        return proj[3](y.view(b, n * n, -1))

    @property
    def mm_projector_dtype(self) -> torch.dtype:
        return self.image_newline.dtype

    # ------------------------------------------------------------------ forward
    def forward(self, tower_features: Sequence[Tensor], image_sizes: Sequence[Sequence[int]] | None = None,
                keep_full_grid: bool | None = None,
                attention_masks: Sequence[Tensor] | None = None) -> ConnectorOutput:
        """Tower features -> image tokens.

        tower_features: per tower (B, L_i, C_i) on its token grid (L_i = mm_vision_tower_aux_token_len_list[i]),
            or, for a multi-stage tower (ConvNeXt), the list of its stage maps (B, C_k, h_k, w_k) in conv layout
            with ΣC_k = C_i (resized to the tower grid inside; the fused path never concatenates them).
        image_sizes: B original (width, height), or None = nothing to unpad or mask.
        keep_full_grid: None -> `self.training`.  True: full grid, padded keys masked (explicit bool masks);
            False: padded keys masked (rectangles), then each image unpadded to its valid rectangle.
        attention_masks: optional explicit per-tower key validity, (B, L_i) or (B, n_i, n_i) bool (e.g. from
            a training data loader); overrides the masks derived from image_sizes.
        """
        full = self.training if keep_full_grid is None else bool(keep_full_grid)
        feats = self._check_features(tower_features)
        b, dev = _batch_of(feats[0]), _device_of(feats[0])
        if image_sizes is not None and len(image_sizes) != b:
            raise ValueError(f"image_sizes has {len(image_sizes)} entries for a batch of {b} images")
        fs = self.final_side
        if image_sizes is not None and not full:
            kept = [kernels.image_valid_rect(size, fs) for size in image_sizes]
        else:
            kept = [(0, fs, 0, fs)] * b

        out = ConnectorOutput(image_tokens=[], grid_sizes=[], kept_rects=kept, full_grid=full)
        if self.projector_type == "sva":
            grid = self._sva(feats, image_sizes, full, attention_masks, out)            # (B, F*F, V*G)
        else:
            grids = [self._token_grid(i, f) for i, f in enumerate(feats)]
            grid = kernels.multi_tower_interpolate(grids, [(n, n) for n in self.tower_sides], (fs, fs))
        x = self.mm_projector(grid).reshape(b, fs, fs, -1)                               # (B, F, F, hidden)

        newline = self.image_newline.to(device=dev, dtype=x.dtype)
        for i, (r0, r1, c0, c1) in enumerate(kept):
            tokens = x[i, r0:r1, c0:c1]                                                   # (h, w, hidden)
            h, w = r1 - r0, c1 - c0
            tokens = torch.cat([tokens, newline.expand(h, 1, -1)], dim=1)                 # (h, w+1, hidden)
            out.image_tokens.append(tokens.reshape(h * (w + 1), x.shape[-1]))  # h may be 0 (extreme aspect ratio)
            out.grid_sizes.append((h, w))
        return out

    def _validity(self, b: int, image_sizes: Sequence[Sequence[int]] | None, full: bool,
                  attention_masks: Sequence[Tensor] | None, device: torch.device) -> dict[str, list[Tensor]]:
        """Key validity per tower: rectangles (inference), bool masks (training / given), or none."""
        if attention_masks is not None:
            if len(attention_masks) != len(self.tower_sides):
                raise ValueError(f"attention_masks has {len(attention_masks)} entries for {len(self.tower_sides)} towers")
            masks = []
            for i, (m, n) in enumerate(zip(attention_masks, self.tower_sides)):
                if m.numel() != b * n * n:
                    raise ValueError(f"attention_masks[{i}] has shape {tuple(m.shape)}, expected ({b}, {n * n}) "
                                     f"or ({b}, {n}, {n})")
                masks.append(m.to(device=device, dtype=torch.bool).reshape(b, n, n))
            return {"masks": masks}
        if image_sizes is None:
            return {}
        rects = [kernels.image_valid_rects(image_sizes, n, device) for n in self.tower_sides]
        if full:
            return {"masks": [kernels.rects_to_mask(r, n) for r, n in zip(rects, self.tower_sides)]}
        return {"valid_rects": rects}

    def _sva(self, feats: list[Tensor | list[Tensor]], image_sizes: Sequence[Sequence[int]] | None, full: bool,
             attention_masks: Sequence[Tensor] | None, out: ConnectorOutput) -> Tensor:
        b, v = _batch_of(feats[0]), self.spec.vision_hidden_size
        workspace: dict = {}  # per-tower K/V buffers shared by the projection and the sampler layers (fused path)
        projected = [self._project_tower(i, f, workspace) for i, f in enumerate(feats)]        # (B, L_i, V)
        context = projected[0].mean(dim=1)                                                      # (B, V)
        grids = [p.reshape(b, n, n, v) for p, n in zip(projected, self.tower_sides)]
        validity = self._validity(b, image_sizes, full, attention_masks, _device_of(feats[0]))

        groups = []
        for g, s in enumerate(self.query_sides):
            queries = self.vision_query[g].to(grids[0].dtype).view(1, 1, 1, v).expand(b, s, s, v)
            q = getattr(self, f"vision_sampler_{g}")(queries, context, grids, workspace=workspace,
                                                      **validity)                             # (B, s, s, V)
            groups.append(q.reshape(b, s * s, v))
        fs = self.final_side
        # groups on a coarser/finer query grid are resized to the final grid; all concatenated on channels
        grid = kernels.multi_tower_interpolate(groups, [(s, s) for s in self.query_sides], (fs, fs))

        out.tower_features = grids
        out.global_context = context
        out.valid_rects = validity.get("valid_rects")
        out.masks = validity.get("masks")
        return grid

    # ------------------------------------------------------------------ in-LLM sampler layers
    def apply_sampler_layer(self, k: int, hidden_states: Tensor,
                            image_starts: Sequence[int | tuple[int, int] | None], output: ConnectorOutput) -> Tensor:
        """Run in-LLM vision sampler layer k on the image tokens' hidden states; returns a new tensor.

        hidden_states: (B, S, hidden).  image_starts[i]: where image i's h*(w+1) tokens start — an int
        (image i is in batch row i), a (row, start) tuple (several images per row), or None (image i is
        not in the sequence, e.g. truncated away).  The queries are the image tokens without the newline
        positions, each at its final-grid cell (row + kept row offset, col + kept col offset); the keys
        are the windows of `output.tower_features` cut at the final grid.  Newlines are left untouched.
        """
        if self.num_sampler_layers == 0:
            raise ValueError("this connector has no in-LLM vision sampler layers (connector_only or not sva)")
        if not 0 <= k < self.num_sampler_layers:
            raise ValueError(f"sampler layer index {k} out of range (0..{self.num_sampler_layers - 1})")
        if output.tower_features is None:
            raise ValueError("the ConnectorOutput carries no tower features (not produced by an sva connector)")
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be (B, S, hidden), got shape {tuple(hidden_states.shape)}")
        if len(image_starts) != output.num_images:
            raise ValueError(f"image_starts has {len(image_starts)} entries for {output.num_images} images")
        rows, seq_len, _ = hidden_states.shape
        sampler = self.vision_sampler_layers[k]
        dtype = sampler.layers[0].proj_in.weight.dtype
        dev = hidden_states.device

        placed: list[tuple[int, int, int]] = []   # (row, start, image)
        for i, st in enumerate(image_starts):
            if st is None:
                continue
            row, start = (i, st) if isinstance(st, Integral) else (int(st[0]), int(st[1]))
            h, w = output.grid_sizes[i]
            if not 0 <= row < rows or start < 0 or start + h * (w + 1) > seq_len:
                raise ValueError(f"image {i}: {h * (w + 1)} tokens at row {row}, position {start} do not fit "
                                 f"hidden states of shape {tuple(hidden_states.shape)}")
            placed.append((int(row), int(start), i))
        placed.sort()
        for (r0, s0, i0), (r1, s1, _) in zip(placed, placed[1:]):
            h, w = output.grid_sizes[i0]
            if r0 == r1 and s0 + h * (w + 1) > s1:
                raise ValueError(f"image {i0} (row {r0}, tokens {s0}..{s0 + h * (w + 1) - 1}) overlaps the next image at {s1}")
        if not placed:
            return hidden_states

        # images with the same kept grid size share one kernel call
        by_size: dict[tuple[int, int], list[tuple[int, int, int]]] = defaultdict(list)
        for row, start, i in placed:
            h, w = output.grid_sizes[i]
            if h * w:  # an image unpadded to nothing has no queries
                by_size[(h, w)].append((row, start, i))
        if not by_size:
            return hidden_states

        row_idx, pos_idx, new_values = [], [], []
        for (h, w), items in by_size.items():
            rows_t = torch.tensor([r for r, _, _ in items], device=dev)
            starts = torch.tensor([s for _, s, _ in items], device=dev)
            sel = torch.tensor([i for _, _, i in items], device=output.global_context.device)
            # sequence position of cell (y, x): start + y*(w+1) + x  (the newline sits at x = w)
            pos = (starts[:, None, None] + torch.arange(h, device=dev)[:, None] * (w + 1)
                   + torch.arange(w, device=dev))                                        # (n, h, w)
            rr = rows_t[:, None, None].expand_as(pos)
            queries = hidden_states[rr, pos].to(dtype)                                   # (n, h, w, hidden)
            images = [i for _, _, i in items]
            if images == list(range(output.num_images)):   # every image, in order: no gather copy of the towers
                towers = [t.to(dtype) for t in output.tower_features]
            else:
                towers = [t[sel].to(dtype) for t in output.tower_features]
            context = output.global_context[sel].to(dtype)
            offsets = torch.tensor([[output.kept_rects[i][0], output.kept_rects[i][2]] for _, _, i in items],
                                   dtype=torch.long, device=dev)
            window: dict[str, Any] = {"query_offsets": offsets}
            if output.valid_rects is not None:
                window["valid_rects"] = [r[sel] for r in output.valid_rects]
            if output.masks is not None:
                window["masks"] = [m[sel] for m in output.masks]
            new = sampler(queries, context, towers, **window)                             # (n, h, w, hidden)
            row_idx.append(rr.reshape(-1))
            pos_idx.append(pos.reshape(-1))
            new_values.append(new.reshape(-1, new.shape[-1]).to(hidden_states.dtype))
        # out-of-place scatter: autograd-safe, the input tensor is not modified
        return hidden_states.index_put((torch.cat(row_idx), torch.cat(pos_idx)), torch.cat(new_values))


def build_connector(config: CambrianConfig | Mapping[str, Any], tower_hidden_sizes: Sequence[int],
                    fused: bool = True) -> CambrianConnector:
    """The connector for a config (a `CambrianConfig`, or a config.json dict with `hidden_size` = LLM width).

    tower_hidden_sizes: the channels each tower hands over (C_i), in `mm_vision_tower_aux_list` order.
    fused: start on the fused path (default) or the reference path (`CambrianConnector.set_fused`).
    A dict needs no other LLM keys: the in-LLM layers follow `num_of_vision_sampler_layers`.
    Raises `ConfigError` (a ValueError) naming the offending key for inconsistent settings.
    """
    return CambrianConnector(_Spec.from_config(config), tower_hidden_sizes, fused=fused)


def _batch_of(f: Tensor | Sequence[Tensor]) -> int:
    return f.shape[0] if isinstance(f, Tensor) else f[0].shape[0]


def _device_of(f: Tensor | Sequence[Tensor]) -> torch.device:
    return f.device if isinstance(f, Tensor) else f[0].device
