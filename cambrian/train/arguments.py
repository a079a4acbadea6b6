"""Training arguments: the original Cambrian / LLaVA `ModelArguments`, `DataArguments` and `TrainingArguments`.

Field names are those of the released training scripts (`scripts/cambrian/*.sh` of the original), so a command
line translates unchanged; `TrainingArguments` extends `transformers.TrainingArguments`, so every Hugging Face
option (`--deepspeed`, `--fsdp`, `--bf16`, `--gradient_checkpointing`, `--save_steps`, ...) works as usual.
List-valued options take JSON (`--vision_tower_aux_list '["a", "b"]'`), as in the original.

Additions: `--tower_paths` (where each vision tower is on disk: towers are never downloaded), `--nan_policy`,
`--checkpoint_sync_dir`, `--loss_log_file`, `--base_batch_size` (sqrt learning-rate scaling) and
`--attn_implementation`.

`parse_args(argv)` accepts, besides plain flags, a JSON or YAML config file (`python -m cambrian.train run.yaml`
or `--config run.yaml`); flags given after it override the file.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import transformers

__all__ = [
    "ModelArguments", "DataArguments", "TrainingArguments", "parse_args", "parse_json_list", "parse_tower_paths",
    "scaled_lr", "NAN_POLICIES",
]

NAN_POLICIES = ("stop", "skip")


def scaled_lr(base_lr: float, batch_size: int, base_batch_size: int) -> float:
    """Cambrian's learning-rate rule for another global batch size: ``base_lr * sqrt(batch_size / base_batch_size)``.

    >>> scaled_lr(4e-5, 128, 512)   # the 8B instruction-tuning lr at a quarter of the batch
    2e-05
    """
    if batch_size <= 0 or base_batch_size <= 0:
        raise ValueError(f"batch sizes must be positive, got {batch_size} and {base_batch_size}")
    return base_lr * math.sqrt(batch_size / base_batch_size)


def parse_json_list(value: Any, name: str, item_type: type | None = None) -> list | None:
    """A list option: JSON text (`'["a", "b"]'`, `'[576, 576]'`), an actual list (config files), or None."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"--{name}: expected a JSON list such as '[576, 576]', got {value!r}") from None
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"--{name}: expected a list, got {value!r}")
    if item_type is not None and not all(isinstance(v, item_type) and not isinstance(v, bool) for v in value):
        raise ValueError(f"--{name}: every entry must be a {item_type.__name__}, got {value!r}")
    return list(value)


def parse_tower_paths(value: Any) -> dict[str, str]:
    """`--tower_paths`: a JSON object ``{"name": "path"}``, or ``NAME=PATH`` entries separated by commas or
    whitespace (tower names contain '/', never '=' or ',')."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return {str(k): os.fspath(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        text = str(value).strip()
        if text.startswith("{"):
            try:
                return parse_tower_paths(json.loads(text))
            except json.JSONDecodeError as exc:
                raise ValueError(f"--tower_paths: invalid JSON: {exc}") from None
        items = text.replace(",", " ").split()
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--tower_paths: expected NAME=PATH, got {item!r}")
        out[name] = path
    return out


@dataclass
class ModelArguments:
    """What to build: the LLM, the vision towers and the connector (the original's ModelArguments)."""

    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "A local transformers LLM folder (stage 1 / stage 2 from a base LLM), or a full Cambrian checkpoint "
                "folder to continue training it (its config.json then defines the connector)."})
    version: Optional[str] = field(default=None, metadata={
        "help": "Conversation template (llama_3 / llama_v3, vicuna_v1 / v1, chatml_direct, phi3, gemma, plain, ...). "
                "Default: the checkpoint's cambrian_template.txt, else a guess from the model."})
    freeze_backbone: bool = field(default=False, metadata={"help": "Freeze the LLM's decoder (lm_head stays trainable)."})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={
        "help": "Stage 1 (connector alignment): train only the connector and the in-LLM vision sampler layers."})
    vision_tower: Optional[str] = field(default=None, metadata={"help": "Accepted for LLaVA scripts; use vision_tower_aux_list."})
    vision_tower_aux_list: Optional[str] = field(default=None, metadata={"help": "JSON list of vision tower names."})
    vision_tower_aux_token_len_list: Optional[str] = field(default=None, metadata={
        "help": "JSON list: tokens per tower (square numbers)."})
    tower_paths: Optional[str] = field(default=None, metadata={
        "help": "Where the towers are: JSON {name: path} or NAME=PATH,NAME=PATH. Missing names fall back to "
                "$CAMBRIAN_TOWER_DIR/<name with / replaced by -->."})
    mm_vision_select_layer: int = field(default=-2)
    mm_vision_select_feature: str = field(default="patch")
    pretrain_mm_mlp_adapter: Optional[str] = field(default=None, metadata={
        "help": "Stage 2: the stage-1 connector (mm_projector.safetensors / mm_projector.bin, or the stage-1 "
                "output folder holding it)."})
    mm_projector_type: str = field(default="sva", metadata={"help": "sva, mlp2x_gelu or linear."})
    mm_use_im_start_end: bool = field(default=False)
    mm_use_im_patch_token: bool = field(default=False)
    mm_patch_merge_type: str = field(default="flat")
    image_token_len: int = field(default=576)
    num_query_group: int = field(default=1)
    query_num_list: str = field(default="[576]")
    connector_depth: int = field(default=3)
    vision_hidden_size: int = field(default=1024)
    connector_only: bool = field(default=True)
    num_of_vision_sampler_layers: int = field(default=10)
    start_of_vision_sampler_layers: int = field(default=0)
    stride_of_vision_sampler_layers: int = field(default=3)
    image_position: Optional[int] = field(default=None, metadata={
        "help": "Written to config.json (the original's fixed image position); the model uses the actual positions."})
    unfreeze_mm_vision_tower: bool = field(default=False, metadata={"help": "Also train the vision towers."})
    image_after_question: bool = field(default=False, metadata={
        "help": "The training data puts the image after the question (\"<question>\\n<image>\"); recorded in "
                "config.json (image_after_question) so generation and the CLI build prompts the same way."})
    mm_connector_init: str = field(default="default", metadata={
        "help": "Initialisation of a newly built connector: default (PyTorch's, as the released recipe) or orthogonal "
                "(orthogonal Linear weights, zero biases: the signal survives the connector's stack of random layers, "
                "which lets a connector trained from scratch on random-init towers learn several times faster; "
                "the built-in demo model uses it)."})
    attn_implementation: Optional[str] = field(default="sdpa", metadata={"help": "LLM attention: sdpa, eager, flash_attention_2."})

    @property
    def tower_names(self) -> list[str]:
        names = parse_json_list(self.vision_tower_aux_list, "vision_tower_aux_list", str)
        if names is None and self.vision_tower:
            names = [self.vision_tower]
        return names or []

    @property
    def tower_token_lens(self) -> list[int] | None:
        return parse_json_list(self.vision_tower_aux_token_len_list, "vision_tower_aux_token_len_list", int)

    @property
    def query_nums(self) -> list[int]:
        return parse_json_list(self.query_num_list, "query_num_list", int) or []

    @property
    def tower_path_map(self) -> dict[str, str]:
        return parse_tower_paths(self.tower_paths)


