"""Build the model to train from the training arguments, and set which parameters train in each stage.

Two starting points:

* `--model_name_or_path <LLM folder>` (a transformers causal LM with its tokenizer): towers come from
  `--tower_paths`, the connector is built from the multimodal arguments (random init, seeded by `--seed`), and
  stage 2 loads the stage-1 connector from `--pretrain_mm_mlp_adapter`.
* `--model_name_or_path <Cambrian checkpoint>` (config.json with multimodal keys + weights): the model is loaded as
  is with `load_pretrained_model` and training continues; its config.json defines the connector.

Stages (the recipe):

    stage 1 (--tune_mm_mlp_adapter)   connector (+ in-LLM sampler layers) trains; LLM and towers frozen
    stage 2                            connector + LLM train (LoRA adapters instead of the LLM with --lora_enable);
                                       towers frozen unless --unfreeze_mm_vision_tower

Parameter groups for the optimizer (`param_group_of`): the connector's projectors (`mm_projector_lr`), the SVA
modules `vision_sampler_*` / `vision_sampler_layers` / `vision_query` (`mm_vision_sampler_lr`), the towers
(`mm_vision_tower_lr`), everything else at the base learning rate.
"""
from __future__ import annotations

import json
import logging
import os
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cambrian.model.builder import CheckpointError, read_state_dict
from cambrian.model.config import CambrianConfig
from cambrian.model.modeling import CONNECTOR_PREFIX, CambrianForCausalLM
from cambrian.utils import quiet_transformers

from .arguments import DataArguments, ModelArguments, TrainingArguments

__all__ = [
    "BuiltModel", "build_model", "build_cambrian_config", "configure_trainable", "init_connector", "load_connector_weights",
    "is_cambrian_checkpoint", "param_group_of", "trainable_summary", "find_lora_target_modules",
    "enable_activation_checkpointing", "PARAM_GROUPS", "QuantizationUnavailableError",
]

logger = logging.getLogger(__name__)

PARAM_GROUPS = ("base", "projector", "sampler", "tower")
# Wrapper segments that engines insert into parameter names (FSDP, activation checkpointing, DDP, torch.compile).
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass
class BuiltModel:
    """What `build_model` returns."""

    model: CambrianForCausalLM
    tokenizer: Any
    template: str
    stage: int  # 1 = connector alignment, 2 = instruction tuning


# ------------------------------------------------------------------------------------------------ names
def _clean_name(name: str) -> str:
    for seg in _WRAPPER_SEGMENTS:
        name = name.replace(seg, "")
    if name.startswith("module."):  # DDP / DeepSpeed engine
        name = name[len("module."):]
    return name


def param_group_of(name: str) -> str:
    """Which learning-rate group a parameter of `CambrianForCausalLM` belongs to (see the module docstring)."""
    name = _clean_name(name)
    if name.startswith("vision_towers."):
        return "tower"
    if name.startswith("connector."):
        sub = name[len("connector."):]
        if sub.startswith(("vision_sampler", "vision_query")):
            return "sampler"
        if sub.startswith("mm_projector"):
            return "projector"
    return "base"


def is_cambrian_checkpoint(path: str | None) -> bool:
    """A folder whose config.json carries the multimodal keys (a released / trained Cambrian checkpoint)."""
    if not path or not os.path.isdir(path):
        return False
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return False
    with open(file, encoding="utf-8") as f:
        cfg = json.load(f)
    return "mm_vision_tower_aux_list" in cfg or str(cfg.get("model_type", "")).startswith(("cambrian_", "llava_"))


