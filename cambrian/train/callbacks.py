"""Training callbacks: NaN/Inf loss guard, checkpoint sync, per-step loss log.

`NonFiniteLossGuard` is fed by `CambrianTrainer.training_step` (it needs the micro-batch's loss and sample ids,
which callbacks do not see) and acts through the callback events:

* policy "stop": the micro-step whose loss is NaN/Inf is reported (global step, micro-step, loss per rank, the
  ids of the samples in the batch) and `NonFiniteLossError` is raised *before* its backward pass, so the bad
  update is never applied and every rank stops at the same point (the flag is all-reduced first).  The last
  checkpoint stays valid; resume from it after fixing the data / lowering the learning rate.
* policy "skip": the update of that optimizer step is dropped.  On plain / DDP / FSDP / XLA engines the backward
  runs (keeping ranks in step) and the guard clears every gradient in `on_pre_optimizer_step`, so the optimizer
  does nothing for that step (AdamW skips parameters without gradients: no moment or weight-decay update; the lr
  schedule still advances).  Under DeepSpeed, whose engine steps inside `backward`, the bad micro-batch
  back-propagates an exact zero instead and the window's optimizer step runs with every learning rate at 0, so
  the weights do not move either (Adam's moments decay once).  Reports are logged either way and the number of
  skipped steps is logged as `nan_skipped`.

`CheckpointSyncCallback` copies each saved `checkpoint-N` folder to `--checkpoint_sync_dir` (copy to a temporary
name in the target folder, then `os.replace`), the replacement of the original's GCS-only rsync callback.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from typing import Any, Callable, Sequence

import torch
from transformers import TrainerCallback

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard", "CheckpointSyncCallback", "LossLogCallback", "sync_folder"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN/Inf loss (`--nan_policy stop`).  `.report` holds the details."""

    def __init__(self, report: str):
        super().__init__(report)
        self.report = report


class NonFiniteLossGuard(TrainerCallback):
    """NaN/Inf loss detection (see the module docstring).

    The trainer calls `check(loss, ids, global_step, micro_step)` after each forward; it returns True when this
    micro-batch must not be back-propagated normally (any rank had a non-finite loss).  `any_rank` is a callable
    reducing a local bool over all ranks (identity in a single process).
    """

    def __init__(self, policy: str = "stop", any_rank: Callable[[bool], bool] | None = None,
                 gather: Callable[[float], list[float]] | None = None, max_reports: int = 20):
        if policy not in ("stop", "skip"):
            raise ValueError(f"nan policy must be 'stop' or 'skip', got {policy!r}")
        self.policy = policy
        self.any_rank = any_rank or (lambda flag: flag)
        self.gather = gather or (lambda x: [x])
        self.max_reports = max_reports
        self.reports: list[str] = []
        self.skipped_steps: list[int] = []
        self.pending_skip = False

    @staticmethod
    def _finite(loss: torch.Tensor | float) -> bool:
        if isinstance(loss, torch.Tensor):
            return bool(torch.isfinite(loss.detach()).all())
        return math.isfinite(float(loss))

    def check(self, loss: torch.Tensor, ids: Sequence[Any], global_step: int, micro_step: int = 0,
              rank: int = 0) -> bool:
        local_bad = not self._finite(loss)
        bad = self.any_rank(local_bad)
        if not bad:
            return False
        value = float(loss.detach().float().reshape(-1)[0]) if isinstance(loss, torch.Tensor) else float(loss)
        losses = self.gather(value)
        report = (f"non-finite loss at optimizer step {global_step + 1} (micro-step {micro_step}): "
                  f"loss per rank {losses}; this rank ({rank}) loss {value}, batch ids {list(ids)}")
        if len(self.reports) < self.max_reports:
            self.reports.append(report)
        if self.policy == "stop":
            raise NonFiniteLossError(report + ". Stopped before applying the update (--nan_policy stop); the last "
                                     "saved checkpoint is intact: fix the data or lower the learning rate and resume "
                                     "with --resume_from_checkpoint, or use --nan_policy skip.")
        logger.warning("%s -> update dropped (--nan_policy skip)", report)
        self.pending_skip = True
        if global_step + 1 not in self.skipped_steps:
            self.skipped_steps.append(global_step + 1)
        return True

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        # Non-DeepSpeed engines: all ranks agreed on the flag in `check`, so all clear their gradients here.
        if self.pending_skip:
            params = ([p for g in optimizer.param_groups for p in g["params"]] if optimizer is not None
                      else list(model.parameters()))
            for p in params:
                p.grad = None
            self.pending_skip = False

    def on_step_end(self, args, state, control, **kwargs):
        self.pending_skip = False


def _copy_tree_atomic(src: str, dst: str) -> None:
    parent = os.path.dirname(os.path.abspath(dst)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.tmp-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    if os.path.isdir(dst):  # a folder cannot be renamed over a non-empty one: move the old copy aside first
        old = os.path.join(parent, f".{os.path.basename(dst)}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


def sync_folder(src: str, target_dir: str, name: str | None = None) -> str:
    """Copy folder `src` to `<target_dir>/<name or basename(src)>` atomically; returns the destination."""
    dst = os.path.join(target_dir, name or os.path.basename(os.path.normpath(src)))
    _copy_tree_atomic(src, dst)
    return dst


class CheckpointSyncCallback(TrainerCallback):
    """After each checkpoint save, copy `<output_dir>/checkpoint-<step>` to `<target_dir>/checkpoint-<step>`.

    Runs on the main process of each node (`args.should_save`; with a shared file system that is one copy).
    A failed copy is logged and training continues (the local checkpoint is still there).
    """

    def __init__(self, target_dir: str):
        self.target_dir = target_dir
        self.synced: list[str] = []

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        src = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(src):
            return
        try:
            self.synced.append(sync_folder(src, self.target_dir))
            logger.info("synced %s -> %s", src, self.synced[-1])
        except OSError as exc:
            logger.error("checkpoint sync of %s to %s failed: %s", src, self.target_dir, exc)


class LossLogCallback(TrainerCallback):
    """Appends {"step", "loss", "lr"} per optimizer step to a JSONL file (rank 0), with the exact loss (HF's own log
    rounds it to 4 decimals).  `get_loss` returns the finished step's loss; it is called on every rank (it may
    reduce over ranks)."""

    def __init__(self, path: str, get_loss: Callable[[], float | None]):
        self.path = path
        self.get_loss = get_loss

    def on_step_end(self, args, state, control, **kwargs):
        loss = self.get_loss()
        if loss is None or not state.is_world_process_zero:
            return
        lr = None
        scheduler = kwargs.get("lr_scheduler")
        if scheduler is not None:
            try:
                lr = float(scheduler.get_last_lr()[0])
            except Exception:  # DeepSpeed's scheduler before its first step
                lr = None
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.global_step, "loss": loss, "lr": lr}) + "\n")
