"""Shared by the benchmark scripts (run as `python benchmarks/<script>.py`, so this directory is on sys.path)."""
from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType | None:
    """matplotlib.pyplot on the headless Agg backend, or None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: benchmarks run headless
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipped the PNG chart (pip install -r requirements.txt)")
        return None
    return plt