# ------------------------------------------------------------------------------------------------ config
def build_cambrian_config(llm_config: Any, model_args: ModelArguments, data_args: DataArguments,
                          training_args: TrainingArguments) -> CambrianConfig:
    """The `CambrianConfig` for an LLM config and the multimodal arguments (validated: bad values raise
    `ConfigError` naming the key)."""
    if model_args.mm_use_im_start_end:
        raise ValueError("--mm_use_im_start_end True is not supported (no released Cambrian model uses it)")
    names = model_args.tower_names
    if not names:
        raise ValueError("--vision_tower_aux_list is required (a JSON list of vision tower names)")
    lens = model_args.tower_token_lens or [model_args.image_token_len] * len(names)
    extra = {
        "tune_mm_mlp_adapter": model_args.tune_mm_mlp_adapter,
        "freeze_mm_mlp_adapter": training_args.freeze_mm_mlp_adapter,
        "unfreeze_mm_vision_tower": model_args.unfreeze_mm_vision_tower,
        "mm_projector_lr": training_args.mm_projector_lr,
        "mm_vision_sampler_lr": training_args.mm_vision_sampler_lr,
        "mm_vision_tower_lr": training_args.mm_vision_tower_lr,
        "use_mm_proj": True,
    }
    return CambrianConfig(
        llm_config=llm_config,
        model_type=f"cambrian_{llm_config.model_type}",
        mm_projector_type=model_args.mm_projector_type,
        mm_vision_tower_aux_list=list(names),
        mm_vision_tower_aux_token_len_list=list(lens),
        image_token_len=model_args.image_token_len,
        num_query_group=model_args.num_query_group,
        query_num_list=model_args.query_nums,
        connector_depth=model_args.connector_depth,
        vision_hidden_size=model_args.vision_hidden_size,
        connector_only=model_args.connector_only,
        num_of_vision_sampler_layers=model_args.num_of_vision_sampler_layers,
        start_of_vision_sampler_layers=model_args.start_of_vision_sampler_layers,
        stride_of_vision_sampler_layers=model_args.stride_of_vision_sampler_layers,
        image_position=model_args.image_position,
        image_after_question=model_args.image_after_question,
        mm_vision_select_layer=model_args.mm_vision_select_layer,
        mm_vision_select_feature=model_args.mm_vision_select_feature,
        image_aspect_ratio=data_args.image_aspect_ratio,
        mm_patch_merge_type=model_args.mm_patch_merge_type,
        mm_use_im_start_end=False,
        tokenizer_model_max_length=training_args.model_max_length,
        tokenizer_padding_side="right",
        extra=extra,
    )


# ------------------------------------------------------------------------------------------------ weights
def _connector_file(path: str) -> str | list[str]:
    """The connector weights named by --pretrain_mm_mlp_adapter: a file, or a folder holding mm_projector.* (a
    stage-1 output) or full checkpoint weights."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in ("mm_projector.safetensors", "mm_projector.bin"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        from cambrian.model.builder import weight_files

        return weight_files(path)
    raise FileNotFoundError(f"--pretrain_mm_mlp_adapter: {path} does not exist")


def _strip_connector_name(key: str) -> str:
    for prefix in ("base_model.model.", "base_model."):  # LoRA trainer names
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key[len(CONNECTOR_PREFIX):] if key.startswith(CONNECTOR_PREFIX) else key


def load_connector_weights(model: CambrianForCausalLM, path: str) -> list[str]:
    """Load a stage-1 connector (checkpoint names `model.vision_query`, `model.mm_projector.0.weight`, ...) into
    `model.connector`.  Every connector tensor must be there with the right shape; returns the keys loaded."""
    if model.connector is None:
        raise ValueError("the model has no connector to load --pretrain_mm_mlp_adapter into")
    files = _connector_file(path)
    expected = model.connector.state_dict()
    state = read_state_dict(files)
    state = {_strip_connector_name(k): v for k, v in state.items()}
    if isinstance(files, list):  # a full checkpoint's weights also hold the LLM: keep the connector's tensors
        state = {k: v for k, v in state.items() if k in expected}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {missing[:10]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {unexpected[:10]}")
        if wrong:
            parts.append(f"wrong shape: {[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong[:5]]}")
        raise CheckpointError(f"--pretrain_mm_mlp_adapter {path} does not match the connector built from the "
                              f"arguments: " + "; ".join(parts))
    ref = next(iter(expected.values()))
    model.connector.load_state_dict({k: v.to(dtype=ref.dtype) for k, v in state.items()})
    return sorted(state)


# ------------------------------------------------------------------------------------------------ freezing
CONNECTOR_INITS = ("default", "orthogonal")


def init_connector(model: CambrianForCausalLM, mode: str) -> None:
    """Re-initialise a newly built connector: "default" keeps PyTorch's init; "orthogonal" gives every Linear of
    the connector (in-LLM sampler layers included) orthogonal weights (gain 1) and zero biases.

    Why: SVA stacks about eight random Linear layers between tower features and the LLM; with PyTorch's default
    init the per-cell differences shrink to under 1% of the token energy on the way, and a connector trained from
    scratch on random towers (the demo model) learns 2-4x more slowly than an MLP projector.  Orthogonal weights
    preserve norms, which closed most of that gap in the demo's measurements."""
    if mode not in CONNECTOR_INITS:
        raise ValueError(f"--mm_connector_init {mode!r}: choose from {', '.join(CONNECTOR_INITS)}")
    if mode == "default" or model.connector is None:
        return
    with torch.no_grad():
        for module in model.connector.modules():
            if isinstance(module, nn.Linear):
                nn.init.orthogonal_(module.weight)
                if module.bias is not None:
                    module.bias.zero_()


