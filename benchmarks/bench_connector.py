"""Cambrian-8B connector forward on CPU: fused path against the reference path, in one run.

Shapes (the vision side of cambrian-8b, `connector_only`): towers (B, 576, 1152), (B, 576, 1024),
(B, 576, 1536) and the ConvNeXt-XXL stages as a conv-layout list (B, 384, 256, 256), (B, 768, 128, 128),
(B, 1536, 64, 64), (B, 3072, 32, 32) on a 96×96 grid; 576 queries, depth D = 3, vision hidden 1024,
LLM hidden 4096: mm_projector_aux_0..3 + vision_sampler_0 + mm_projector.  float32, B = 1 and 2,
image_sizes (1024, 768) (inference path: unpad + rectangle masks).

Paths:
  reference         `set_fused(False)` + CAMBRIAN_KERNELS=reference: the stage list is resized and
                    concatenated to (B, 9216, 5760), separate LayerNorm + Linear for K and V.
  fused             the default connector with the default kernel dispatch (cpp when it is built).
  fused_refkernels  the fused connector on the reference kernels (only when the default backend is
                    not `reference`), to separate the connector's gain from the kernels'.

Time (one fresh subprocess per B): one connector, switched between the paths (`set_fused`,
CAMBRIAN_KERNELS) with the same weights and inputs; after a warm-up forward of each path, `--repeats`
rounds each run every path once plus a 2048³ torch.mm, interleaved so that load from other processes
hits all of them alike.  Reported: median and best (min) per path; the GEMM rate is the best round.
Peak memory (one fresh subprocess per path and B): after a warm-up forward (which fills the folded-K/V
cache), Linux VmHWM after one forward minus VmRSS before it, the high-water mark reset through
/proc/self/clear_refs just before, with glibc's mmap threshold pinned at 128 KiB so RSS follows live
tensor memory (falls back to the ru_maxrss delta where clear_refs is not writable; the JSON says which).
The folded-K/V cache is persistent model state (like the weights), so it is in neither peak; its size
is reported beside them.
FLOPs: torch.utils.flop_counter.FlopCounterMode on the meta device.  GEMM floor: the fused path's FLOPs
at the measured GEMM rate; floor_ratio = fused time / floor.

Usage: python benchmarks/bench_connector.py [--quick] [--batches 1 2] [--repeats 5]
       [--json benchmarks/results/connector.json] [--chart PATH (default: the --json path as .png) | --no-chart]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

FULL = dict(vit_channels=[1152, 1024, 1536], vit_tokens=576, stages=[(384, 256), (768, 128), (1536, 64), (3072, 32)],
            grid=96, queries=576, depth=3, vision_hidden=1024, hidden=4096, gemm=2048, image_size=(1024, 768))
QUICK = dict(vit_channels=[24, 16, 32], vit_tokens=64, stages=[(16, 64), (24, 32), (32, 16), (48, 8)],
             grid=32, queries=64, depth=3, vision_hidden=64, hidden=128, gemm=512, image_size=(1024, 768))
TARGETS = dict(time_ratio=1.5, memory_ratio=2.0, floor_ratio=1.15)


# ---------------------------------------------------------------------------------------------------
# worker side: one case in a fresh process
# ---------------------------------------------------------------------------------------------------
def connector_config(shapes: dict) -> dict:
    n_vit = len(shapes["vit_channels"])
    return dict(mm_projector_type="sva", hidden_size=shapes["hidden"], vision_hidden_size=shapes["vision_hidden"],
                mm_vision_tower_aux_list=[f"vit_{i}" for i in range(n_vit)] + ["convnext-multi-stage"],
                mm_vision_tower_aux_token_len_list=[shapes["vit_tokens"]] * n_vit + [shapes["grid"] ** 2],
                image_token_len=shapes["queries"], num_query_group=1, query_num_list=[shapes["queries"]],
                connector_depth=shapes["depth"], connector_only=True)


def tower_channels(shapes: dict) -> list[int]:
    return list(shapes["vit_channels"]) + [sum(c for c, _ in shapes["stages"])]


def make_inputs(shapes: dict, batch: int, device: str = "cpu") -> list:
    g = torch.Generator().manual_seed(0) if device == "cpu" else None
    with torch.device(device):
        vits = [torch.randn(batch, shapes["vit_tokens"], c, generator=g) for c in shapes["vit_channels"]]
        stages = [torch.randn(batch, c, s, s, generator=g) for c, s in shapes["stages"]]
    return vits + [stages]


def count_flops(shapes: dict, batch: int, fused: bool) -> int:
    """Connector FLOPs on the meta device (shapes only)."""
    from torch.utils.flop_counter import FlopCounterMode

    from cambrian.model.connector import build_connector

    with torch.device("meta"):
        conn = build_connector(connector_config(shapes), tower_channels(shapes), fused=fused).eval().requires_grad_(False)
    feats = make_inputs(shapes, batch, "meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        conn(feats, image_sizes=[shapes["image_size"]] * batch)
    return int(counter.get_total_flops())


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the VmHWM high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


def _pin_malloc() -> bool:
    """Make RSS follow live tensor memory: glibc serves blocks >= 128 KiB by mmap and unmaps them on free.

    (By default glibc raises its mmap threshold after frees, up to 32 MiB, and keeps freed blocks below it
    in the heap, so RSS would remember earlier peaks.)  Only in the memory-measuring process.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, 128 * 1024) == 1   # M_MMAP_THRESHOLD (fixed from now on)
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def _set_kernels(name: str) -> None:
    """CAMBRIAN_KERNELS is read on every kernel call, so a path can be switched in-process."""
    if name:
        os.environ["CAMBRIAN_KERNELS"] = name
    else:
        os.environ.pop("CAMBRIAN_KERNELS", None)


