"""`CambrianConfig`: the multimodal keys of a Cambrian / LLaVA config.json on top of the LLM's own config.

A released checkpoint's config.json is one flat dict: the LLM's transformers keys (`hidden_size`,
`num_hidden_layers`, ...) plus the multimodal keys the original training code wrote
(`mm_projector_type`, `mm_vision_tower_aux_list`, `query_num_list`, ...).  `model_type` names the
wrapper (`cambrian_llama`, `llava_llama`, `cambrian_mistral`, ...), not a transformers type, so the
LLM part is rebuilt with the base type (`llama`, `mistral`, ...).

Every multimodal key is read unchanged and written back unchanged, so `save_pretrained` of a loaded
checkpoint reproduces its config.json.  A key that looks like a misspelt multimodal key, an unknown
`mm_*` key, or values that contradict each other raise `ConfigError` naming the key.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["CambrianConfig", "ConfigError", "base_model_type"]


class ConfigError(ValueError):
    """A config.json key is unknown, misspelt, or contradicts another key."""


# model_type prefixes written by the original code (`cambrian_llama`, `llava_llama`, ...).
_WRAPPER_PREFIXES = ("cambrian_", "llava_")
# base names that are not transformers model types themselves.
_BASE_ALIASES = {"yi": "llama", "qwen": "qwen2", "phi-3": "phi3", "vicuna": "llama"}

PROJECTOR_TYPES = ("linear", "mlp2x_gelu", "sva")
ASPECT_RATIOS = ("pad", "square")
PATCH_MERGE_TYPES = ("flat", "spatial_unpad")
SELECT_FEATURES = ("patch", "cls_patch")
SVA_NUM_HEADS = 16

# Keys the original training code writes into config.json that do not change the model here.  They
# are kept and written back so a round trip reproduces the file.
PASSTHROUGH_KEYS = frozenset({
    "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "unfreeze_mm_vision_tower", "use_mm_proj",
    "mm_projector_lr", "mm_vision_sampler_lr", "mm_vision_tower_lr", "mm_hidden_size",
    "mm_vision_tower", "vision_tower_aux_list", "connect_layer", "highres", "highres_connect",
    "lowres_token", "dino_threshold", "drop_path", "tune_mm_vision_tower", "mm_use_im_patch_token",
    "mm_vision_tower_aux_config",
})


@dataclass
class CambrianConfig:
    """Multimodal settings plus the wrapped LLM config (`llm_config`, a transformers config).

    Field names and meanings are those of the released config.json files.  Build one with
    `CambrianConfig.from_dict(json_dict)`, `CambrianConfig.from_pretrained(folder)` or directly with
    keyword arguments (then pass `llm_config`).
    """

    llm_config: Any = None
    model_type: str = ""  # the wrapper type as written in config.json, e.g. "cambrian_llama"

    mm_projector_type: str = "sva"
    mm_vision_tower_aux_list: list[str] = field(default_factory=list)
    mm_vision_tower_aux_token_len_list: list[int] = field(default_factory=list)
    image_token_len: int = 576
    num_query_group: int = 1
    query_num_list: list[int] = field(default_factory=lambda: [576])
    connector_depth: int = 3
    vision_hidden_size: int = 1024
    connector_only: bool = True
    num_of_vision_sampler_layers: int = 10
    start_of_vision_sampler_layers: int = 0
    stride_of_vision_sampler_layers: int = 3
    image_position: int | None = None
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    image_aspect_ratio: str = "pad"
    mm_patch_merge_type: str = "flat"
    mm_use_im_start_end: bool = False
    tokenizer_model_max_length: int | None = 2048
    tokenizer_padding_side: str = "right"
    # Not a released key: prompts put the image after the question ("<question>\n<image>") because the model was
    # trained that way (the built-in demo model).  Written to config.json only when true.
    image_after_question: bool = False

    # Keys kept verbatim (PASSTHROUGH_KEYS found in the file), written back on save.
    extra: dict[str, Any] = field(default_factory=dict)
    # The LLM keys as read from the file: transformers renames some (`torch_dtype` -> `dtype`,
    # `rope_theta` -> `rope_parameters`); the original spellings are written back too.
    source_llm_keys: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.llm_config is not None:
            self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def hidden_size(self) -> int:
        """The LLM width (what the projector maps to)."""
        return int(self.llm_config.hidden_size)

    @property
    def num_hidden_layers(self) -> int:
        return int(self.llm_config.num_hidden_layers)

    @property
    def tower_grid_sides(self) -> list[int]:
        """Side of each tower's token grid, from `mm_vision_tower_aux_token_len_list`."""
        return [math.isqrt(n) for n in self.mm_vision_tower_aux_token_len_list]

    @property
    def final_grid_side(self) -> int:
        """Side of the image-token grid handed to the LLM (sqrt of `image_token_len`)."""
        return math.isqrt(self.image_token_len)

    @property
    def sampler_layer_indices(self) -> list[int]:
        """Decoder layers after which an in-LLM vision sampler layer runs (empty if connector_only)."""
        if self.connector_only or self.mm_projector_type != "sva":
            return []
        return [self.start_of_vision_sampler_layers + k * self.stride_of_vision_sampler_layers
                for k in range(self.num_of_vision_sampler_layers)]

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise `ConfigError` naming the first key whose value is invalid or contradicts another."""

        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"config key '{key}': {msg}")

        if self.mm_projector_type not in PROJECTOR_TYPES:
            raise bad("mm_projector_type", f"unknown projector {self.mm_projector_type!r}; expected one of {PROJECTOR_TYPES}")
        if self.image_aspect_ratio not in ASPECT_RATIOS:
            raise bad("image_aspect_ratio", f"{self.image_aspect_ratio!r} is not supported; expected one of {ASPECT_RATIOS}")
        if self.mm_patch_merge_type not in PATCH_MERGE_TYPES:
            raise bad("mm_patch_merge_type", f"{self.mm_patch_merge_type!r} is not supported; expected one of {PATCH_MERGE_TYPES}")
        if self.mm_vision_select_feature not in SELECT_FEATURES:
            raise bad("mm_vision_select_feature", f"{self.mm_vision_select_feature!r}; expected one of {SELECT_FEATURES}")
        if self.tokenizer_padding_side not in ("left", "right"):
            raise bad("tokenizer_padding_side", f"{self.tokenizer_padding_side!r}; expected 'left' or 'right'")
        towers, lens = self.mm_vision_tower_aux_list, self.mm_vision_tower_aux_token_len_list
        if not isinstance(towers, list) or not all(isinstance(t, str) for t in towers):
            raise bad("mm_vision_tower_aux_list", "must be a list of tower names")
        if len(towers) != len(lens):
            raise bad("mm_vision_tower_aux_token_len_list",
                      f"has {len(lens)} entries but mm_vision_tower_aux_list names {len(towers)} towers")
        for n in lens:
            if not isinstance(n, int) or n <= 0 or math.isqrt(n) ** 2 != n:
                raise bad("mm_vision_tower_aux_token_len_list", f"{n!r} is not a square number of tokens")
        if math.isqrt(self.image_token_len) ** 2 != self.image_token_len:
            raise bad("image_token_len", f"{self.image_token_len} is not a square number of tokens")
        if self.mm_projector_type != "sva":
            return
        if not towers:
            raise bad("mm_vision_tower_aux_list", "the sva projector needs at least one vision tower")
        if self.num_query_group < 1 or len(self.query_num_list) != self.num_query_group:
            raise bad("query_num_list", f"has {len(self.query_num_list)} entries but num_query_group is {self.num_query_group}")
        if self.connector_depth < 1:
            raise bad("connector_depth", "must be >= 1")
        if self.vision_hidden_size % SVA_NUM_HEADS:
            raise bad("vision_hidden_size", f"{self.vision_hidden_size} is not divisible by the {SVA_NUM_HEADS} attention heads")
        for q in self.query_num_list:
            side = math.isqrt(q)
            if side * side != q:
                raise bad("query_num_list", f"{q} is not a square number of queries")
            for t, n in zip(towers, self.tower_grid_sides):
                if n % side:
                    raise bad("query_num_list", f"query grid side {side} does not divide the grid side {n} of tower {t!r}")
        if not self.connector_only:
            final = self.final_grid_side
            for t, n in zip(towers, self.tower_grid_sides):
                if n % final:
                    raise bad("image_token_len", f"final grid side {final} does not divide the grid side {n} of tower {t!r} "
                                                 "(needed by the in-LLM vision sampler layers)")
            if self.num_of_vision_sampler_layers < 0 or self.stride_of_vision_sampler_layers < 1:
                raise bad("stride_of_vision_sampler_layers", "must be >= 1 (with num_of_vision_sampler_layers >= 0)")
            last = self.start_of_vision_sampler_layers + (self.num_of_vision_sampler_layers - 1) * self.stride_of_vision_sampler_layers
            if self.num_of_vision_sampler_layers and (self.start_of_vision_sampler_layers < 0 or last >= self.num_hidden_layers):
                raise bad("num_of_vision_sampler_layers",
                          f"sampler layers would run after decoder layer {last} but the LLM has {self.num_hidden_layers} layers")

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def mm_keys(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in ("llm_config", "model_type", "extra", "source_llm_keys")]

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "CambrianConfig":
        """Split a config.json dict into the multimodal fields and the LLM's transformers config."""
        from transformers import AutoConfig

        config = copy.deepcopy(dict(config))
        model_type = config.get("model_type")
        if not model_type:
            raise ConfigError("config key 'model_type': missing; expected e.g. 'cambrian_llama' or 'llama'")
        base = base_model_type(model_type)

        mm_names = cls.mm_keys()
        mm = {k: config.pop(k) for k in mm_names if k in config}
        extra = {k: config.pop(k) for k in sorted(PASSTHROUGH_KEYS) if k in config}
        # The original also writes the token lengths under this older name; both must agree.
        alias = "vision_tower_aux_token_len_list"
        if alias in config:
            value = config.pop(alias)
            extra[alias] = value
            if "mm_vision_tower_aux_token_len_list" in mm and list(value) != list(mm["mm_vision_tower_aux_token_len_list"]):
                raise ConfigError(f"config key '{alias}': {value} contradicts mm_vision_tower_aux_token_len_list "
                                  f"{mm['mm_vision_tower_aux_token_len_list']}")
            mm.setdefault("mm_vision_tower_aux_token_len_list", list(value))

        llm_defaults = _llm_config_class(base)().to_dict()
        known = set(mm_names) | PASSTHROUGH_KEYS | {alias}
        for key in config:
            if key in llm_defaults:
                continue
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.85)
            if close:
                raise ConfigError(f"config key '{key}' is unknown; did you mean '{close[0]}'?")
            if key.startswith("mm_"):
                raise ConfigError(f"config key '{key}' is not a known multimodal key "
                                  f"(known: {', '.join(k for k in mm_names if k.startswith('mm_'))})")

        source = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
        config["model_type"] = base
        config.pop("architectures", None)
        llm_config = AutoConfig.for_model(**config)
        try:
            return cls(llm_config=llm_config, model_type=model_type, extra=extra, source_llm_keys=source, **mm)
        except TypeError as exc:  # a value of the wrong type (e.g. a string where a list belongs)
            raise ConfigError(f"invalid multimodal config value: {exc}") from exc

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "CambrianConfig":
        """Read `<path>/config.json` (or the file itself)."""
        file = os.path.join(path, "config.json") if os.path.isdir(path) else str(path)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json at {path}")
        with open(file, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{file} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """The flat config.json dict: LLM keys, multimodal keys and kept extras."""
        out = self.llm_config.to_diff_dict() if hasattr(self.llm_config, "to_diff_dict") else self.llm_config.to_dict()
        out.pop("transformers_version", None)
        for k, v in self.source_llm_keys.items():
            out.setdefault(k, copy.deepcopy(v))
        base = self.llm_config.model_type
        model_type = self.model_type or f"cambrian_{base}"
        out["model_type"] = model_type
        out["architectures"] = [_architecture_name(model_type, type(self.llm_config).__name__)]
        for k in self.mm_keys():
            if k == "image_after_question" and not self.image_after_question:
                continue  # released configs do not have it: a round trip must not add it
            out[k] = copy.deepcopy(getattr(self, k))
        out.update(copy.deepcopy(self.extra))
        return out

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    def replace(self, **changes: Any) -> "CambrianConfig":
        """A validated copy with some multimodal fields changed."""
        new = copy.deepcopy(self)
        for k, v in changes.items():
            if k not in self.mm_keys() and k not in ("model_type", "extra", "llm_config", "source_llm_keys"):
                raise ConfigError(f"config key '{k}' is not a multimodal key")
            setattr(new, k, v)
        new.validate()
        return new


def base_model_type(model_type: str) -> str:
    """`cambrian_llama` / `llava_llama` -> `llama`; checks transformers knows the result."""
    from transformers import CONFIG_MAPPING

    base = model_type
    for prefix in _WRAPPER_PREFIXES:
        if base.startswith(prefix):
            base = base[len(prefix):]
            break
    base = _BASE_ALIASES.get(base, base)
    if base not in CONFIG_MAPPING:
        raise ConfigError(f"config key 'model_type': {model_type!r} does not name a transformers causal LM "
                          f"(base type {base!r} is unknown to transformers)")
    return base


def _llm_config_class(base: str):
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[base]


def _architecture_name(model_type: str, llm_config_class: str) -> str:
    stem = llm_config_class[:-len("Config")] if llm_config_class.endswith("Config") else llm_config_class
    prefix = "Llava" if model_type.startswith("llava_") else "Cambrian"
    return f"{prefix}{stem}ForCausalLM"