@dataclass
class DataArguments:
    """The LLaVA-format training data (the original's DataArguments)."""

    data_path: Optional[str] = field(default=None, metadata={"help": "Training data: .jsonl (lazy, indexed) or .json."})
    lazy_preprocess: bool = field(default=True, metadata={"help": "Accepted for the original scripts: loading is always lazy."})
    is_multimodal: bool = field(default=True, metadata={"help": "Accepted for the original scripts."})
    image_folder: Optional[str] = field(default=None, metadata={"help": "Root of relative image paths (default: the data file's folder)."})
    image_aspect_ratio: str = field(default="pad", metadata={"help": "pad or square."})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """Hugging Face training arguments plus the original Cambrian ones."""

    cache_dir: Optional[str] = field(default=None)
    optim: str = field(default="adamw_torch")
    # The collator adds `data_meta` (skipped records): HF must not drop columns the model's forward does not name.
    remove_unused_columns: bool = field(default=False)
    freeze_mm_mlp_adapter: bool = field(default=False, metadata={"help": "Freeze the connector (stage 2 LLM-only)."})
    mpt_attn_impl: Optional[str] = field(default="triton", metadata={"help": "Accepted for LLaVA scripts (unused)."})
    model_max_length: int = field(default=2048, metadata={
        "help": "Sequence budget per example, image tokens included; longer examples are truncated."})
    double_quant: bool = field(default=True, metadata={"help": "QLoRA: double quantisation of the statistics."})
    quant_type: str = field(default="nf4", metadata={"help": "QLoRA: fp4 or nf4."})
    bits: int = field(default=16, metadata={"help": "16 (no quantisation), 8 or 4 (QLoRA; needs bitsandbytes + CUDA)."})
    lora_enable: bool = field(default=False)
    lora_r: int = field(default=64)
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.05)
    lora_weight_path: str = field(default="")
    lora_bias: str = field(default="none", metadata={"help": "none, all or lora_only."})
    mm_projector_lr: Optional[float] = field(default=None, metadata={"help": "lr of the connector's projectors."})
    mm_vision_sampler_lr: Optional[float] = field(default=None, metadata={
        "help": "lr of the SVA modules (vision_sampler_*, vision_sampler_layers, vision_query)."})
    mm_vision_tower_lr: Optional[float] = field(default=None, metadata={"help": "lr of the towers (with --unfreeze_mm_vision_tower)."})
    group_by_modality_length: bool = field(default=False, metadata={
        "help": "Batches grouped by length, never mixing image and text-only samples."})
    batch_size: Optional[int] = field(default=None, metadata={
        "help": "Sanity check: the intended global batch size (per_device x accumulation x world size)."})
    base_batch_size: Optional[int] = field(default=None, metadata={
        "help": "If set, the given learning rates are for this global batch size and are rescaled by "
                "sqrt(actual global batch / base_batch_size) (Cambrian's rule)."})
    nan_policy: str = field(default="stop", metadata={
        "help": "On a NaN/Inf loss: 'stop' (report step, loss and sample ids, then stop without applying it) or "
                "'skip' (report, drop the update and continue)."})
    checkpoint_sync_dir: Optional[str] = field(default=None, metadata={
        "help": "Copy every saved checkpoint folder there (atomically: copy to a temporary name, then rename)."})
    loss_log_file: Optional[str] = field(default=None, metadata={
        "help": "Append one JSON line per optimizer step (step, exact loss, lr) to this file (rank 0)."})
    evaluation_strategy: Optional[str] = field(default=None, metadata={"help": "Old name of eval_strategy (original scripts)."})
    warmup_ratio: Optional[float] = field(default=None, metadata={
        "help": "Warmup as a fraction of the steps (original scripts); same as --warmup_steps with a value < 1."})

    def __post_init__(self) -> None:
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            if self.warmup_steps:
                raise ValueError("give --warmup_ratio or --warmup_steps, not both")
            self.warmup_steps = self.warmup_ratio
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"--nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}")
        if self.bits not in (4, 8, 16, 32):
            raise ValueError(f"--bits must be 4, 8 or 16, got {self.bits}")
        if self.lora_bias not in ("none", "all", "lora_only"):
            raise ValueError(f"--lora_bias must be none, all or lora_only, got {self.lora_bias!r}")
        import torch

        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin for (and torch warns about it)
        if not self.use_cpu and not self.deepspeed and _no_accelerator():
            # A machine without accelerator: accelerate sets up gloo process groups (torchrun) and HF allows bf16
            # autocast only with use_cpu.  (DeepSpeed runs on CPU through its own CPU accelerator instead.)
            self.use_cpu = True
        super().__post_init__()
        self._check_deepspeed_optimizer()

    def _check_deepspeed_optimizer(self) -> None:
        """A DeepSpeed config with its own "optimizer" block makes DeepSpeed build the optimizer from a flat parameter
        list: the per-module learning rates would be silently dropped.  Our configs leave the block out, so the
        Trainer's torch AdamW (the class `"torch_adam": true` selects) with the parameter groups is handed to
        DeepSpeed as a client optimizer."""
        ds = self.deepspeed
        if not ds:
            return
        config = ds if isinstance(ds, dict) else None
        if config is None and isinstance(ds, str) and os.path.isfile(ds):
            with open(ds, encoding="utf-8") as f:
                config = json.load(f)
        group_lrs = [x for x in (self.mm_projector_lr, self.mm_vision_sampler_lr, self.mm_vision_tower_lr)
                     if x is not None]
        if config and "optimizer" in config and group_lrs:
            raise ValueError(
                f"{ds}: the DeepSpeed config defines an \"optimizer\" block, which builds the optimizer from one flat "
                "parameter list and would ignore --mm_projector_lr / --mm_vision_sampler_lr / --mm_vision_tower_lr. "
                "Remove the block (scripts/zero*.json do): the Trainer then passes its torch AdamW with the parameter "
                "groups to DeepSpeed.")

    @property
    def global_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * max(self.world_size, 1)