def _build(shapes: dict, batch: int):
    from cambrian.model.connector import build_connector

    torch.manual_seed(0)
    conn = build_connector(connector_config(shapes), tower_channels(shapes)).eval().requires_grad_(False)
    return conn, make_inputs(shapes, batch), [shapes["image_size"]] * batch


def measure_memory(spec: dict) -> dict:
    """Peak RSS growth during one forward, after a warm-up forward (which fills the folded K/V cache)."""
    pinned = _pin_malloc()
    conn, feats, sizes = _build(spec["shapes"], spec["batch"])
    conn.set_fused(spec["fused"])
    _set_kernels(spec["kernels"])
    with torch.no_grad():
        del conn(feats, image_sizes=sizes).image_tokens[:]
        cache_mb = sum(w.numel() * w.element_size() + b.numel() * b.element_size()
                       for m in conn.modules() for _, w, b in getattr(m, "_kv_cache", {}).values()) / 2**20
        if _reset_peak():
            method = "VmHWM (reset via /proc/self/clear_refs) - VmRSS before the forward"
            before = _status_kb("VmRSS")
            out = conn(feats, image_sizes=sizes)
            total_peak_kb = _status_kb("VmHWM")
        else:
            method = "ru_maxrss delta (clear_refs not writable: underestimates when setup peaked higher)"
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out = conn(feats, image_sizes=sizes)
            total_peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        del out
    if pinned:
        method += ", glibc mmap threshold pinned at 128 KiB"
    return dict(peak_mb=(total_peak_kb - before) / 1024, total_peak_mb=total_peak_kb / 1024, memory_method=method,
                folded_cache_mb=cache_mb)