def configure_trainable(model: CambrianForCausalLM, model_args: ModelArguments,
                        training_args: TrainingArguments) -> None:
    """Set `requires_grad` for the stage: see the module docstring.  With LoRA the LLM is already a PeftModel
    whose own trainable set (the adapters) is kept."""
    lora = bool(training_args.lora_enable)
    for p in model.parameters():
        p.requires_grad_(False)
    if not model_args.tune_mm_mlp_adapter:  # stage 2: the LLM trains
        if lora:
            for n, p in model.llm.named_parameters():
                p.requires_grad_("lora_" in n or (training_args.lora_bias == "all" and n.endswith(".bias")))
        else:
            model.llm.requires_grad_(True)
            if model_args.freeze_backbone:
                model.llm.get_decoder().requires_grad_(False)
    if model.connector is not None and not training_args.freeze_mm_mlp_adapter:
        model.connector.requires_grad_(True)
    for tower in model.vision_towers:
        tower.trainable = bool(model_args.unfreeze_mm_vision_tower)  # also keeps a frozen tower in eval mode
        tower.requires_grad_(tower.trainable)


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Trainable parameter counts per top-level part (llm / connector / vision_towers)."""
    out: dict[str, int] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            part = _clean_name(n).split(".")[0]
            out[part] = out.get(part, 0) + p.numel()
    return out


# ------------------------------------------------------------------------------------------------ LoRA / QLoRA
class QuantizationUnavailableError(RuntimeError):
    """--bits 4/8 (QLoRA) needs bitsandbytes and a CUDA GPU."""


def find_lora_target_modules(llm: nn.Module) -> list[str]:
    """Names (last component) of every nn.Linear of the LLM except lm_head (LLaVA's `find_all_linear_names`)."""
    names = set()
    for name, module in llm.named_modules():
        if isinstance(module, nn.Linear):
            names.add(name.split(".")[-1])
    names.discard("lm_head")
    return sorted(names)


def _check_quantization(bits: int) -> None:
    if bits not in (4, 8):
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise QuantizationUnavailableError(f"--bits {bits} (QLoRA) needs bitsandbytes (`pip install bitsandbytes`) and a CUDA GPU; "
                           "on a CPU-only machine train with --bits 16 (optionally --lora_enable)") from None
    if not torch.cuda.is_available():
        raise QuantizationUnavailableError(f"--bits {bits} (QLoRA) quantises through bitsandbytes, which needs a CUDA GPU; none is "
                           "available here. Train with --bits 16 (optionally --lora_enable) instead.")


def _quantization_config(training_args: TrainingArguments) -> Any:
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if training_args.bf16 else (torch.float16 if training_args.fp16 else torch.float32)
    if training_args.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute,
                              bnb_4bit_use_double_quant=training_args.double_quant,
                              bnb_4bit_quant_type=training_args.quant_type)


