#!/usr/bin/env python
"""Each fused kernel alone: the C++ CPU backend (`cambrian.kernels.cpp`) against the reference backend.

Kernels, on Cambrian-8B shapes (B = 1 and 2, float32 unless --dtype):

* ``interp_siglip``   -- multi_tower_interpolate of a (B, 27*27, 1152) token grid to 24x24;
* ``interp_convnext`` -- the four ConvNeXt-XXL stage maps (B, C, n, n), C/n = 384/256, 768/128, 1536/64,
  3072/32, handed over as ``x.flatten(2).transpose(1, 2)`` views (what the tower gives the connector),
  resized to 96x96 and concatenated: (B, 9216, 5760);
* ``attention``       -- sva_window_attention with 576 queries (24x24), 16 heads x 64, towers n = [24, 24,
  24, 96] (r = [1, 1, 1, 4], 19 keys per query), inference-style rectangle validity of a 640x480 image.

Each in ``fwd`` and ``fwd+bwd`` mode.  Reported per row:

* time: median wall time over interleaved repetitions (cpp, reference, cpp, ...), with the last-level
  cache flushed before every timed call (a read-only pass over a buffer larger than the cache, so it holds
  only clean lines and no write-back of a dirty flush lands in the timed call); measured twice, in separate
  processes:
  ``*_ms``      with glibc's default allocator (what a program sees: every large output is fresh
                memory, so first-touch page faults are part of the cost), and
  ``*_ms_warm`` with ``MALLOC_MMAP_MAX_=0`` (freed memory is reused: no page faults, kernel work only);
  the JSON also has the process CPU time of the same calls (``*_cpu_ms``), which a busy machine distorts
  far less than wall time when the workers run one thread (``--threads 1``);
* kernel time: the part of the C++ call spent inside the kernel bodies (``cambrian.kernels._C.kernel_time_ns``,
  a clock read around every kernel launch), same calls, same median.  The rest of the call is fixed cost:
  Python, the dispatcher, the C++ glue and, in ``fwd+bwd`` mode, the autograd engine -- with code and data
  evicted by the flush (as after any large op) that is ~0.1 ms per op and ~0.25-0.3 ms more per
  ``autograd.grad`` here, whatever the op moves.  The JSON's ``fixed_overhead_ms`` measures it: the same protocol on a
  3x3 -> 2x2 resize of 16 channels (fwd) and on ``autograd.grad`` of that resize (fwd+bwd);
* the memory-bandwidth floor: the bytes the kernel must read and write (inputs actually touched, in whole
  cache lines; outputs, gradients; never intermediates) divided by the copy bandwidth (``torch`` copy of a
  256 MB tensor, counted as read + write) measured beside the row's own repetitions, one copy per repetition,
  median, with buffers allocated together with the row's tensors -- on the 2-core test VM the two-thread
  copy bandwidth is not steady (~40 GB/s at start-up, 60-75 GB/s in some rows and after large allocations
  elsewhere in the process; one thread stays at 37-40), so a figure from elsewhere in the run would skew
  rows; per row ``copy_bandwidth_gbps[_warm]``.  ``cpp_over_floor`` uses the warm call time, ``kernel_over_floor`` the
  warm kernel time;
* peak memory: the growth of the process's peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs`` before each call) over the resident set before the call, in a process with a
  fixed 16 KB mmap threshold so freed tensors really return to the OS.  It includes the op's outputs
  (and gradients), which both backends must produce.  (tracemalloc cannot see torch's allocations.)

Prints a table, writes JSON (default ``benchmarks/results/kernels.json``) and a PNG chart beside it (same name,
``.png``; ``--chart PATH`` / ``--no-chart``): speed-up over the reference, time over the bandwidth floor, peak
memory.  ``--quick`` uses small
shapes (a smoke test, also run by tests/test_kernels_cpp.py).  Times are never asserted on.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "kernels.json"
FLUSH_BYTES = 96 << 20  # > last-level cache


def make_flush(torch):
    """-> flush(): evicts the last-level cache and leaves it holding clean lines.

    Writing a buffer (the old ``flush.add_(1.0)``) leaves the cache full of dirty lines, and the timed call
    pays the write-back of every one it evicts -- for a small kernel, a cost that belongs to the flush.  A
    read-only pass over a separate buffer larger than the cache evicts everything (dirty lines of the previous
    call are written back during the flush, outside the timing) and leaves only clean lines behind.  (On the
    2-core test machine the difference on the SigLIP resize was within noise, ~0.01-0.03 ms of 0.4 / 1.2 ms.)
    The caller runs ``gc.collect()`` before, not after, the flush: the collector writes object headers.
    """
    buf = torch.ones(FLUSH_BYTES // 4)

    def flush() -> None:
        buf.sum()
    return flush


# ---------------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------------
def specs(quick: bool, batches: list[int]) -> list[dict]:
    if quick:
        shapes = {
            # small, but every output >= 1 MB so the resident-set measurement resolves it
            "interp_siglip": dict(src=27, channels=512, dst=24),
            "interp_convnext": dict(stages=[(24, 64), (48, 32), (96, 16), (192, 8)], dst=32),
            "attention": dict(s=16, sides=[16, 16, 16, 64], heads=16, head_dim=64, image=(640, 480)),
        }
    else:
        shapes = {
            "interp_siglip": dict(src=27, channels=1152, dst=24),
            "interp_convnext": dict(stages=[(384, 256), (768, 128), (1536, 64), (3072, 32)], dst=96),
            "attention": dict(s=24, sides=[24, 24, 24, 96], heads=16, head_dim=64, image=(640, 480)),
        }
    return [dict(kernel=k, batch=b, mode=m, **shape) for k, shape in shapes.items() for b in batches
            for m in ("fwd", "fwd+bwd")]


def touched_indices(n_in: int, n_out: int) -> set[int]:
    """Which source rows (or cols) bilinear resizing reads (ATen's taps, nonzero weights)."""
    if n_in == n_out:
        return set(range(n_in))
    scale = n_in / n_out
    used = set()
    for d in range(n_out):
        src = max((d + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(src), n_in - 1)
        lam = src - i0
        used.add(i0)
        if lam > 0 and i0 < n_in - 1:
            used.add(i0 + 1)
    return used


def touched(n_in: int, n_out: int) -> int:
    """How many source rows (or cols) bilinear resizing reads."""
    return len(touched_indices(n_in, n_out))


def input_bytes(layout: str, b: int, channels: int, h: int, w: int, dst: tuple[int, int], elt: int) -> int:
    """Bytes of one grid that must come from memory, in whole 64-byte cache lines.

    token-major (B, h*w, C): every touched pixel is a contiguous run of C values (whole lines for the C here).
    conv layout (B, C, h, w): a touched source row of a plane is read in the lines that hold its touched
    columns -- when downsampling 256 -> 96 those are all lines of the row, though only 3/4 of its columns
    are used, so counting columns alone would understate what any kernel has to move.
    """
    rows = touched(h, dst[0])
    if layout == "tokens":
        return b * rows * touched(w, dst[1]) * channels * elt
    lines = len({c * elt // 64 for c in touched_indices(w, dst[1])})
    return b * channels * rows * min(lines * 64, w * elt)


def build(spec: dict, dtype):
    """-> (run(module, grad) -> tensors to keep, bytes the kernel must move)."""
    import torch
    from cambrian import kernels

    g = torch.Generator().manual_seed(0)
    b, bwd = spec["batch"], spec["mode"] == "fwd+bwd"
    elt = torch.tensor([], dtype=dtype).element_size()
    if spec["kernel"].startswith("interp"):
        if spec["kernel"] == "interp_siglip":
            n, c = spec["src"], spec["channels"]
            leaves = [torch.randn(b, n * n, c, generator=g).to(dtype)]
            feats = lambda: leaves  # noqa: E731
            sizes = [(n, n)]
        else:
            leaves = [torch.randn(b, c, n, n, generator=g).to(dtype) for c, n in spec["stages"]]
            feats = lambda: [m.flatten(2).transpose(1, 2) for m in leaves]  # noqa: E731
            sizes = [(n, n) for _, n in spec["stages"]]
        dst = (spec["dst"], spec["dst"])
        channels = sum(x.shape[-1] if x.dim() == 3 else x.shape[1] for x in leaves)
        out_bytes = b * dst[0] * dst[1] * channels * elt
        in_bytes = sum(input_bytes("tokens" if x.dim() == 3 else "conv", b, x.shape[-1] if x.dim() == 3 else x.shape[1],
                                   h, w, dst, elt)
                       for x, (h, w) in zip(leaves, sizes))
        moved = in_bytes + out_bytes
        if bwd:
            for x in leaves:
                x.requires_grad_(True)
            grad = torch.randn(b, dst[0] * dst[1], channels, generator=g).to(dtype)
            moved += out_bytes + sum(x.numel() * elt for x in leaves)  # read grad_out, write grad_in

        def run(mod):
            out = mod.multi_tower_interpolate(feats(), sizes, dst)
            if not bwd:
                return [out]
            return [out, *torch.autograd.grad(out, leaves, grad)]
        return run, moved

    s, heads, d = spec["s"], spec["heads"], spec["head_dim"]
    dim = heads * d
    q = torch.randn(b, s, s, dim, generator=g).to(dtype)
    keys = [torch.randn(b, n, n, dim, generator=g).to(dtype) for n in spec["sides"]]
    values = [torch.randn(b, n, n, dim, generator=g).to(dtype) for n in spec["sides"]]
    rects = [kernels.image_valid_rects([spec["image"]] * b, n) for n in spec["sides"]]
    # a key row is read only when valid (or when its whole tower window is invalid)
    kv_rows = 0
    for n, r in zip(spec["sides"], rects):
        win = n // s
        m = kernels.rects_to_mask(r, n).reshape(b, s, win, s, win).permute(0, 1, 3, 2, 4).reshape(b, s, s, -1)
        m = m | ~m.any(-1, keepdim=True)
        kv_rows += int(m.sum())
    qo_bytes = q.numel() * elt
    moved = 2 * qo_bytes + 2 * kv_rows * dim * elt + b * s * s * heads * 4   # q, out, K and V rows, lse
    if bwd:
        for t in (q, *keys, *values):
            t.requires_grad_(True)
        grad = torch.randn(q.shape, generator=g).to(dtype)
        kv_all = sum(k.numel() for k in keys) * elt
        # read q, dO, K, V rows, lse; write dq and the full dK, dV grids
        moved += 3 * qo_bytes + 2 * kv_rows * dim * elt + 2 * kv_all + b * s * s * heads * 4

    def run(mod):
        out = mod.sva_window_attention(q, keys, values, num_heads=heads, grid_side=s, valid_rects=rects)
        if not bwd:
            return [out]
        return [out, *torch.autograd.grad(out, [q, *keys, *values], grad)]
    return run, moved


# ---------------------------------------------------------------------------------------------------
# worker processes
# ---------------------------------------------------------------------------------------------------
COPY_BYTES = 512 << 20  # read + written by one make_copy() call


def make_copy(torch):
    """-> copy(): seconds of one copy of a 256 MB tensor (its bytes x 2 read + written = COPY_BYTES)."""
    src = torch.randn(COPY_BYTES // 8)
    dst = torch.empty_like(src)
    dst.copy_(src)

    def copy() -> float:
        t0 = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - t0
    return copy


def copy_bandwidth(copy) -> float:
    """GB/s of a large tensor copy (read + write), median of 5."""
    return COPY_BYTES / statistics.median(copy() for _ in range(5)) / 1e9


def worker_time(spec_list: list[dict], dtype_name: str, budget: float, max_reps: int) -> dict:
    import torch
    from cambrian.kernels import _C, cpp, reference

    dtype = getattr(torch, dtype_name)
    flush = make_flush(torch)
    bw = copy_bandwidth(make_copy(torch))
    rows = []
    for spec in spec_list:
        run, moved = build(spec, dtype)
        # copy buffers allocated beside this row's tensors (the same copy measured ~40 GB/s at start-up
        # and 60-75 GB/s after large allocations elsewhere in the process, at two threads)
        copy = make_copy(torch)
        for mod in (cpp, reference):  # warm-up (lazy init, thread pools)
            run(mod)
        times = {"cpp": [], "reference": []}
        cpu = {"cpp": [], "reference": []}
        kernel, copies = [], []
        start = time.perf_counter()
        while True:
            copies.append(copy())  # the bandwidth drifts: measured beside every repetition
            for name, mod in (("cpp", cpp), ("reference", reference)):
                gc.collect()
                flush()
                k0 = _C.kernel_time_ns()
                c0, t0 = time.process_time(), time.perf_counter()
                keep = run(mod)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                if name == "cpp":
                    kernel.append((_C.kernel_time_ns() - k0) * 1e-9)
                del keep
            reps = len(times["cpp"])
            if reps >= max_reps or (reps >= 3 and time.perf_counter() - start > budget):
                break
        rows.append(dict(spec, cpp_ms=1e3 * statistics.median(times["cpp"]),
                         reference_ms=1e3 * statistics.median(times["reference"]),
                         cpp_kernel_ms=1e3 * statistics.median(kernel),
                         copy_bandwidth_gbps=COPY_BYTES / statistics.median(copies) / 1e9,
                         cpp_cpu_ms=1e3 * statistics.median(cpu["cpp"]),
                         reference_cpu_ms=1e3 * statistics.median(cpu["reference"]), reps=reps, bytes_moved=moved))
    overhead = {mode: 1e3 * fixed_overhead(torch, flush, mode == "fwd+bwd") for mode in ("fwd", "fwd+bwd")}
    return dict(copy_bandwidth_gbps=bw, rows=rows, fixed_overhead_ms=overhead)


def fixed_overhead(torch, flush, backward: bool, reps: int = 31) -> float:
    """Seconds of a cold call that moves next to nothing: a 3x3 -> 2x2 resize of 16 channels through
    `cambrian.kernels.cpp` (and `autograd.grad` of it when `backward`), timed like the kernels."""
    from cambrian.kernels import cpp

    x = torch.randn(1, 9, 16, requires_grad=backward)
    g = torch.randn(1, 4, 16)

    def call():
        out = cpp.multi_tower_interpolate([x], [(3, 3)], (2, 2))
        return torch.autograd.grad(out, [x], g) if backward else out
    call()
    times = []
    for _ in range(reps):
        gc.collect()
        flush()
        t0 = time.perf_counter()
        keep = call()
        times.append(time.perf_counter() - t0)
        del keep
    return statistics.median(times)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def worker_mem(spec_list: list[dict], dtype_name: str) -> dict:
    import torch
    from cambrian.kernels import cpp, reference

    dtype = getattr(torch, dtype_name)
    rows = []
    for spec in spec_list:
        run, _ = build(spec, dtype)
        row = {}
        for name, mod in (("cpp", cpp), ("reference", reference)):
            del_ = run(mod)  # warm-up
            del del_
            gc.collect()
            with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
                f.write("5")
            base = _status_kb("VmRSS")
            keep = run(mod)
            peak = _status_kb("VmHWM")
            del keep
            gc.collect()
            row[f"{name}_peak_mb"] = (peak - base) / 1024
        rows.append(row)
    return dict(rows=rows)


def spawn(kind: str, spec_list: list[dict], args, env_extra: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "specs.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec_list))
        cmd = [sys.executable, __file__, "--_worker", kind, "--_specs", str(spec_path), "--_result", str(out_path),
               "--dtype", args.dtype, "--budget", str(args.budget), "--max-reps", str(args.max_reps)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        env = dict(os.environ, **env_extra)
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
        return json.loads(out_path.read_text())


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    ap.add_argument("--chart", type=Path, default=None, help="PNG chart path (default: --out with .png)")
    ap.add_argument("--no-chart", action="store_true", help="do not write the PNG chart")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 2 (quick: 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the workers (default: torch's)")
    ap.add_argument("--budget", type=float, default=None, help="seconds of repetitions per row (after 3)")
    ap.add_argument("--max-reps", type=int, default=None)
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_specs", help=argparse.SUPPRESS)
    ap.add_argument("--_result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.batches is None:
        args.batches = [1] if args.quick else [1, 2]
    if args.budget is None:
        args.budget = 0.05 if args.quick else 3.0
    if args.max_reps is None:
        args.max_reps = 3 if args.quick else 15

    if args._worker:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        spec_list = json.loads(Path(args._specs).read_text())
        if args._worker == "mem":
            result = worker_mem(spec_list, args.dtype)
        else:
            result = worker_time(spec_list, args.dtype, args.budget, args.max_reps)
        Path(args._result).write_text(json.dumps(result))
        return

    import torch
    from cambrian.kernels import cpp

    if not cpp.is_available():
        sys.exit(f"C++ kernels unavailable: {cpp.UNAVAILABLE_REASON}")
    if args.threads:
        torch.set_num_threads(args.threads)
    spec_list = specs(args.quick, args.batches)
    cold = spawn("time", spec_list, args, {})
    warm = spawn("time", spec_list, args, {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)})
    mem = spawn("mem", spec_list, args, {"MALLOC_MMAP_THRESHOLD_": str(16 << 10)})

    rows = []
    for c, w, m in zip(cold["rows"], warm["rows"], mem["rows"]):
        floor_ms = 1e3 * c["bytes_moved"] / (w["copy_bandwidth_gbps"] * 1e9)
        row = dict(c)
        row.update(copy_bandwidth_gbps_warm=w["copy_bandwidth_gbps"], cpp_ms_warm=w["cpp_ms"], reference_ms_warm=w["reference_ms"], cpp_cpu_ms_warm=w["cpp_cpu_ms"],
                   reference_cpu_ms_warm=w["reference_cpu_ms"], cpp_kernel_ms_warm=w["cpp_kernel_ms"], **m)
        row.update(speedup=c["reference_ms"] / c["cpp_ms"], speedup_warm=w["reference_ms"] / w["cpp_ms"],
                   floor_ms=floor_ms, cpp_over_floor=w["cpp_ms"] / floor_ms,
                   kernel_over_floor=w["cpp_kernel_ms"] / floor_ms,
                   fixed_overhead_ms=warm["fixed_overhead_ms"][c["mode"]],
                   peak_ratio=m["reference_peak_mb"] / m["cpp_peak_mb"] if m["cpp_peak_mb"] > 0 else None)
        rows.append(row)

    result = dict(
        quick=args.quick, dtype=args.dtype, torch=torch.__version__, isa=cpp.isa(),
        aten_capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine(), copy_bandwidth_gbps=cold["copy_bandwidth_gbps"],
        copy_bandwidth_gbps_warm=warm["copy_bandwidth_gbps"],
        fixed_overhead_ms=warm["fixed_overhead_ms"],
        method=dict(time="median wall time, gc.collect() then the cache flushed before each call by reading a 96 MB "
                         "buffer (leaves only clean lines: no write-back of the flush inside the timed call); *_ms default allocator (page faults "
                         "included), *_ms_warm with freed memory reused (MALLOC_MMAP_MAX_=0); *_cpu_ms* = process "
                         "CPU time (all threads, spin-waits included) -- robust to a busy machine at --threads 1",
                    kernel="time inside the kernel bodies of the same calls (cambrian.kernels._C.kernel_time_ns); "
                           "the rest of a call is fixed cost (Python, dispatcher, autograd engine), measured cold "
                           "on a 3x3->2x2 resize of 16 channels in fixed_overhead_ms",
                    floor="bytes that must move (touched inputs in whole 64-byte lines + outputs [+ grad_out read + grads written]) / "
                          "copy bandwidth (256 MB torch copy, read+write) measured beside the row's repetitions in the warm "
                          "process (row copy_bandwidth_gbps_warm); cpp_over_floor uses cpp_ms_warm, "
                          "kernel_over_floor cpp_kernel_ms_warm",
                    memory="growth of VmHWM over VmRSS during the call (outputs included), reset via "
                           "/proc/self/clear_refs, MALLOC_MMAP_THRESHOLD_=16K"),
        rows=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    print(f"torch {torch.__version__}, ATen {result['aten_capability']}, kernels isa {result['isa']}, "
          f"{result['threads']} threads, copy bandwidth {result['copy_bandwidth_gbps']:.1f} GB/s "
          f"(warm process {result['copy_bandwidth_gbps_warm']:.1f}), dtype {args.dtype}; fixed cost of a cold call: "
          f"{result['fixed_overhead_ms']['fwd']:.3f} ms (op), {result['fixed_overhead_ms']['fwd+bwd']:.3f} ms "
          "(op + autograd.grad)")
    head = (f"{'kernel':<16}{'B':>2} {'mode':<8}{'cpp ms':>9}{'ref ms':>9}{'speedup':>8}"
            f"{'cpp warm':>9}{'ref warm':>9}{'kernel':>8}{'floor':>8}{'x floor':>8}{'kern x':>7}"
            f"{'cpp MB':>8}{'ref MB':>8}{'mem x':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['kernel']:<16}{r['batch']:>2} {r['mode']:<8}{r['cpp_ms']:>9.2f}{r['reference_ms']:>9.2f}"
              f"{r['speedup']:>7.1f}x{r['cpp_ms_warm']:>9.2f}{r['reference_ms_warm']:>9.2f}"
              f"{r['cpp_kernel_ms_warm']:>8.2f}{r['floor_ms']:>8.2f}{r['cpp_over_floor']:>8.2f}{r['kernel_over_floor']:>7.2f}"
              f"{r['cpp_peak_mb']:>8.1f}{r['reference_peak_mb']:>8.1f}"
              + (f"{r['peak_ratio']:>6.1f}x" if r["peak_ratio"] is not None else f"{'n/a':>7}"))
    print(f"wrote {args.out}")
    if not args.no_chart:
        write_chart(result, args.chart or args.out.with_suffix(".png"))


TARGET_FLOOR_RATIO = 1.5  # issue 3: each kernel within 1.5x of its memory-bandwidth floor


def write_chart(result: dict, path: Path) -> None:
    """Three panels per row: speed-up over the reference, time over the bandwidth floor, peak memory."""
    from _plot import pyplot

    plt = pyplot()
    if plt is None:
        return
    rows = result["rows"]
    labels = [f"{r['kernel'].replace('interp_', 'interp ')}\nB={r['batch']} {r['mode']}" for r in rows]
    xs = list(range(len(rows)))
    w = 0.38
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(max(8.0, 0.9 * len(rows) + 2), 11), sharex=True)
    ax1.bar([x - w / 2 for x in xs], [r["speedup"] for r in rows], w, label="fresh outputs (page faults)")
    ax1.bar([x + w / 2 for x in xs], [r["speedup_warm"] for r in rows], w, label="reused memory (warm)")
    ax1.axhline(1.0, color="black", lw=0.8)
    ax1.set_yscale("log")
    ax1.set_ylabel("reference time / cpp time")
    ax1.set_title("speed-up of the C++ kernel over the reference (median wall time)")
    ax1.legend(fontsize=8)
    ax2.bar([x - w / 2 for x in xs], [r["kernel_over_floor"] for r in rows], w, color="tab:green",
            label="kernel bodies")
    ax2.bar([x + w / 2 for x in xs], [r["cpp_over_floor"] for r in rows], w, color="tab:olive",
            label="whole call (+ Python, dispatcher, autograd)")
    ax2.axhline(1.0, color="black", lw=0.8)
    ax2.axhline(TARGET_FLOOR_RATIO, color="tab:red", ls="--", lw=1, label=f"target {TARGET_FLOOR_RATIO}x")
    for x, r in zip(xs, rows):
        ax2.text(x - w / 2, r["kernel_over_floor"], f"{r['kernel_over_floor']:.2f}", ha="center", va="bottom",
                 fontsize=6)
        ax2.text(x + w / 2, r["cpp_over_floor"], f"{r['cpp_over_floor']:.2f}", ha="center", va="bottom", fontsize=6)
    ax2.set_ylabel("cpp warm time / floor")
    ax2.set_title("time over the memory-bandwidth floor (bytes moved at the copy bandwidth measured beside each row)")
    ax2.legend(fontsize=8)
    ax3.bar([x - w / 2 for x in xs], [r["cpp_peak_mb"] for r in rows], w, label="cpp")
    ax3.bar([x + w / 2 for x in xs], [r["reference_peak_mb"] for r in rows], w, label="reference")
    ax3.set_yscale("log")
    ax3.set_ylabel("peak RSS growth (MB)")
    ax3.set_title("peak memory during the call (outputs included)")
    ax3.legend(fontsize=8)
    ax3.set_xticks(xs, labels, fontsize=7)
    fig.suptitle(f"cambrian CPU kernels, {result['dtype']}, {result['threads']} thread(s), isa {result['isa']}"
                 + (" (quick shapes)" if result["quick"] else ""))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
