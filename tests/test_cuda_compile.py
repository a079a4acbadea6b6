"""CUDA kernels (csrc/cuda/): they compile for sm_80 / sm_90, and their logic is right.

No GPU here, so two checks keep the sources from rotting:

1. every `csrc/cuda/*.cu` is compiled with nvcc for sm_80 and sm_90 (one nvcc call per file, both
   architectures, the include paths and defines a torch CUDA extension build uses), and the object
   must hold a cubin for each;
2. the kernels themselves (csrc/cuda/cuda_kernels.cu, unchanged) are built for the host with the small
   CUDA emulation in csrc/cuda/emulation/ (each warp = 32 threads meeting at a barrier for every
   shuffle) and run through ctypes against the reference backend: forward and backward, odd shapes,
   rectangles, masks, query sub-rectangles, float32/float64/float16/bfloat16, strided inputs.
   The Python wrappers below fill the kernels' parameter blocks the way csrc/cuda/cuda_ops.cu does.

Timing on the 2-core dev box: cuda_kernels.cu ~4 s, cuda_ops.cu (torch headers) 20-35 s, emulation
~15 s; the file ~40 s.
"""
from __future__ import annotations

import ctypes
import glob
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cambrian import kernels
from cambrian.kernels import reference

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(glob.glob(str(CUDA_DIR / "*.cu")))
ARCHS = (80, 90)


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


NVCC = find_nvcc()


def find_cuobjdump() -> str | None:
    """cuobjdump next to nvcc, else the copy bundled with Triton."""
    candidates = [os.path.join(os.path.dirname(NVCC), "cuobjdump")] if NVCC else []
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if os.path.exists(c)), shutil.which("cuobjdump"))