def measure_time(spec: dict) -> dict:
    """Interleaved rounds: every path once plus one large torch.mm per round (same process, same weights)."""
    from cambrian import kernels

    conn, feats, sizes = _build(spec["shapes"], spec["batch"])
    paths = spec["paths"]                        # [(name, fused, kernels)]
    n = spec["shapes"]["gemm"]
    a, b = torch.randn(n, n), torch.randn(n, n)
    times: dict[str, list[float]] = {name: [] for name, _, _ in paths}
    rates = []
    tokens = {}
    with torch.no_grad():
        for name, fused, kern in paths:          # warm-up: first-touch costs, folded K/V cache
            conn.set_fused(fused)
            _set_kernels(kern)
            tokens[name] = [t.clone() for t in conn(feats, image_sizes=sizes).image_tokens]
        _set_kernels("")
        backends = {op: kernels.get_backend(op, "cpu").__name__.rsplit(".", 1)[-1]   # the fused path's kernels
                    for op in ("multi_tower_interpolate", "sva_window_attention")}
        a @ b
        for _ in range(spec["repeats"]):
            for name, fused, kern in paths:
                conn.set_fused(fused)
                _set_kernels(kern)
                t0 = time.perf_counter()
                out = conn(feats, image_sizes=sizes)
                times[name].append(time.perf_counter() - t0)
                del out
            for _ in range(3):
                t0 = time.perf_counter()
                a @ b
                rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    ref = tokens["reference"]
    check = {"max_abs_diff": max((x - y).abs().max().item() for x, y in zip(tokens["fused"], ref)),
             "max_abs_value": max(y.abs().max().item() for y in ref)}
    return dict(times_ms={k: [1000 * t for t in v] for k, v in times.items()}, gemm_gflops=max(rates),
                gemm_gflops_median=statistics.median(rates), fused_backends=backends, check=check)


def run_case(spec: dict) -> dict:
    if spec["measure"] == "probe":
        from cambrian import kernels

        return {"backend": kernels.get_backend("sva_window_attention", "cpu").__name__.rsplit(".", 1)[-1]}
    return measure_memory(spec) if spec["measure"] == "memory" else measure_time(spec)