def _no_accelerator() -> bool:
    import torch
    from transformers.utils import is_torch_xla_available

    mps = getattr(torch.backends, "mps", None)
    return not (torch.cuda.is_available() or is_torch_xla_available() or (mps is not None and mps.is_available())
                or (hasattr(torch, "xpu") and torch.xpu.is_available()))


# ------------------------------------------------------------------------------------------------ parsing
def _config_to_argv(config: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in config.items():
        if value is None:
            continue
        if isinstance(value, (list, dict)):
            value = json.dumps(value)
        argv += [f"--{key}", str(value)]
    return argv


def _read_config_file(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(f)
        else:
            data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of argument names to values")
    return data


def parse_args(argv: Sequence[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse the command line into the three argument dataclasses.

    A first argument ending in .json / .yaml / .yml, or `--config FILE` anywhere, is read as a mapping of argument
    names to values (lists may be real lists); the remaining flags are applied after it and override it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    file_argv: list[str] = []
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ValueError("--config needs a file name")
        file_argv = _config_to_argv(_read_config_file(argv[i + 1]))
        argv = argv[:i] + argv[i + 2:]
    elif argv and argv[0].endswith((".json", ".yaml", ".yml")) and not argv[0].startswith("-"):
        file_argv = _config_to_argv(_read_config_file(argv[0]))
        argv = argv[1:]
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args, rest = parser.parse_args_into_dataclasses(
        file_argv + argv, return_remaining_strings=True)
    if rest:
        raise ValueError(f"unknown arguments: {rest}")
    return model_args, data_args, training_args
