"""`python -m cambrian.train ...` (also under `torchrun` / `deepspeed` launchers): one training stage.

Exit codes: 0 done; 2 bad arguments or inputs (reported before training starts); 3 stopped on a NaN/Inf loss
(`--nan_policy stop`, the report names the step, the loss and the sample ids).
"""
from __future__ import annotations

import os
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    _maybe_enable_spmd()
    from .arguments import parse_args
    from .builder import QuantizationUnavailableError
    from .callbacks import NonFiniteLossError

    try:
        model_args, data_args, training_args = parse_args(argv)
        from .trainer import prepare, run

        prepared = prepare(model_args, data_args, training_args)
    except (ValueError, FileNotFoundError, QuantizationUnavailableError) as exc:  # configuration errors: no traceback needed
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = run(prepared)
    except NonFiniteLossError as exc:
        print(f"error: {exc.report}", file=sys.stderr)
        return 3
    finally:
        _shutdown_distributed()
    from .trainer import reports

    if reports(training_args):
        print(f"done: {result.global_step} steps on {result.engine} in {result.seconds:.1f}s, train loss "
              f"{result.train_loss:.4f}, {result.skipped_records} skipped record(s); saved to {result.output_dir}",
              flush=True)
    return 0


def _maybe_enable_spmd() -> None:
    """torch_xla SPMD (FSDPv2 on TPU, `fsdp_config.xla_fsdp_v2`) must be switched on before any XLA tensor exists;
    scripts/launch.sh sets XLA_USE_SPMD=1 for ENGINE=xla."""
    if os.environ.get("XLA_USE_SPMD") == "1" and os.environ.get("PJRT_DEVICE"):
        import torch_xla.runtime as xr

        xr.use_spmd()


def _shutdown_distributed() -> None:
    """Tear the process group down before the interpreter exits: gloo's threads otherwise abort the process at exit
    ("terminate called without an active exception") once in a while."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