def _apply_lora(llm: nn.Module, training_args: TrainingArguments) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=training_args.lora_r, lora_alpha=training_args.lora_alpha,
                        target_modules=find_lora_target_modules(llm), lora_dropout=training_args.lora_dropout,
                        bias=training_args.lora_bias, task_type="CAUSAL_LM")
    with quiet_transformers():
        llm = get_peft_model(llm, config)
    if training_args.lora_weight_path:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(llm, read_state_dict(training_args.lora_weight_path))
    return llm


# ------------------------------------------------------------------------------------------------ checkpointing
def enable_activation_checkpointing(model: CambrianForCausalLM, activation_checkpointing_kwargs: dict | None = None,
                                    every_n_layers: int = 1, offload: bool = False) -> None:
    """Activation (gradient) checkpointing of the LLM's decoder layers.

    transformers checkpoints each layer's `forward`, so the in-LLM vision sampler layers (forward hooks on the
    decoder layers) stay outside the recomputed region and run once.  Towers and connector are not checkpointed.
    """
    kwargs = dict(activation_checkpointing_kwargs or {})
    kwargs.setdefault("use_reentrant", False)  # the inputs are inputs_embeds: reentrant mode would need them to require grad
    llm = model.llm
    fn = getattr(llm, "activation_checkpointing_enable", None) or llm.gradient_checkpointing_enable
    if fn.__name__ == "activation_checkpointing_enable":
        fn(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers, offload=offload)
    else:
        fn(gradient_checkpointing_kwargs=kwargs)
    llm.config.use_cache = False


def attach_activation_checkpointing(model: CambrianForCausalLM) -> None:
    """Give the wrapper the `activation_checkpointing_enable` method transformers.Trainer calls for
    `--gradient_checkpointing` / `--activation_checkpointing` (it delegates to the LLM)."""
    if not hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable = types.MethodType(enable_activation_checkpointing, model)


# ------------------------------------------------------------------------------------------------ building
def _load_tokenizer(path: str, training_args: TrainingArguments) -> Any:
    from transformers import AutoTokenizer

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=training_args.model_max_length,
                                                  padding_side="right", use_fast=True,
                                                  cache_dir=training_args.cache_dir)
    if tokenizer.pad_token is None:  # LLaMA-3 and others ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def _template_name(model_args: ModelArguments, model_path: str, llm_config: Any) -> str:
    from cambrian.conversation import default_template_for, get_template

    name = model_args.version
    if name is None:
        file = os.path.join(model_path, "cambrian_template.txt")
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                name = f.read().strip()
        else:
            name = default_template_for(os.path.basename(os.path.normpath(model_path)) + " " + llm_config.model_type,
                                        vocab_size=getattr(llm_config, "vocab_size", None))
            logger.warning("no --version given: using the %r conversation template", name)
    return get_template(name).name  # validates, resolves aliases (llama_v3 -> llama_3)


