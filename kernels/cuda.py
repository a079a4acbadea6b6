"""CUDA backend: the kernels of `csrc/cuda/` behind the same `torch.ops.cambrian` ops as the C++ CPU backend.

`csrc/cuda/cuda_ops.cu` adds CUDA implementations (`TORCH_LIBRARY_IMPL(cambrian, CUDA, m)`) of the ops
that `csrc/cpu/ops.cpp` declares; setup.py compiles them into `cambrian.kernels._C` when torch has CUDA.
Autograd formulas and fake (meta) implementations are registered once, per op and for every device,
by `cambrian.kernels.cpp`, so this module only checks availability and routes: its op functions are
the C++ backend's wrappers (argument packing, dtype handling), which dispatch on the tensors' device.

Kernels (csrc/cuda/cuda_kernels.cu): interpolation one thread per output element with ATen's source
indices computed without FMA contraction (the reference's numbers), a gather backward without atomics;
attention one warp per (query, head) with an online softmax over the query's windows of every tower,
float32 accumulation (float64 for float64), and a backward that writes each key's gradient from the one
warp that reads it.
"""
from __future__ import annotations

import torch

from . import cpp

__all__ = ["multi_tower_interpolate", "sva_window_attention", "is_available", "supports", "unavailable_reason"]

_OPS = ("multi_tower_interpolate", "sva_window_attention")
# every op the CUDA build must implement for this backend to be usable
_NATIVE_OPS = ("multi_tower_interpolate", "multi_tower_interpolate_backward", "sva_window_attention",
               "sva_window_attention_backward")

# Same entry points as the C++ backend: torch.ops.cambrian.* picks the CUDA kernels for CUDA tensors.
multi_tower_interpolate = cpp.multi_tower_interpolate
sva_window_attention = cpp.sva_window_attention


def _has_cuda_kernels() -> bool:
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"cambrian::{op}", "CUDA") for op in _NATIVE_OPS)


def unavailable_reason() -> str:
    """Why `is_available()` is False ('' when it is True)."""
    if not cpp.is_available():
        return cpp.UNAVAILABLE_REASON
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if not _has_cuda_kernels():
        return ("cambrian.kernels._C was built without the CUDA kernels (torch without CUDA at build time, "
                "or CAMBRIAN_SKIP_CUDA=1); rebuild with a CUDA torch")
    return ""


def is_available() -> bool:
    """A CUDA device is present and the extension carries CUDA implementations of the cambrian ops."""
    return unavailable_reason() == ""


def supports(op: str, device: torch.device | str) -> bool:
    """Both ops, CUDA tensors only."""
    return op in _OPS and torch.device(device).type == "cuda"