# ---------------------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------------------
def spawn(spec: dict) -> dict:
    """Run one measurement of one case in a fresh interpreter; returns its JSON result."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CAMBRIAN_KERNELS", None)
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed (exit {proc.returncode}) for {spec['name']} B={spec['batch']} "
                           f"({spec['measure']}):\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spawn_retry(spec: dict) -> dict:
    """`spawn`, retried once (a worker can die while another process rebuilds the C++ extension)."""
    try:
        return spawn(spec)
    except RuntimeError as exc:
        print(f"  worker failed, retrying once: {str(exc).splitlines()[0]}", flush=True)
        return spawn(spec)


def default_backend() -> str:
    """The default CPU backend, asked in a subprocess: this process never loads a compiled extension (another
    process rebuilding it in place would crash this one)."""
    return spawn_retry(dict(name="probe", batch=0, measure="probe"))["backend"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds; for tests)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=None, help="timed forwards per case (default 5, quick 3)")
    ap.add_argument("--json", type=Path, default=RESULTS / "connector.json")
    ap.add_argument("--chart", type=Path, default=None, help="PNG chart path (default: --json with .png)")
    ap.add_argument("--no-chart", action="store_true", help="do not write the PNG chart")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(run_case(json.loads(args.worker))))
        return 0

    shapes = QUICK if args.quick else FULL
    repeats = args.repeats or (3 if args.quick else 5)
    backend = default_backend()
    paths = [("reference", False, "reference"), ("fused", True, "")]
    if backend != "reference":
        paths.append(("fused_refkernels", True, "reference"))

    cases = []
    for batch in args.batches:
        timing = spawn_retry(dict(name="time", shapes=shapes, batch=batch, paths=paths, repeats=repeats,
                                  measure="time"))
        memory = {name: spawn_retry(dict(name=name, shapes=shapes, batch=batch, fused=fused, kernels=kern,
                                         measure="memory"))
                  for name, fused, kern in paths}
        flops = {"reference": count_flops(shapes, batch, False), "fused": count_flops(shapes, batch, True)}
        med = {k: statistics.median(v) for k, v in timing["times_ms"].items()}
        best = {k: min(v) for k, v in timing["times_ms"].items()}
        rate = timing["gemm_gflops"]
        floor_ms = flops["fused"] / (rate * 1e9) * 1000
        ref_mem, fus_mem = memory["reference"], memory["fused"]
        case = dict(batch=batch, fused_backends=timing["fused_backends"], gemm_gflops=rate,
                    gemm_gflops_median=timing["gemm_gflops_median"],
                    reference_ms=med["reference"], fused_ms=med["fused"],
                    reference_min_ms=best["reference"], fused_min_ms=best["fused"],
                    reference_times_ms=timing["times_ms"]["reference"], fused_times_ms=timing["times_ms"]["fused"],
                    reference_peak_mb=ref_mem["peak_mb"], fused_peak_mb=fus_mem["peak_mb"],
                    reference_total_peak_mb=ref_mem["total_peak_mb"], fused_total_peak_mb=fus_mem["total_peak_mb"],
                    fused_folded_cache_mb=fus_mem["folded_cache_mb"],
                    reference_gflop=flops["reference"] / 1e9, fused_gflop=flops["fused"] / 1e9,
                    gemm_floor_ms=floor_ms, reference_gemm_floor_ms=flops["reference"] / (rate * 1e9) * 1000,
                    time_ratio=med["reference"] / med["fused"], time_ratio_min=best["reference"] / best["fused"],
                    memory_ratio=ref_mem["peak_mb"] / fus_mem["peak_mb"],
                    floor_ratio=med["fused"] / floor_ms, floor_ratio_min=best["fused"] / floor_ms,
                    check=timing["check"])
        if "fused_refkernels" in med:
            case.update(fused_refkernels_ms=med["fused_refkernels"], fused_refkernels_min_ms=best["fused_refkernels"],
                        fused_refkernels_peak_mb=memory["fused_refkernels"]["peak_mb"],
                        fused_refkernels_time_ratio=med["reference"] / med["fused_refkernels"])
        cases.append(case)
        print(f"  B={batch}: reference {med['reference']:.1f} ms, fused {med['fused']:.1f} ms (medians); peak "
              f"+{ref_mem['peak_mb']:.1f} / +{fus_mem['peak_mb']:.1f} MB", flush=True)

    result = dict(
        config=dict(quick=args.quick, shapes=shapes, repeats=repeats, dtype="float32", threads=torch.get_num_threads(),
                    torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                    default_backend=backend, memory_method=memory["fused"]["memory_method"],
                    flop_method="torch.utils.flop_counter.FlopCounterMode on meta tensors",
                    timing="interleaved rounds in one process per B: each path once + 3x torch.mm "
                           f"{shapes['gemm']}^3 per round; GEMM rate = best mm of all rounds",
                    load_average=os.getloadavg()),
        targets=TARGETS, cases=cases)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.json}")
    if not args.no_chart:
        write_chart(result, args.chart or args.json.with_suffix(".png"))
    return 0


def print_table(result: dict) -> None:
    cfg = result["config"]
    print(f"\nconnector forward, {cfg['dtype']}, {cfg['threads']} threads, torch {cfg['torch']}, "
          f"{'quick shapes' if cfg['quick'] else 'cambrian-8b shapes'}; default kernels: {cfg['default_backend']}; "
          f"load average at the end {', '.join(f'{x:.1f}' for x in cfg['load_average'])}")
    head = (f"{'B':>2} {'ref ms':>9} {'fused ms':>9} {'time_ratio':>10} {'ref MB':>8} {'fused MB':>9} {'memory_ratio':>12} "
            f"{'ref GFLOP':>9} {'fused GFLOP':>11} {'floor ms':>9} {'floor_ratio':>11}")
    print(head)
    print("-" * len(head))
    for c in result["cases"]:
        print(f"{c['batch']:>2} {c['reference_ms']:9.1f} {c['fused_ms']:9.1f} {c['time_ratio']:10.2f} "
              f"{c['reference_peak_mb']:8.1f} {c['fused_peak_mb']:9.1f} {c['memory_ratio']:12.2f} "
              f"{c['reference_gflop']:9.2f} {c['fused_gflop']:11.2f} {c['gemm_floor_ms']:9.1f} {c['floor_ratio']:11.2f}")
    for c in result["cases"]:
        extra = ""
        if "fused_refkernels_ms" in c:
            extra = f"; fused connector on reference kernels {c['fused_refkernels_ms']:.1f} ms ({c['fused_refkernels_time_ratio']:.2f}x)"
        chk = c["check"]
        print(f"B={c['batch']}: best-of times: ref {c['reference_min_ms']:.1f} ms, fused {c['fused_min_ms']:.1f} ms -> "
              f"time_ratio {c['time_ratio_min']:.2f}, floor_ratio {c['floor_ratio_min']:.2f}")
        print(f"B={c['batch']}: GEMM rate {c['gemm_gflops']:.0f} GFLOP/s (median {c['gemm_gflops_median']:.0f}); "
              f"fused kernels {c['fused_backends']}; folded K/V cache {c['fused_folded_cache_mb']:.1f} MB "
              f"(persistent, not in the peak); process peak RSS ref {c['reference_total_peak_mb']:.0f} MB / fused "
              f"{c['fused_total_peak_mb']:.0f} MB; max |fused - reference| {chk['max_abs_diff']:.2e} "
              f"(values up to {chk['max_abs_value']:.2f}){extra}")
    t = result["targets"]
    print(f"targets: time_ratio >= {t['time_ratio']}, memory_ratio >= {t['memory_ratio']}, floor_ratio <= {t['floor_ratio']}"
          f"  (peak memory: {cfg['memory_method']})")


def write_chart(result: dict, path: Path) -> None:
    """Times (with the GEMM floor), the three target ratios against their targets, peak memory."""
    from _plot import pyplot

    plt = pyplot()
    if plt is None:
        return
    cases = result["cases"]
    labels = [f"B={c['batch']}" for c in cases]
    xs = list(range(len(cases)))
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4.5))
    w = 0.27
    ax1.bar([x - w for x in xs], [c["reference_ms"] for c in cases], w, label="reference")
    ax1.bar(xs, [c["fused_ms"] for c in cases], w, label="fused")
    ax1.bar([x + w for x in xs], [c["gemm_floor_ms"] for c in cases], w, label="fused GEMM floor")
    ax1.set_xticks(xs, labels)
    ax1.set_ylabel("forward time (ms, median)")
    ax1.legend(fontsize=8)
    # each ratio beside its target (time and memory: at least; floor: at most)
    targets = result["targets"]
    ratios = [("time_ratio", "reference / fused time", ">="), ("memory_ratio", "reference / fused peak", ">="),
              ("floor_ratio", "fused time / GEMM floor", "<=")]
    for k, (key, desc, sense) in enumerate(ratios):
        offs = [x + (k - 1) * w for x in xs]
        bars = ax2.bar(offs, [c[key] for c in cases], w, label=f"{desc} (target {sense} {targets[key]})",
                       color=f"C{k}")
        ax2.hlines([targets[key]] * len(xs), [o - w / 2 for o in offs], [o + w / 2 for o in offs],
                   colors="tab:red", linestyles="--", lw=1)
        for bar, c in zip(bars, cases):
            ax2.text(bar.get_x() + bar.get_width() / 2, c[key], f"{c[key]:.2f}", ha="center", va="bottom", fontsize=7)
    ax2.axhline(1.0, color="black", lw=0.8)
    top = max([c[key] for c in cases for key, _, _ in ratios] + [t for t in targets.values()])
    ax2.set_ylim(0, 1.5 * top)  # headroom for the legend above the bars
    ax2.set_xticks(xs, labels)
    ax2.set_ylabel("ratio (red dashes: targets)")
    ax2.legend(fontsize=7, loc="upper left")
    ax3.bar([x - w / 2 for x in xs], [c["reference_peak_mb"] for c in cases], w, label="reference")
    ax3.bar([x + w / 2 for x in xs], [c["fused_peak_mb"] for c in cases], w, label="fused")
    ax3.set_xticks(xs, labels)
    ax3.set_ylabel("peak memory during forward (MB)")
    ax3.legend(fontsize=8)
    cfg = result["config"]
    fig.suptitle(f"Cambrian connector forward, CPU float32, {cfg['threads']} thread(s)"
                 + (" (quick shapes)" if cfg["quick"] else ""))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