def build_model(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> BuiltModel:
    """Build (or load) the model, tokenizer and template for training, with the stage's trainable parameters set.

    Call `transformers.set_seed(training_args.seed)` first for a reproducible connector initialisation (the CLI
    does)."""
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    from cambrian.model.builder import load_pretrained_model
    from cambrian.model.vision_towers import load_vision_tower, resolve_tower_paths

    path = model_args.model_name_or_path
    if not path:
        raise ValueError("--model_name_or_path is required (a local LLM folder or a Cambrian checkpoint)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model_name_or_path {path}: not a folder (models are never downloaded here)")
    stage = 1 if model_args.tune_mm_mlp_adapter else 2
    if training_args.lora_enable and stage == 1:
        raise ValueError("--lora_enable applies to stage 2; stage 1 (--tune_mm_mlp_adapter) trains only the connector")
    if training_args.bits in (4, 8) and not training_args.lora_enable:
        raise ValueError(f"--bits {training_args.bits} quantises the LLM: it needs --lora_enable (QLoRA)")
    _check_quantization(training_args.bits)
    quant = _quantization_config(training_args) if training_args.bits in (4, 8) else None

    from_checkpoint = is_cambrian_checkpoint(path)  # reads config.json
    if from_checkpoint:
        if quant is not None:
            raise ValueError("QLoRA (--bits 4/8) starts from a base LLM folder, not from a Cambrian checkpoint")
        loaded = load_pretrained_model(path, tower_paths=model_args.tower_path_map, dtype=torch.float32,
                                       attn_implementation=model_args.attn_implementation,
                                       unfreeze_vision_towers=model_args.unfreeze_mm_vision_tower)
        model = loaded.model
        logger.info("continuing from the Cambrian checkpoint %s (its config.json defines the connector)", path)
        model.config.tokenizer_model_max_length = training_args.model_max_length
        model.config.image_aspect_ratio = data_args.image_aspect_ratio
    else:
        with quiet_transformers():
            llm_config = AutoConfig.from_pretrained(path, cache_dir=training_args.cache_dir)
        kwargs: dict[str, Any] = {"dtype": torch.float32, "cache_dir": training_args.cache_dir}
        if model_args.attn_implementation:
            kwargs["attn_implementation"] = model_args.attn_implementation
        if quant is not None:
            kwargs.update(quantization_config=quant, dtype=quant.bnb_4bit_compute_dtype if training_args.bits == 4
                          else torch.float16, device_map={"": training_args.local_process_index})
        with quiet_transformers():
            llm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        config = build_cambrian_config(llm.config, model_args, data_args, training_args)
        paths = resolve_tower_paths(config.mm_vision_tower_aux_list, model_args.tower_path_map)
        towers = [load_vision_tower(n, paths[n], select_layer=config.mm_vision_select_layer,
                                    select_feature=config.mm_vision_select_feature,
                                    unfreeze=model_args.unfreeze_mm_vision_tower, dtype=torch.float32)
                  for n in config.mm_vision_tower_aux_list]
        # The connector's random init must depend on --seed only, not on how much randomness loading consumed
        # (DeepSpeed ZeRO-3 loads under zero.Init, which draws from the RNG).
        set_seed(training_args.seed)
        model = CambrianForCausalLM(config, towers, llm=llm)
    llm_config = model.config.llm_config
    model.tokenizer = _load_tokenizer(path, training_args)
    model.template_name = _template_name(model_args, path, llm_config)

    if model_args.pretrain_mm_mlp_adapter:
        keys = load_connector_weights(model, model_args.pretrain_mm_mlp_adapter)
        logger.info("loaded %d connector tensors from %s", len(keys), model_args.pretrain_mm_mlp_adapter)
    elif stage == 2 and not from_checkpoint:
        logger.warning("stage 2 without --pretrain_mm_mlp_adapter: the connector starts from random weights")
    if not from_checkpoint and not model_args.pretrain_mm_mlp_adapter:
        init_connector(model, model_args.mm_connector_init)

    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model.llm = prepare_model_for_kbit_training(model.llm,
                                                    use_gradient_checkpointing=bool(training_args.gradient_checkpointing))
    if training_args.lora_enable:
        model.llm = _apply_lora(model.llm, training_args)
    llm_config.use_cache = False  # no KV cache while training (restored in the saved config.json)
    configure_trainable(model, model_args, training_args)
    attach_activation_checkpointing(model)
    return BuiltModel(model=model, tokenizer=model.tokenizer, template=model.template_name, stage=stage)
