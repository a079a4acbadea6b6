"""Training: the two-stage Cambrian recipe on transformers.Trainer (single process, DDP/FSDP via torchrun,
DeepSpeed ZeRO-2/3, torch_xla).

    python -m cambrian.train --model_name_or_path LLM --tower_paths '{...}' --data_path data.jsonl ...
    python -m cambrian.train run.yaml [--flag value ...]

Public API (imported lazily, so `import cambrian.train` stays cheap):

    parse_args, ModelArguments, DataArguments, TrainingArguments, scaled_lr      (arguments)
    build_model, param_group_of, configure_trainable, load_connector_weights   (builder)
    CambrianTrainer, train, save_trained_checkpoint, load_trained_weights      (trainer)
    NonFiniteLossGuard, NonFiniteLossError, CheckpointSyncCallback             (callbacks)
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "parse_args": "arguments", "ModelArguments": "arguments", "DataArguments": "arguments",
    "TrainingArguments": "arguments", "scaled_lr": "arguments",
    "build_model": "builder", "BuiltModel": "builder", "param_group_of": "builder",
    "configure_trainable": "builder", "load_connector_weights": "builder",
    "CambrianTrainer": "trainer", "train": "trainer", "prepare": "trainer", "run": "trainer",
    "TrainResult": "trainer",
    "save_trained_checkpoint": "trainer", "load_trained_weights": "trainer", "engine_name": "trainer",
    "NonFiniteLossGuard": "callbacks", "NonFiniteLossError": "callbacks", "CheckpointSyncCallback": "callbacks",
    "LossLogCallback": "callbacks",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cambrian.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