# ---------------------------------------------------------------------------------------------------
# 1. nvcc compile for sm_80 + sm_90
# ---------------------------------------------------------------------------------------------------
def nvcc_command(src: str, obj: Path) -> list[str]:
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    torch_inc = include_paths()
    cmd = [NVCC, "-c", src, "-o", str(obj), "-O3", "-std=c++17",  # setup.py's nvcc flags
           *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS],
           *COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC",
           "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-DCAMBRIAN_WITH_CUDA=1",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           f"-I{ROOT / 'csrc'}", *[f"-I{p}" for p in torch_inc], f"-I{sysconfig.get_paths()['include']}"]
    # A CPU-only torch ships the c10/cuda headers but not their generated config header.
    if not any(os.path.exists(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for p in torch_inc):
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return cmd


def test_there_are_cuda_sources():
    names = {os.path.basename(f) for f in CU_FILES}
    assert {"cuda_kernels.cu", "cuda_ops.cu"} <= names


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
@pytest.mark.parametrize("src", CU_FILES, ids=[os.path.basename(f) for f in CU_FILES])
def test_cu_file_compiles_for_sm80_and_sm90(src, tmp_path):
    obj = tmp_path / (Path(src).stem + ".o")
    proc = subprocess.run(nvcc_command(src, obj), capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"nvcc failed for {src}:\n{proc.stderr[-6000:]}"
    assert obj.exists() and obj.stat().st_size > 0
    cuobjdump = find_cuobjdump()
    if "__global__" in Path(src).read_text() and cuobjdump:  # kernels inside: one cubin per architecture
        listing = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True, text=True,
                                 check=False).stdout
        for arch in ARCHS:
            assert f"sm_{arch}" in listing, f"no sm_{arch} cubin in {obj.name}:\n{listing}"


# ---------------------------------------------------------------------------------------------------
# 2. the kernels on the host emulation
# ---------------------------------------------------------------------------------------------------
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
P = ctypes.c_void_p
I64 = ctypes.c_int64


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def i64s(values) -> ctypes.Array:
    values = [int(v) for v in values]
    return (I64 * max(len(values), 1))(*values)


def ptrs(tensors) -> ctypes.Array:
    return (P * len(tensors))(*[t.data_ptr() for t in tensors])


class EmulatedCuda:
    """The CUDA kernels run on the host; wrappers mirror csrc/cuda/cuda_ops.cu."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.emu_interp_forward.argtypes = [P, I64, I64, I64, P, I64, I64, P, ctypes.c_int]
        self.lib.emu_interp_backward.argtypes = [P, I64, I64, P, P, ctypes.c_int]
        self.lib.emu_window_attention.argtypes = [ctypes.c_int, ctypes.c_int, P, P, P, P, P, P, P, P, I64, P,
                                                  ctypes.c_double, P, P, P, P, P, P]

    def multi_tower_interpolate(self, features, src_sizes, dst):
        b, (out_h, out_w) = features[0].shape[0], dst
        out = torch.empty(b, out_h * out_w, sum(x.shape[2] for x in features), dtype=features[0].dtype)
        c_off = 0
        for x, (h, w) in zip(features, src_sizes):
            c = x.shape[2]
            dst_slice = out.narrow(2, c_off, c)
            c_off += c
            target = dst_slice if x.dtype == out.dtype else torch.empty(b, out_h * out_w, c, dtype=x.dtype)
            code = self.lib.emu_interp_forward(ptr(x), *x.stride(), ptr(target), target.stride(0), target.stride(1),
                                               i64s([b, h, w, c, out_h, out_w]), DTYPE_CODE[x.dtype])
            assert code == 0
            if target is not dst_slice:
                dst_slice.copy_(target)
        return out

    def multi_tower_interpolate_backward(self, grad_out, src_sizes, dst, channels):
        g = grad_out.contiguous()
        grads, c_off = [], 0
        for (h, w), c in zip(src_sizes, channels):
            gs = g.narrow(2, c_off, c)
            c_off += c
            gx = torch.empty(g.shape[0], h * w, c, dtype=g.dtype)
            code = self.lib.emu_interp_backward(ptr(gs), gs.stride(0), gs.stride(1), ptr(gx),
                                                i64s([g.shape[0], h, w, c, *dst]), DTYPE_CODE[g.dtype])
            assert code == 0
            grads.append(gx)
        return grads

    def _attention(self, backward, q, keys, values, heads, s, offsets, rects, masks, scale, out, lse,
                   grad_out=None, gq=None, gk=(), gv=()):
        b, h, w, dim = q.shape
        sides = [k.shape[1] for k in keys]
        mask_off = [0]
        for n in sides[:-1]:
            mask_off.append(mask_off[-1] + n * n)
        rect_t = None if rects is None else torch.stack([torch.as_tensor(r).long() for r in rects]).contiguous()
        mask_t = None if masks is None else torch.cat([m.reshape(b, -1) for m in masks], 1).contiguous()
        off_t = None if offsets is None else torch.as_tensor(offsets).long().reshape(b, 2).contiguous()
        code = self.lib.emu_window_attention(
            int(backward), DTYPE_CODE[q.dtype], i64s([b, h, w, dim, heads, s, len(keys)]), i64s([n // s for n in sides]),
            ptr(q), ptrs(keys), ptrs(values), ptr(off_t), ptr(rect_t), ptr(mask_t), sum(n * n for n in sides),
            i64s(mask_off), scale, ptr(out), ptr(lse), ptr(grad_out), ptr(gq),
            ptrs(gk) if backward else None, ptrs(gv) if backward else None)
        assert code == 0

    def sva_window_attention(self, q, keys, values, heads, s, offsets=None, rects=None, masks=None):
        q, keys, values = q.contiguous(), [k.contiguous() for k in keys], [v.contiguous() for v in values]
        scale = (q.shape[-1] // heads) ** -0.5
        out = torch.empty_like(q)
        lse = torch.empty(*q.shape[:3], heads, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        self._attention(False, q, keys, values, heads, s, offsets, rects, masks, scale, out, lse)
        return out, lse

    def sva_window_attention_backward(self, grad_out, q, keys, values, lse, heads, s, offsets=None, rects=None,
                                      masks=None):
        scale = (q.shape[-1] // heads) ** -0.5
        covered = q.shape[1] == s and q.shape[2] == s
        alloc = torch.empty_like if covered else torch.zeros_like
        gq, gk, gv = torch.empty_like(q), [alloc(k) for k in keys], [alloc(v) for v in values]
        self._attention(True, q, keys, values, heads, s, offsets, rects, masks, scale, None, lse,
                        grad_out.contiguous(), gq, gk, gv)
        return gq, gk, gv


@pytest.fixture(scope="module")
def emu(tmp_path_factory) -> EmulatedCuda:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler for the CUDA emulation")
    lib = tmp_path_factory.mktemp("cuda_emulation") / "cuda_emulation.so"
    cmd = [cxx, "-std=c++20", "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-pthread", "-Wall", "-Werror",
           "-Wno-unknown-pragmas", f"-I{CUDA_DIR / 'emulation'}", str(CUDA_DIR / "emulation" / "harness.cpp"),
           "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return EmulatedCuda(lib)


def interpolate64(x, src, dst):
    b, _, c = x.shape
    y = F.interpolate(x.double().reshape(b, *src, c).permute(0, 3, 1, 2), size=dst, mode="bilinear",
                      align_corners=False)
    return y.permute(0, 2, 3, 1).reshape(b, dst[0] * dst[1], c)


INTERP_SIZES = [((1, 1), (4, 3)), ((3, 3), (7, 7)), ((7, 7), (3, 3)), ((9, 9), (8, 8)), ((9, 6), (8, 5)),
                ((3, 5), (8, 12))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("src,dst", INTERP_SIZES)
def test_emulated_interpolate(emu, src, dst, dtype):
    batch = 3 if dtype == torch.float32 else 1
    x = (torch.randn(batch, src[0] * src[1], 37) * 2).to(dtype)
    y = torch.randn(batch, dst[0] * dst[1], 5).to(dtype)             # already at dst: the copy path
    conv = torch.randn(batch, 6, *src).to(dtype)                      # (B, C, h, w) map read through a view
    grids = [x, y, conv.flatten(2).transpose(1, 2)]
    sizes = [src, dst, src]
    got = emu.multi_tower_interpolate(grids, sizes, dst)
    if dtype == torch.float64:  # the kernel computes in float64 (the reference rounds through float32)
        want = torch.cat([interpolate64(g, s_, dst) for g, s_ in zip(grids, sizes)], -1)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    else:  # no FMA contraction: the very numbers of the reference
        assert torch.equal(got, reference.multi_tower_interpolate(grids, sizes, dst))

    leaves = [g.detach().float().requires_grad_(True) for g in grids]
    grad = torch.randn(got.shape).to(dtype)
    grads = emu.multi_tower_interpolate_backward(grad, sizes, dst, [g.shape[2] for g in grids])
    ref_grads = torch.autograd.grad((reference.multi_tower_interpolate(leaves, sizes, dst) * grad.float()).sum(), leaves)
    tol = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), r, rtol=tol, atol=tol)
    assert torch.equal(grads[1], grad[..., 37:42])


def attention_truth64(q, keys, values, heads, s, offsets, masks):
    """float64 truth, one query at a time (the reference backend itself computes in float32)."""
    b, h, w, dim = q.shape
    d = dim // heads
    out = torch.empty(b, h, w, dim, dtype=torch.float64)
    offsets = [(0, 0)] * b if offsets is None else [tuple(int(v) for v in o) for o in offsets]
    for bi in range(b):
        for y in range(h):
            for x in range(w):
                wy, wx = y + offsets[bi][0], x + offsets[bi][1]
                ks, vs, ok = [], [], []
                for i, (k, v) in enumerate(zip(keys, values)):
                    r = k.shape[1] // s
                    kw = k[bi, wy * r:(wy + 1) * r, wx * r:(wx + 1) * r].reshape(r * r, dim).double()
                    vw = v[bi, wy * r:(wy + 1) * r, wx * r:(wx + 1) * r].reshape(r * r, dim).double()
                    valid = (torch.ones(r * r, dtype=torch.bool) if masks is None
                             else masks[i][bi, wy * r:(wy + 1) * r, wx * r:(wx + 1) * r].reshape(-1))
                    ks.append(kw), vs.append(vw), ok.append(valid | ~valid.any())
                kk, vv, valid = torch.cat(ks), torch.cat(vs), torch.cat(ok)
                qq = q[bi, y, x].double().reshape(heads, d)
                logits = torch.einsum("he,khe->hk", qq, kk.reshape(-1, heads, d)) / d ** 0.5
                p = logits.masked_fill(~valid, float("-inf")).softmax(-1)
                out[bi, y, x] = torch.einsum("hk,khe->he", p, vv.reshape(-1, heads, d)).reshape(dim)
    return out


# (batch, s, tower sides, heads, head_dim, validity, sub-rectangle)
ATTN_CASES = [
    pytest.param(1, 1, (1, 3), 3, 5, "none", None, id="s1-r1,3-b1"),
    pytest.param(3, 3, (3, 9, 6), 2, 40, "rects", None, id="s3-r1,3,2-b3-rects-d40"),
    pytest.param(2, 3, (3, 6), 4, 4, "masks", [(0, 1), (1, 0)], id="s3-r1,2-masks-subrect"),
    pytest.param(2, 4, (4, 8), 2, 70, "rects", [(1, 0), (0, 2)], id="s4-r1,2-rects-subrect-d70"),
]


def attention_inputs(batch, s, sides, heads, head_dim, validity, sub, dtype):
    dim = heads * head_dim
    h, w = (s, s) if sub is None else (s - max(o[0] for o in sub), s - max(o[1] for o in sub))
    q = torch.randn(batch, h, w, dim).to(dtype)
    keys = [torch.randn(batch, n, n, dim).to(dtype) for n in sides]
    values = [torch.randn(batch, n, n, dim).to(dtype) for n in sides]
    rects = masks = None
    if validity == "rects":
        rects = [kernels.image_valid_rects([(100, 70), (30, 64), (512, 512)][:batch], n) for n in sides]
        masks = [kernels.rects_to_mask(r, n) for r, n in zip(rects, sides)]
    elif validity == "masks":
        masks = [torch.rand(batch, n, n) > 0.5 for n in sides]
        r = sides[-1] // s
        masks[-1][0, :r, :r] = False  # an all-invalid window (-> all valid)
    return q, keys, values, rects, masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("batch,s,sides,heads,head_dim,validity,sub", ATTN_CASES)
def test_emulated_window_attention(emu, batch, s, sides, heads, head_dim, validity, sub, dtype):
    if dtype != torch.float32 and validity == "none":
        pytest.skip("covered in float32")
    q, keys, values, rects, masks = attention_inputs(batch, s, sides, heads, head_dim, validity, sub, dtype)
    offsets = None if sub is None else torch.tensor(sub)
    kw = {"query_offsets": offsets, "valid_rects": rects, "masks": None if rects is not None else masks}
    out, lse = emu.sva_window_attention(q, keys, values, heads, s, offsets, rects, kw["masks"])

    leaves = [t.detach().float().requires_grad_(True) for t in (q, *keys, *values)]
    n = len(keys)
    want = reference.sva_window_attention(leaves[0], leaves[1:1 + n], leaves[1 + n:], num_heads=heads, grid_side=s, **kw)
    tol = {torch.float32: 2e-5, torch.float64: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert out.dtype == dtype and lse.shape == (*q.shape[:3], heads)
    torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol)
    if dtype == torch.float64:  # the double path is really double
        truth = attention_truth64(q, keys, values, heads, s, offsets, masks)
        torch.testing.assert_close(out, truth, rtol=1e-12, atol=1e-12)

    grad = torch.randn(out.shape).to(dtype)
    gq, gk, gv = emu.sva_window_attention_backward(grad, q, keys, values, lse, heads, s, offsets, rects, kw["masks"])
    ref_grads = torch.autograd.grad((want * grad.float()).sum(), leaves)
    for g, r in zip([gq, *gk, *gv], ref_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), r, rtol=tol, atol=tol)
        assert (g[r == 0] == 0).all()  # unread (outside the sub-rectangle) and masked keys: exactly zero


def test_emulated_all_invalid_windows_equal_unmasked(emu):
    q, keys, values, _, _ = attention_inputs(2, 2, (2, 8), 2, 8, "none", None, torch.float32)
    free, _ = emu.sva_window_attention(q, keys, values, 2, 2)
    nothing = [torch.zeros(2, 4, dtype=torch.long)] * 2
    assert torch.equal(emu.sva_window_attention(q, keys, values, 2, 2, rects=nothing)[0], free)
    no_mask = [torch.zeros(2, n, n, dtype=torch.bool) for n in (2, 8)]
    assert torch.equal(emu.sva_window_attention(q, keys, values, 2, 2, masks=no_mask)[0], free)


# ---------------------------------------------------------------------------------------------------
# 3. the Python side of the backend
# ---------------------------------------------------------------------------------------------------
def test_cuda_backend_reports_why_it_is_unavailable(monkeypatch):
    from cambrian.kernels import cuda

    assert cuda.supports("sva_window_attention", "cuda") and not cuda.supports("sva_window_attention", "cpu")
    if torch.cuda.is_available() and cuda.is_available():
        pytest.skip("a GPU with the CUDA kernels is present")
    assert not cuda.is_available() and cuda.unavailable_reason()
    monkeypatch.setenv(kernels.ENV_VAR, "cuda")
    with pytest.raises(kernels.KernelBackendError, match="'cuda': backend is not available"):
        kernels.get_backend("sva_window_attention", "cuda")
