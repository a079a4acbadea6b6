"""Load and save Cambrian checkpoints in the released layout.

A checkpoint folder holds `config.json` (LLM keys + multimodal keys), the weights as `model.safetensors`,
sharded `model-0000x-of-0000y.safetensors` + `model.safetensors.index.json`, or the older
`pytorch_model*.bin` (read with `weights_only=True`, never as a pickle), and the tokenizer files.
Tower weights are not in it: they come from `tower_paths` (or `<checkpoint>/vision_towers/`,
or `$CAMBRIAN_TOWER_DIR`).  Two other layouts load with `model_base` (the LLM it was trained from):
a LoRA adapter (`adapter_config.json` + `non_lora_trainables.bin`) and a stage-1 connector-only
checkpoint (`mm_projector.bin` / `mm_projector.safetensors`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, NamedTuple, Sequence

import torch

from ..utils import quiet_transformers
from .config import CambrianConfig
from .modeling import CONNECTOR_PREFIX, CambrianForCausalLM
from .vision_towers import load_vision_tower, resolve_tower_paths

__all__ = ["CheckpointError", "LoadedModel", "load_pretrained_model", "save_pretrained", "read_state_dict"]

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint's weights do not match the model its config.json describes."""


class LoadedModel(NamedTuple):
    """What `load_pretrained_model` returns; unpacks like the original's 4-tuple."""

    tokenizer: Any
    model: CambrianForCausalLM
    image_processor: list
    context_len: int


