"""Test-wide settings.  Must run before anything imports triton or transformers."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU interpreter here
os.environ.setdefault("HF_HUB_OFFLINE", "1")    # nothing may be fetched from a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import sys  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def interp_only_backend(monkeypatch):
    """A kernel backend "interp_only" that implements only `multi_tower_interpolate` (through the reference),
    registered for this test and preferred on the CPU.  `.calls` records each call as (src_sizes, dst_size)."""
    from cambrian import kernels
    from cambrian.kernels import reference

    monkeypatch.setattr(kernels, "BACKENDS", dict(kernels.BACKENDS))
    monkeypatch.setattr(kernels, "PREFERENCE", dict(kernels.PREFERENCE))
    calls: list = []
    fake = types.ModuleType("fake_interp_only")
    fake.is_available = lambda: True
    fake.supports = lambda op, device: op == "multi_tower_interpolate"

    def interp(features, src_sizes, dst_size):
        calls.append((tuple(tuple(s) for s in src_sizes), tuple(dst_size)))
        return reference.multi_tower_interpolate(features, src_sizes, dst_size)

    fake.multi_tower_interpolate = interp
    monkeypatch.setitem(sys.modules, "fake_interp_only", fake)
    kernels.register_backend("interp_only", "fake_interp_only", prefer_on=["cpu"])
    try:
        yield types.SimpleNamespace(name="interp_only", module=fake, calls=calls)
    finally:
        kernels._modules.pop("interp_only", None)