# ---------------------------------------------------------------------------------------- reading
def weight_files(folder: str) -> list[str]:
    """The weight files of a checkpoint folder, safetensors preferred."""
    for index_name, single in ((SAFE_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
            if missing:
                raise CheckpointError(f"{index} lists shards that are not there: {missing}")
            return [os.path.join(folder, s) for s in shards]
        if os.path.isfile(os.path.join(folder, single)):
            return [os.path.join(folder, single)]
    raise CheckpointError(f"no weights in {folder}: expected model.safetensors, {SAFE_INDEX}, "
                          f"pytorch_model.bin or {BIN_INDEX}")


def read_state_dict(files: str | Sequence[str], keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors from safetensors or `.bin` files (the latter with `weights_only=True`); `keys` filters."""
    from safetensors import safe_open

    files = [files] if isinstance(files, str) else list(files)
    wanted = None if keys is None else set(keys)
    out: dict[str, torch.Tensor] = {}
    for path in files:
        if path.endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt") as f:
                    for k in f.keys():
                        if wanted is None or k in wanted:
                            out[k] = f.get_tensor(k)
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"cannot read {path}: {exc}") from exc
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise CheckpointError(f"cannot read {path} as a weights-only torch file: {exc}") from exc
            out.update({k: v for k, v in state.items() if wanted is None or k in wanted})
    return out


def checkpoint_keys(files: Sequence[str]) -> list[str]:
    from safetensors import safe_open

    keys: list[str] = []
    for path in files:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                keys.extend(f.keys())
        else:
            keys.extend(read_state_dict(path).keys())
    return keys


def _check_keys(what: str, expected: set[str], found: set[str], allowed_missing: set[str] = frozenset()) -> None:
    missing = sorted(expected - found - set(allowed_missing))
    unexpected = sorted(found - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s): {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s): {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
        raise CheckpointError(f"{what}: " + "; ".join(parts))


def _torch_dtype(dtype: Any) -> Any:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return dtype
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[str(dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16") from None


def _quantization_config(load_8bit: bool, load_4bit: bool, compute_dtype: torch.dtype) -> Any:
    if not (load_8bit or load_4bit):
        return None
    if load_8bit and load_4bit:
        raise ValueError("choose one of load_8bit and load_4bit")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RuntimeError("4/8-bit loading needs bitsandbytes: `pip install bitsandbytes` "
                           "(it quantises on CUDA GPUs; on a CPU-only machine load in bfloat16 instead)") from None
    if not torch.cuda.is_available():
        raise RuntimeError("4/8-bit loading goes through bitsandbytes, which needs a CUDA GPU; none is available "
                           "here. Load with dtype=torch.bfloat16 instead.")
    from transformers import BitsAndBytesConfig

    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4")


# ---------------------------------------------------------------------------------------- loading
def load_pretrained_model(model_path: str, model_base: str | None = None,
                          tower_paths: Mapping[str, str] | None = None, load_8bit: bool = False,
                          load_4bit: bool = False, device: str | torch.device = "cpu", dtype: Any = None,
                          attn_implementation: str | None = "sdpa", unfreeze_vision_towers: bool = False,
                          ) -> LoadedModel:
    """Load a Cambrian checkpoint folder.

    model_path: released-layout folder; or a LoRA adapter / stage-1 connector folder with `model_base`.
    tower_paths: vision tower name (as in config.json, e.g. ``"openai/clip-vit-large-patch14-336"``) ->
        local transformers folder or timm/open_clip checkpoint file.  Towers not in the mapping are looked
        up in ``<model_path>/vision_towers/`` and ``$CAMBRIAN_TOWER_DIR``; a missing one is an error that
        lists all missing towers.
    dtype: torch dtype (or "float32"/"bfloat16"/"float16") for the LLM and connector; None keeps the
        checkpoint's own dtype.  Towers run in float32 on CPU, in `dtype` elsewhere.
    Returns `LoadedModel(tokenizer, model, image_processor, context_len)`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(model_path):
        raise FileNotFoundError(f"checkpoint folder not found: {model_path}")
    dtype = _torch_dtype(dtype)
    config = CambrianConfig.from_pretrained(model_path)
    is_lora = os.path.isfile(os.path.join(model_path, "adapter_config.json"))
    connector_files = [os.path.join(model_path, f) for f in ("mm_projector.safetensors", "mm_projector.bin")
                       if os.path.isfile(os.path.join(model_path, f))]
    if (is_lora or connector_files) and model_base is None:
        kind = "a LoRA adapter" if is_lora else "a connector-only (stage-1) checkpoint"
        raise ValueError(f"{model_path} is {kind}: pass model_base=<the LLM it was trained from>")
    llm_path = model_base if model_base is not None else model_path

    quant = _quantization_config(load_8bit, load_4bit, dtype if isinstance(dtype, torch.dtype) else torch.bfloat16)
    llm_kwargs: dict[str, Any] = {"config": config.llm_config, "dtype": dtype if dtype is not None else "auto"}
    if attn_implementation:
        llm_kwargs["attn_implementation"] = attn_implementation
    if quant is not None:
        llm_kwargs.update(quantization_config=quant, device_map={"": str(device)})
    try:
        with quiet_transformers():
            llm, info = AutoModelForCausalLM.from_pretrained(llm_path, output_loading_info=True, **llm_kwargs)
    except (OSError, EnvironmentError) as exc:
        raise CheckpointError(f"cannot load the LLM weights from {llm_path}: {exc}") from exc
    missing_llm = [k for k in info.get("missing_keys", []) if not (k == "lm_head.weight" and config.llm_config.tie_word_embeddings)]
    if missing_llm:
        raise CheckpointError(f"{llm_path}: {len(missing_llm)} missing LLM tensor(s): {sorted(missing_llm)[:20]}")
    mismatched = info.get("mismatched_keys", [])
    if mismatched:
        raise CheckpointError(f"{llm_path}: tensor(s) with the wrong shape: {list(mismatched)[:20]}")

    names = config.mm_vision_tower_aux_list
    towers = []
    if names:
        paths = resolve_tower_paths(names, tower_paths, checkpoint_dir=model_path)
        towers = [load_vision_tower(n, paths[n], select_layer=config.mm_vision_select_layer,
                                    select_feature=config.mm_vision_select_feature, unfreeze=unfreeze_vision_towers)
                  for n in names]
    model = CambrianForCausalLM(config, towers, llm=llm)

    if is_lora:
        model.llm = _merge_lora(model.llm, model_path)
        connector_state = _strip_prefixes(read_state_dict(_existing(model_path, "non_lora_trainables")))
    elif connector_files:
        connector_state = read_state_dict(connector_files[0])
    elif model.connector is not None:
        files = weight_files(model_path)
        conn_keys, llm_keys = model.split_checkpoint_keys(checkpoint_keys(files))
        llm_state = set(llm.state_dict())
        stray = [k for k in llm_keys if k not in llm_state]
        if stray:
            raise CheckpointError(f"{model_path}: {len(stray)} unexpected tensor(s): {sorted(stray)[:20]}")
        connector_state = read_state_dict(files, conn_keys)
    else:
        connector_state = {}
    if model.connector is not None:
        expected = {CONNECTOR_PREFIX + k for k in model.connector.state_dict()}
        _check_keys(f"{model_path} (connector)", expected, set(connector_state))
        conn_dtype = next(llm.parameters()).dtype if quant is None else (dtype or torch.bfloat16)
        model.connector.load_state_dict({k[len(CONNECTOR_PREFIX):]: v for k, v in connector_state.items()})
        model.connector.to(dtype=conn_dtype)

    device = torch.device(device)
    if quant is None:
        model.llm.to(device)
        if model.connector is not None:
            model.connector.to(device)
    tower_dtype = torch.float32 if device.type == "cpu" else (dtype if isinstance(dtype, torch.dtype) else torch.float16)
    for t in model.vision_towers:
        t.to(device=device, dtype=tower_dtype)
    model.eval()

    tok_path = model_path if _has_tokenizer(model_path) else llm_path
    try:
        with quiet_transformers():  # it reads config.json and warns that `cambrian_llama` is not its type
            tokenizer = AutoTokenizer.from_pretrained(tok_path, use_fast=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load a tokenizer from {tok_path}: {exc}") from exc
    if config.tokenizer_model_max_length:
        tokenizer.model_max_length = config.tokenizer_model_max_length
    model.tokenizer = tokenizer
    model.template_name = _template_for(model_path, config, model_base)
    context_len = int(getattr(config.llm_config, "max_position_embeddings", 2048) or 2048)
    return LoadedModel(tokenizer, model, model.image_processors, context_len)


def _existing(folder: str, stem: str) -> str:
    for ext in (".safetensors", ".bin"):
        p = os.path.join(folder, stem + ext)
        if os.path.isfile(p):
            return p
    raise CheckpointError(f"{folder} has no {stem}.safetensors or {stem}.bin")


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA trainer names (`base_model.model.model.vision_query`) -> checkpoint names."""
    out = {}
    for k, v in state.items():
        for prefix in ("base_model.model.", "base_model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        out[k] = v
    return out


def _merge_lora(llm: torch.nn.Module, adapter_path: str) -> torch.nn.Module:
    from peft import PeftModel

    with quiet_transformers():
        peft_model = PeftModel.from_pretrained(llm, adapter_path)
    return peft_model.merge_and_unload()


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _template_for(model_path: str, config: CambrianConfig, model_base: str | None = None) -> str:
    """The conversation template: `cambrian_template.txt` of the checkpoint (or its base), else a guess."""
    from ..conversation import default_template_for

    for folder in (model_path, model_base):
        named = os.path.join(folder, "cambrian_template.txt") if folder else ""
        if named and os.path.isfile(named):
            with open(named, encoding="utf-8") as f:
                return f.read().strip()
    return default_template_for(os.path.basename(os.path.normpath(model_path)) + " " + config.model_type,
                                vocab_size=getattr(config.llm_config, "vocab_size", None))


# ---------------------------------------------------------------------------------------- saving
def save_pretrained(model: CambrianForCausalLM, folder: str, tokenizer: Any = None, max_shard_size: str | int = "5GB",
                    save_towers: bool = False, template: str | None = None) -> None:
    """Write `model` in the released layout (config.json, safetensors shards + index, tokenizer).

    save_towers: also write each vision tower as a transformers folder under `<folder>/vision_towers/`
    (so the checkpoint is self-contained; released checkpoints do not carry their towers).
    template: conversation template name, written to `cambrian_template.txt`.
    """
    os.makedirs(folder, exist_ok=True)
    model.config.save_pretrained(folder)
    write_weights(model.checkpoint_state_dict(), folder, max_shard_size)
    write_tokenizer_and_template(folder, tokenizer if tokenizer is not None else model.tokenizer,
                                 template or model.template_name)
    if save_towers:
        from .vision_towers import tower_dir_name

        for name, tower in zip(model.config.mm_vision_tower_aux_list, model.vision_towers):
            tower.save_pretrained(os.path.join(folder, "vision_towers", tower_dir_name(name)))


def write_weights(state: Mapping[str, torch.Tensor], folder: str, max_shard_size: str | int = "5GB") -> list[str]:
    """Write `state` as model.safetensors, or shards + model.safetensors.index.json; returns the file names.

    Weight files of an earlier save in `folder` are removed first (they would be read back by mistake).
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    for old in os.listdir(folder):
        if old.startswith("model") and (old.endswith(".safetensors") or old == SAFE_INDEX):
            os.remove(os.path.join(folder, old))
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    written = []
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, os.path.join(folder, filename), metadata={"format": "pt"})
        written.append(filename)
    if split.is_sharded:
        with open(os.path.join(folder, SAFE_INDEX), "w", encoding="utf-8") as f:
            json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f, indent=2)
        written.append(SAFE_INDEX)
    return written


def write_tokenizer_and_template(folder: str, tokenizer: Any, template: str | None) -> None:
    """The tokenizer files and `cambrian_template.txt` (the conversation template's name)."""
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if template:
        with open(os.path.join(folder, "cambrian_template.txt"), "w", encoding="utf-8") as f:
            f.write(template + "\n")
