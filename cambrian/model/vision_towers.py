"""Vision towers of Cambrian-1 on top of transformers' vision models.

| kind     | transformers model            | features handed to the connector                         |
| -------- | ----------------------------- | -------------------------------------------------------- |
| siglip   | SiglipVisionModel (no head)   | last_hidden_state (after post_layernorm), (B, n*n, C)     |
| clip     | CLIPVisionModel               | hidden_states[select_layer], CLS dropped for "patch"     |
| dinov2   | Dinov2Model / ...WithRegisters| last_hidden_state (after the final norm), CLS+registers dropped |
| convnext | ConvNextModel                 | the 4 stage outputs, conv layout (B, C_k, h_k, w_k)      |

A tower is loaded from a transformers folder (config.json + safetensors, e.g. a `save_pretrained`
output or a hub snapshot of `openai/clip-vit-large-patch14-336`) or from a timm / open_clip checkpoint
file for the two towers the original code took from open_clip (SigLIP SO400M/14-384 and CLIP
ConvNeXt-XXL).  Those files are converted key by key into the transformers model; every key must be
used (or be a known head / text-tower key) and every model tensor must be filled, else an error
lists them.

Towers are frozen by default: no gradients and eval mode even when a parent calls `.train()`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..utils import quiet_transformers
from .image_processing import ImageProcessor, mean_to_color

__all__ = [
    "VisionTower", "build_vision_tower", "load_vision_tower", "resolve_tower_paths", "to_token_grid",
    "tower_dir_name", "infer_tower_kind", "tower_preset", "default_pad_color", "convert_timm_siglip",
    "convert_timm_convnext",
    "MissingVisionTowerError", "VisionTowerCheckpointError", "TowerPreset", "RELEASED_TOWERS",
    "OPENAI_MEAN", "OPENAI_STD", "IMAGENET_MEAN", "IMAGENET_STD", "SIGLIP_MEAN", "SIGLIP_STD", "TOWER_KINDS",
]

logger = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

TOWER_KINDS = ("siglip", "clip", "dinov2", "convnext")
SELECT_FEATURES = ("patch", "cls_patch")
TOWER_DIR_ENV = "CAMBRIAN_TOWER_DIR"

# Normaliser of each kind when nothing more specific is known.
_KIND_NORMALISER = {
    "siglip": (SIGLIP_MEAN, SIGLIP_STD),
    "clip": (OPENAI_MEAN, OPENAI_STD),
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD),
    "convnext": (OPENAI_MEAN, OPENAI_STD),
}

# transformers model_type -> (tower kind, model class name)
_MODEL_TYPES = {
    "siglip": ("siglip", "SiglipVisionModel"),
    "siglip_vision_model": ("siglip", "SiglipVisionModel"),
    "clip": ("clip", "CLIPVisionModel"),
    "clip_vision_model": ("clip", "CLIPVisionModel"),
    "dinov2": ("dinov2", "Dinov2Model"),
    "dinov2_with_registers": ("dinov2", "Dinov2WithRegistersModel"),
    "convnext": ("convnext", "ConvNextModel"),
}

# Config attribute (written by this module) holding the eps of every LayerNorm in a ConvNeXt trunk.
# transformers hard-codes 1e-6 there, open_clip's ConvNeXt-XXL uses 1e-5.
_CONVNEXT_TRUNK_EPS = "trunk_layer_norm_eps"

# Heads of the timm SigLIP trunks (not recoverable from the weights).
_SIGLIP_HEADS = {768: 12, 1024: 16, 1152: 16, 1536: 16}


class MissingVisionTowerError(FileNotFoundError):
    """One or more vision towers were not found.  `.missing` maps each name to the places searched."""

    def __init__(self, missing: Mapping[str, Sequence[str]]):
        self.missing = {k: list(v) for k, v in missing.items()}
        lines = [f"{len(self.missing)} vision tower(s) not found:"]
        for name, places in self.missing.items():
            lines.append(f"  - {name}: searched " + (", ".join(places) if places else "nowhere (no tower_paths "
                                                         f"entry, no checkpoint_dir, ${TOWER_DIR_ENV} unset)"))
        lines.append(f"Pass tower_paths={{name: path}}, put each tower under <checkpoint>/vision_towers/<name with "
                     f"'/' replaced by '--'>, or under ${TOWER_DIR_ENV}/<same>.")
        super().__init__("\n".join(lines))


class VisionTowerCheckpointError(ValueError):
    """A tower checkpoint cannot be read or does not match the model (missing / left-over tensors)."""


@dataclass(frozen=True)
class TowerPreset:
    """Pre-processing of a released tower name (design table)."""

    kind: str
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]


RELEASED_TOWERS: dict[str, TowerPreset] = {
    "siglip/CLIP-ViT-SO400M-14-384": TowerPreset("siglip", 384, SIGLIP_MEAN, SIGLIP_STD),
    "openai/clip-vit-large-patch14-336": TowerPreset("clip", 336, OPENAI_MEAN, OPENAI_STD),
    "facebook/dinov2-giant-res378": TowerPreset("dinov2", 378, IMAGENET_MEAN, IMAGENET_STD),
    "clip-convnext-XXL-multi-stage": TowerPreset("convnext", 1024, OPENAI_MEAN, OPENAI_STD),
}


def tower_dir_name(name: str) -> str:
    """Folder name of a tower under `vision_towers/`: the config name with '/' replaced by '--'."""
    return name.replace("/", "--")


def infer_tower_kind(name: str) -> str | None:
    """Tower kind from a config name (`siglip/...` -> "siglip", `...convnext...` -> "convnext", ...), or None."""
    if name in RELEASED_TOWERS:
        return RELEASED_TOWERS[name].kind
    low = name.lower()
    if "siglip" in low:  # before "clip": SigLIP names contain "CLIP"
        return "siglip"
    if "convnext" in low:
        return "convnext"
    if "dino" in low:
        return "dinov2"
    if "clip" in low:
        return "clip"
    return None


def _name_resolution(name: str) -> int | None:
    """The `-res<N>` suffix the original code parses from a tower name (`facebook/dinov2-giant-res378`)."""
    m = re.search(r"(?:^|[-_/])res(\d+)(?=$|[-_])", name)
    return int(m.group(1)) if m else None


def tower_preset(name: str, kind: str | None = None) -> TowerPreset | None:
    """Design-table pre-processing for `name`: the released entry, else the kind's normaliser
    (resolution from a `-res<N>` suffix, or 0 when unknown).  None if the kind is unknown."""
    if name in RELEASED_TOWERS:
        return RELEASED_TOWERS[name]
    kind = kind or infer_tower_kind(name)
    if kind is None:
        return None
    mean, std = _KIND_NORMALISER[kind]
    return TowerPreset(kind, _name_resolution(name) or 0, mean, std)


def default_pad_color(kind: str, image_mean: Sequence[float]) -> tuple[int, int, int]:
    """Pad colour of a tower: int(mean*255) of its normaliser, except SigLIP, which the original pipeline
    pads with the OpenAI mean colour (122, 116, 104) although it normalises with 0.5."""
    return mean_to_color(OPENAI_MEAN if kind == "siglip" else image_mean)


# ----------------------------------------------------------------------------------------------- tower
class VisionTower(nn.Module):
    """One frozen (by default) vision encoder plus its pre-processing.

    Attributes: `name`, `kind` ("siglip" | "clip" | "dinov2" | "convnext"), `model` (the transformers
    model), `image_size` R, `image_mean`, `image_std`, `pad_color`, `hidden_size` (channels handed to the
    connector; ConvNeXt: sum of the stage channels), `grid_side` (native token-grid side; ConvNeXt: the
    first stage's side), `select_layer`, `select_feature`, `trainable`.
    """

    def __init__(self, model: nn.Module, kind: str, *, name: str = "", image_size: int | None = None,
                 image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None,
                 pad_color: Sequence[int] | None = None, select_layer: int = -2, select_feature: str = "patch",
                 unfreeze: bool = False):
        super().__init__()
        if kind not in TOWER_KINDS:
            raise ValueError(f"unknown tower kind {kind!r}; expected one of {TOWER_KINDS}")
        if select_feature not in SELECT_FEATURES:
            raise ValueError(f"select_feature must be one of {SELECT_FEATURES}, got {select_feature!r}")
        config = model.config
        self.model = model
        self.name = name
        self.kind = kind
        self.select_layer = int(select_layer)
        self.select_feature = select_feature
        self.trainable = bool(unfreeze)
        default_mean, default_std = _KIND_NORMALISER[kind]
        self.image_mean = tuple(float(m) for m in (image_mean if image_mean is not None else default_mean))
        self.image_std = tuple(float(s) for s in (image_std if image_std is not None else default_std))
        self.pad_color = tuple(int(c) for c in (pad_color if pad_color is not None
                                                else default_pad_color(kind, self.image_mean)))
        self.image_size = int(image_size or getattr(config, "image_size", 0) or 0)
        if self.image_size <= 0:
            raise ValueError(f"tower {name!r}: image_size is unknown; pass image_size=")
        self.patch_size = int(config.patch_size)
        self.grid_side = self.image_size // self.patch_size

        if kind == "convnext":
            self.stage_channels = tuple(int(c) for c in config.hidden_sizes)
            self.hidden_size = sum(self.stage_channels)
            self.num_prefix_tokens = 0
        else:
            self.stage_channels = ()
            self.hidden_size = int(config.hidden_size)
            self.num_prefix_tokens = {"siglip": 0, "clip": 1}.get(
                kind, 1 + int(getattr(config, "num_register_tokens", 0) or 0))
        if kind in ("siglip", "clip"):
            # their position embeddings are a fixed table: the grid must match the config's
            native = int(config.image_size) // self.patch_size
            if native != self.grid_side:
                raise ValueError(f"tower {name!r}: image_size {self.image_size} gives a {self.grid_side}x"
                                 f"{self.grid_side} grid but the model's position table is {native}x{native} "
                                 f"(config image_size {config.image_size})")
        if kind == "clip":
            n = int(config.num_hidden_layers)
            if not -(n + 1) <= self.select_layer <= n:
                raise ValueError(f"select_layer {select_layer} out of range for {n} layers")
        if kind == "convnext" and getattr(config, _CONVNEXT_TRUNK_EPS, None) is not None:
            _set_convnext_trunk_eps(model, float(getattr(config, _CONVNEXT_TRUNK_EPS)))

        for p in self.model.parameters():
            p.requires_grad_(self.trainable)
        self.train(False)

    # -------------------------------------------------------------------------------- properties
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def processor(self) -> ImageProcessor:
        """The `ImageProcessor` (resolution, normaliser, pad colour) for this tower."""
        return ImageProcessor(self.image_size, self.image_mean, self.image_std, self.pad_color)  # type: ignore[arg-type]

    image_processor = processor

    @property
    def num_tokens(self) -> int:
        """Tokens per image at the native grid (first stage for ConvNeXt)."""
        return self.grid_side * self.grid_side

    def train(self, mode: bool = True) -> "VisionTower":
        # A frozen tower stays in eval mode even when the parent model is put in training mode.
        return super().train(mode and self.trainable)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, kind={self.kind}, image_size={self.image_size}, grid_side={self.grid_side}, "
                f"hidden_size={self.hidden_size}, trainable={self.trainable}")

    # -------------------------------------------------------------------------------- forward
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """pixel_values (B, 3, R, R) -> ViT: (B, L, C) token-major on the native grid (L = n*n, or 1 + n*n
        for select_feature "cls_patch" on CLIP / DINOv2); ConvNeXt: list of 4 (B, C_k, h_k, w_k)."""
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"tower {self.name!r} expects (B, 3, {self.image_size}, {self.image_size}) pixels, "
                             f"got {tuple(pixel_values.shape)}")
        param = next(self.model.parameters())
        x = pixel_values.to(device=param.device, dtype=param.dtype)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            if self.kind == "convnext":
                return self._convnext_stages(x)
            if self.kind == "siglip":
                return self.model(pixel_values=x).last_hidden_state  # (B, n*n, C), post_layernorm applied
            if self.kind == "clip":
                hidden = self.model(pixel_values=x, output_hidden_states=True).hidden_states
                feats = hidden[self.select_layer]  # (B, 1 + n*n, C), no post_layernorm (LLaVA convention)
            else:  # dinov2: final layernorm applied
                feats = self.model(pixel_values=x).last_hidden_state  # (B, 1 + R + n*n, C)
            patches = feats[:, self.num_prefix_tokens:]
            if self.select_feature == "cls_patch":
                return torch.cat([feats[:, :1], patches], dim=1)
            return patches

    def _convnext_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        # Walk the stages directly: the stage outputs are the features (no final / pooled norm).
        x = self.model.embeddings(x)  # (B, C_0, R/4, R/4)
        stages = []
        for stage in self.model.encoder.stages:
            x = stage(x)
            stages.append(x)  # (B, C_k, h_k, w_k)
        return stages

    # -------------------------------------------------------------------------------- saving
    def save_pretrained(self, folder: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write a transformers folder (config.json + model.safetensors) plus a preprocessor_config.json
        with image_size, image_mean, image_std and pad_color; `load_vision_tower` reads it back exactly.
        state_dict: the backbone's weights to write (e.g. gathered by a training engine); default: its own."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        with quiet_transformers():
            self.model.save_pretrained(folder, state_dict=state_dict)
        pre = {
            "tower_kind": self.kind,
            "image_size": self.image_size,
            "crop_size": {"height": self.image_size, "width": self.image_size},
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "pad_color": list(self.pad_color),
        }
        with open(os.path.join(folder, "preprocessor_config.json"), "w", encoding="utf-8") as f:
            json.dump(pre, f, indent=2)
            f.write("\n")


def _set_convnext_trunk_eps(model: nn.Module, eps: float) -> None:
    """Set eps of every LayerNorm in the stem and stages (not the pooled-output norm, unused here)."""
    for part in (model.embeddings, model.encoder):
        for m in part.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = eps


def _skip_init() -> contextlib.AbstractContextManager:
    """transformers' no_init_weights (skips random init of tensors that are loaded right after)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older / newer layout: just initialise
        return contextlib.nullcontext()
    return no_init_weights()


def _model_class(model_type: str) -> tuple[str, type]:
    import transformers

    if model_type not in _MODEL_TYPES:
        raise ValueError(f"unsupported vision model_type {model_type!r}; supported: {sorted(_MODEL_TYPES)}")
    kind, cls_name = _MODEL_TYPES[model_type]
    return kind, getattr(transformers, cls_name)


def _vision_config(kind: str, hf_config: Any) -> Any:
    """A transformers vision config for `kind` from a config object or a dict of its keyword arguments."""
    import transformers

    if isinstance(hf_config, Mapping):
        cfg = dict(hf_config)
        cls_name = {"siglip": "SiglipVisionConfig", "clip": "CLIPVisionConfig", "convnext": "ConvNextConfig",
                    "dinov2": "Dinov2WithRegistersConfig" if cfg.get("num_register_tokens") else "Dinov2Config"}[kind]
        cfg.pop("model_type", None)
        hf_config = getattr(transformers, cls_name)(**cfg)
    if getattr(hf_config, "vision_config", None) is not None:  # a full CLIPConfig / SiglipConfig
        hf_config = hf_config.vision_config
    return hf_config


def build_vision_tower(kind: str, hf_config: Any, name: str = "", image_size: int | None = None,
                       select_layer: int = -2, select_feature: str = "patch", *,
                       image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None,
                       pad_color: Sequence[int] | None = None, unfreeze: bool = False) -> VisionTower:
    """A randomly initialised tower of `kind` from a transformers vision config (object or kwargs dict).

    Pre-processing defaults: mean/std of the released entry for `name`, else the kind's normaliser;
    image_size from the argument, else the config's `image_size`.  SigLIP is built without its pooling head.
    """
    hf_config = _vision_config(kind, hf_config)
    cfg_kind, cls = _model_class(hf_config.model_type)
    if cfg_kind != kind:
        raise ValueError(f"kind {kind!r} does not match the config's model_type {hf_config.model_type!r}")
    if kind == "siglip":
        hf_config.vision_use_head = False  # the pooling head is not part of the features
    preset = tower_preset(name, kind) if name else None
    model = cls(hf_config).eval()
    return VisionTower(
        model, kind, name=name,
        image_size=image_size or getattr(hf_config, "image_size", None),
        image_mean=image_mean if image_mean is not None else (preset.image_mean if preset else None),
        image_std=image_std if image_std is not None else (preset.image_std if preset else None),
        pad_color=pad_color, select_layer=select_layer, select_feature=select_feature, unfreeze=unfreeze)


# ----------------------------------------------------------------------------------------------- loading
def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise VisionTowerCheckpointError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else None


def _size_of(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        for key in ("height", "shortest_edge"):
            if isinstance(value.get(key), int):
                return value[key]
    if isinstance(value, (list, tuple)) and value and isinstance(value[-1], int):
        return value[-1]  # timm input_size [3, H, W]
    return None


def _folder_preprocessing(folder: str) -> dict[str, Any]:
    """image_size / image_mean / image_std / pad_color found next to the weights (our
    preprocessor_config.json or a transformers one, an open_clip_config.json, a timm config.json)."""
    info: dict[str, Any] = {}
    pre = _read_json(os.path.join(folder, "preprocessor_config.json"))
    if pre is not None:
        size = pre.get("image_size")  # written by VisionTower.save_pretrained: exact, beats the name
        if size is not None:
            info["saved_image_size"] = size
        else:
            size = _size_of(pre.get("crop_size")) if pre.get("do_center_crop", True) else None
        if size is None:
            size = _size_of(pre.get("size"))
        info.update({"image_size": size, "image_mean": pre.get("image_mean"), "image_std": pre.get("image_std"),
                     "pad_color": pre.get("pad_color")})
    else:
        oc = _read_json(os.path.join(folder, "open_clip_config.json"))
        if oc is not None:
            pcfg = oc.get("preprocess_cfg", {}) or {}
            vcfg = (oc.get("model_cfg", {}) or {}).get("vision_cfg", {}) or {}
            info = {"image_size": _size_of(vcfg.get("image_size")), "image_mean": pcfg.get("mean"),
                    "image_std": pcfg.get("std")}
        else:
            timm_cfg = _read_json(os.path.join(folder, "config.json")) or {}
            pcfg = timm_cfg.get("pretrained_cfg") or {}
            if pcfg:
                info = {"image_size": _size_of(pcfg.get("input_size")), "image_mean": pcfg.get("mean"),
                        "image_std": pcfg.get("std")}
    return {k: v for k, v in info.items() if v is not None}


_WEIGHT_FILES = ("open_clip_model.safetensors", "model.safetensors", "open_clip_pytorch_model.bin",
                 "pytorch_model.bin")


def _is_transformers_folder(folder: str) -> bool:
    cfg = _read_json(os.path.join(folder, "config.json"))
    return cfg is not None and "model_type" in cfg


def load_vision_tower(name: str, path: str | os.PathLike, select_layer: int = -2, select_feature: str = "patch",
                      *, unfreeze: bool = False, dtype: torch.dtype | None = None, image_size: int | None = None,
                      num_attention_heads: int | None = None, layer_norm_eps: float | None = None) -> VisionTower:
    """Load tower `name` (a config name such as `siglip/CLIP-ViT-SO400M-14-384`) from `path`.

    path: a transformers folder (config.json with a model_type + safetensors), a timm / open_clip
        checkpoint file (.safetensors, or .bin / .pt / .pth read with torch.load(weights_only=True)),
        or a hub snapshot folder holding such a file (open_clip_model.safetensors, model.safetensors, ...).
        Checkpoint files: a timm ViT (SigLIP, e.g. `vit_so400m_patch14_siglip_384`) or a timm ConvNeXt
        (open_clip `convnext_xxlarge`), optionally under open_clip's `visual.trunk.` prefix.
    dtype: parameter dtype; None keeps the stored dtype.
    image_size: overrides the resolution; otherwise a preprocessor_config.json written by
        `VisionTower.save_pretrained`, the name's `-res<N>` suffix (the original code parses it; the hub
        DINOv2 folders say 224), another preprocessing file (transformers / open_clip / timm), the
        released-name table, then the model config (in that order).
    num_attention_heads / layer_norm_eps: architecture of a timm ViT file (not stored in the weights;
        defaults: the known SigLIP trunks' head counts, eps 1e-6 for SigLIP and 1e-5 for ConvNeXt).
    Mean/std come from the folder's preprocessing file, else the released-name table, else the kind's
    normaliser; the pad colour from the preprocessing file, else the design rule (`default_pad_color`).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingVisionTowerError({name: [path]})
    name_kind = infer_tower_kind(name)
    info: dict[str, Any] = {}
    if os.path.isdir(path):
        info = _folder_preprocessing(path)
        image_size = image_size or info.get("saved_image_size")
        if _is_transformers_folder(path):
            kind, model = _load_transformers_folder(name, path, name_kind, dtype)
        else:
            files = [os.path.join(path, f) for f in _WEIGHT_FILES if os.path.isfile(os.path.join(path, f))]
            if not files:
                raise VisionTowerCheckpointError(
                    f"{path}: neither a transformers folder (config.json with model_type) nor a folder with "
                    f"one of {list(_WEIGHT_FILES)}")
            kind, model = _load_timm_file(name, files[0], name_kind, dtype, image_size or _name_resolution(name)
                                          or info.get("image_size"), num_attention_heads, layer_norm_eps)
    else:
        kind, model = _load_timm_file(name, path, name_kind, dtype, image_size or _name_resolution(name),
                                      num_attention_heads, layer_norm_eps)

    preset = tower_preset(name, kind)
    size = (image_size or _name_resolution(name) or info.get("image_size")
            or (preset.image_size if preset else None) or getattr(model.config, "image_size", None))
    mean = info.get("image_mean") or (preset.image_mean if preset else None)
    std = info.get("image_std") or (preset.image_std if preset else None)
    return VisionTower(model, kind, name=name, image_size=size, image_mean=mean, image_std=std,
                       pad_color=info.get("pad_color"), select_layer=select_layer, select_feature=select_feature,
                       unfreeze=unfreeze)


def _check_kind(name: str, name_kind: str | None, kind: str, source: str) -> None:
    if name_kind is not None and name_kind != kind:
        raise VisionTowerCheckpointError(f"tower {name!r} looks like a {name_kind} tower but {source} holds a "
                                         f"{kind} model")


def _load_transformers_folder(name: str, path: str, name_kind: str | None,
                              dtype: torch.dtype | None) -> tuple[str, nn.Module]:
    from transformers import AutoConfig

    with quiet_transformers():
        config = AutoConfig.from_pretrained(path)
    kind, cls = _model_class(config.model_type)
    _check_kind(name, name_kind, kind, path)
    kwargs: dict[str, Any] = {"vision_use_head": False} if kind == "siglip" else {}
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(path, dtype=dtype or "auto", output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise VisionTowerCheckpointError(f"cannot load the {kind} tower {name!r} from {path}: {exc}") from exc
    allowed = {"layernorm.weight", "layernorm.bias"} if kind == "convnext" else set()  # pooled-output norm
    missing = sorted(set(info.get("missing_keys", [])) - allowed)
    mismatched = list(info.get("mismatched_keys", []))
    if missing or mismatched:
        raise VisionTowerCheckpointError(f"{path}: tower {name!r} checkpoint does not match its config: "
                                         f"missing {missing}, wrong shape {mismatched}")
    return kind, model.eval()


# ----------------------------------------------------------------------------------------------- timm / open_clip
def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj: Any = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors / pickle raise many types; all mean "unreadable"
        raise VisionTowerCheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    # training checkpoints wrap the weights: {"state_dict": {...}} / {"model": {...}}
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in ("state_dict", "model", "module") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise VisionTowerCheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):  # DDP-saved
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _split_trunk(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The timm trunk (open_clip keeps it under `visual.trunk.`) and the keys outside it (text tower,
    projection, logit scale), which the vision features do not use."""
    for prefix in ("visual.trunk.", "trunk."):
        if any(k.startswith(prefix) for k in state):
            trunk = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            return trunk, sorted(k for k in state if not k.startswith(prefix))
    return dict(state), []


class _KeyMapper:
    """Collects source -> target renames, remembering which source keys were used or absent."""

    def __init__(self, src: Mapping[str, torch.Tensor]):
        self.src = src
        self.out: dict[str, torch.Tensor] = {}
        self.used: set[str] = set()
        self.absent: list[str] = []

    def take(self, src_key: str, dst_key: str) -> None:
        if src_key not in self.src:
            self.absent.append(src_key)
            return
        self.used.add(src_key)
        self.out[dst_key] = self.src[src_key]

    def check(self, origin: str, ignorable: Sequence[str] = ()) -> None:
        left = sorted(k for k in self.src if k not in self.used and not k.startswith(tuple(ignorable)))
        if self.absent or left:
            raise VisionTowerCheckpointError(
                f"{origin}: checkpoint does not match the expected layout: "
                f"missing {sorted(self.absent)}; left over (not converted) {left}")


def _layer_count(state: Mapping[str, Any], pattern: str) -> int:
    idx = [int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m]
    return max(idx) + 1 if idx else 0


def convert_timm_siglip(state: Mapping[str, torch.Tensor], *, image_size: int | None = None,
                        num_attention_heads: int | None = None, layer_norm_eps: float = 1e-6,
                        origin: str = "checkpoint") -> tuple[Any, dict[str, torch.Tensor]]:
    """timm SigLIP ViT trunk state dict (no prefix) -> (SiglipVisionConfig, SiglipVisionModel state dict).

    Sizes come from the tensors: hidden/patch from patch_embed.proj, grid from pos_embed (1, n*n, D),
    depth from blocks.N, MLP width from fc1.  The fused qkv is split in q, k, v order.  The attention
    pooling head (attn_pool.*) and any classifier (head.*) are not features and are skipped.
    """
    from transformers import SiglipVisionConfig

    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise VisionTowerCheckpointError(f"{origin}: not a timm ViT trunk (no {key!r})")
    proj = state["patch_embed.proj.weight"]  # (D, 3, p, p)
    hidden, channels, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[-1])
    num_pos = int(state["pos_embed"].shape[-2])
    grid = math.isqrt(num_pos)
    if grid * grid != num_pos:
        raise VisionTowerCheckpointError(f"{origin}: pos_embed has {num_pos} positions, not a square grid "
                                         f"(a class token? only class-token-free SigLIP trunks are supported)")
    heads = num_attention_heads or _SIGLIP_HEADS.get(hidden)
    if heads is None:
        raise VisionTowerCheckpointError(f"{origin}: the head count of a {hidden}-wide ViT is not known; "
                                         f"pass num_attention_heads=")
    image_size = image_size or grid * patch
    if image_size // patch != grid:
        raise VisionTowerCheckpointError(f"{origin}: image_size {image_size} with patch {patch} gives a "
                                         f"{image_size // patch}-grid but pos_embed is {grid}x{grid}")
    layers = _layer_count(state, r"blocks\.(\d+)\.")
    config = SiglipVisionConfig(
        hidden_size=hidden, intermediate_size=int(state["blocks.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=layers, num_attention_heads=heads, num_channels=channels, image_size=image_size,
        patch_size=patch, hidden_act="gelu_pytorch_tanh", layer_norm_eps=layer_norm_eps, vision_use_head=False)

    m = _KeyMapper(state)
    m.take("patch_embed.proj.weight", "embeddings.patch_embedding.weight")
    m.take("patch_embed.proj.bias", "embeddings.patch_embedding.bias")
    if "pos_embed" in state:
        m.used.add("pos_embed")
        m.out["embeddings.position_embedding.weight"] = state["pos_embed"].reshape(num_pos, hidden)
    for i in range(layers):
        s, d = f"blocks.{i}.", f"encoder.layers.{i}."
        for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.out_proj"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            m.take(s + a + ".weight", d + b + ".weight")
            m.take(s + a + ".bias", d + b + ".bias")
        for suffix in ("weight", "bias"):  # fused (3D, ...) -> q, k, v
            key = f"{s}attn.qkv.{suffix}"
            if key not in state:
                m.absent.append(key)
                continue
            m.used.add(key)
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), state[key].chunk(3, dim=0)):
                m.out[f"{d}self_attn.{part}.{suffix}"] = chunk
    m.take("norm.weight", "post_layernorm.weight")
    m.take("norm.bias", "post_layernorm.bias")
    m.check(origin, ignorable=("attn_pool.", "head.", "fc_norm."))
    return config, m.out


def convert_timm_convnext(state: Mapping[str, torch.Tensor], *, image_size: int | None = None,
                          layer_norm_eps: float = 1e-5,
                          origin: str = "checkpoint") -> tuple[Any, dict[str, torch.Tensor]]:
    """timm ConvNeXt trunk state dict (no prefix) -> (ConvNextConfig, ConvNextModel state dict).

    Widths from each stage's conv_dw, depths from the block indices, patch size from the stem conv.
    `layer_norm_eps` goes to every trunk LayerNorm (config attribute `trunk_layer_norm_eps`); head.norm,
    if present, becomes the (unused) pooled-output norm, head.fc is skipped.
    """
    from transformers import ConvNextConfig

    if "stem.0.weight" not in state or "stages.0.blocks.0.conv_dw.weight" not in state:
        raise VisionTowerCheckpointError(f"{origin}: not a timm ConvNeXt trunk (no stem.0 / stages.0.blocks.0)")
    num_stages = _layer_count(state, r"stages\.(\d+)\.")
    dims = [int(state[f"stages.{i}.blocks.0.conv_dw.weight"].shape[0]) for i in range(num_stages)
            if f"stages.{i}.blocks.0.conv_dw.weight" in state]
    if len(dims) != num_stages:
        raise VisionTowerCheckpointError(f"{origin}: a stage without blocks")
    depths = [_layer_count(state, rf"stages\.{i}\.blocks\.(\d+)\.") for i in range(num_stages)]
    stem = state["stem.0.weight"]  # (C0, 3, p, p)
    patch, channels = int(stem.shape[-1]), int(stem.shape[1])
    for i, dim in enumerate(dims):  # what transformers' ConvNeXt can represent
        dw = state[f"stages.{i}.blocks.0.conv_dw.weight"]
        fc1 = state.get(f"stages.{i}.blocks.0.mlp.fc1.weight")
        if dw.shape[-1] != 7 or (fc1 is not None and fc1.shape[0] != 4 * dim):
            raise VisionTowerCheckpointError(f"{origin}: stage {i} has a {dw.shape[-1]}x{dw.shape[-1]} depthwise "
                                             f"conv / MLP ratio other than 7x7 / 4 (conv_mlp variants unsupported)")
    has_gamma = "stages.0.blocks.0.gamma" in state
    config = ConvNextConfig(num_channels=channels, patch_size=patch, num_stages=num_stages, hidden_sizes=dims,
                            depths=depths, hidden_act="gelu", layer_scale_init_value=1e-6 if has_gamma else 0.0,
                            drop_path_rate=0.0, image_size=image_size or 224, layer_norm_eps=layer_norm_eps)
    setattr(config, _CONVNEXT_TRUNK_EPS, layer_norm_eps)

    m = _KeyMapper(state)
    for suffix in ("weight", "bias"):
        m.take(f"stem.0.{suffix}", f"embeddings.patch_embeddings.{suffix}")
        m.take(f"stem.1.{suffix}", f"embeddings.layernorm.{suffix}")
        for i in range(num_stages):
            if i > 0:  # stage 0 keeps the stem's resolution: no downsample
                for j in (0, 1):
                    m.take(f"stages.{i}.downsample.{j}.{suffix}", f"encoder.stages.{i}.downsampling_layer.{j}.{suffix}")
            for b in range(depths[i]):
                s, d = f"stages.{i}.blocks.{b}.", f"encoder.stages.{i}.layers.{b}."
                for a, t in (("conv_dw", "dwconv"), ("norm", "layernorm"), ("mlp.fc1", "pwconv1"),
                             ("mlp.fc2", "pwconv2")):
                    m.take(f"{s}{a}.{suffix}", f"{d}{t}.{suffix}")
        if f"head.norm.{suffix}" in state:
            m.take(f"head.norm.{suffix}", f"layernorm.{suffix}")
    if has_gamma:
        for i in range(num_stages):
            for b in range(depths[i]):
                m.take(f"stages.{i}.blocks.{b}.gamma", f"encoder.stages.{i}.layers.{b}.layer_scale_parameter")
    m.check(origin, ignorable=("head.", "norm_pre."))
    return config, m.out


def _load_timm_file(name: str, path: str, name_kind: str | None, dtype: torch.dtype | None,
                    image_size: int | None, num_attention_heads: int | None,
                    layer_norm_eps: float | None) -> tuple[str, nn.Module]:
    from transformers import ConvNextModel, SiglipVisionModel

    state, outside = _split_trunk(_read_state_dict(path))
    if outside:
        logger.debug("%s: %d keys outside the vision trunk skipped (text tower / projection)", path, len(outside))
    preset = tower_preset(name, name_kind) if name_kind else None
    image_size = image_size or (preset.image_size if preset else None) or None
    if "patch_embed.proj.weight" in state:
        kind = "siglip"
        _check_kind(name, name_kind, kind, path)
        config, converted = convert_timm_siglip(state, image_size=image_size, num_attention_heads=num_attention_heads,
                                                layer_norm_eps=1e-6 if layer_norm_eps is None else layer_norm_eps,
                                                origin=path)
        cls: type = SiglipVisionModel
    elif "stem.0.weight" in state:
        kind = "convnext"
        _check_kind(name, name_kind, kind, path)
        if not image_size:
            raise VisionTowerCheckpointError(f"{path}: the input resolution of ConvNeXt tower {name!r} is unknown; "
                                             f"pass image_size= or use a name with a -res<N> suffix")
        config, converted = convert_timm_convnext(state, image_size=image_size,
                                                  layer_norm_eps=1e-5 if layer_norm_eps is None else layer_norm_eps,
                                                  origin=path)
        cls = ConvNextModel
    else:
        raise VisionTowerCheckpointError(
            f"{path}: unrecognised checkpoint layout for tower {name!r}; supported: a timm SigLIP ViT "
            f"(patch_embed / pos_embed / blocks.N) or a timm ConvNeXt (stem / stages.N), optionally under "
            f"open_clip's 'visual.trunk.' prefix. First keys: {sorted(state)[:8]}")

    if dtype is None:  # keep the stored precision, like transformers' dtype="auto"
        dtype = next((v.dtype for v in converted.values() if v.is_floating_point()), torch.float32)
    with quiet_transformers(), _skip_init():  # every tensor is overwritten below (14 s saved on ConvNeXt-XXL)
        model = cls(config)
    if kind == "convnext" and "layernorm.weight" not in converted:
        model.layernorm.reset_parameters()  # the pooled-output norm is not in the file; give it defined values
    model.to(dtype)
    expected = set(model.state_dict())
    optional = {"layernorm.weight", "layernorm.bias"} if kind == "convnext" else set()  # pooled-output norm
    missing = sorted(expected - set(converted) - optional)
    extra = sorted(set(converted) - expected)
    if missing or extra:
        raise VisionTowerCheckpointError(f"{path}: converted tower {name!r} does not fit the model: "
                                         f"missing {missing}; unexpected {extra}")
    try:
        model.load_state_dict(converted, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise VisionTowerCheckpointError(f"{path}: {exc}") from exc
    return kind, model.eval()


# ----------------------------------------------------------------------------------------------- paths
def resolve_tower_paths(names: Sequence[str], tower_paths: Mapping[str, str | os.PathLike] | None = None,
                        checkpoint_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Where each tower's weights are: `tower_paths[name]` if given (it must exist), else
    `<checkpoint_dir>/vision_towers/<tower_dir_name(name)>`, else `$CAMBRIAN_TOWER_DIR/<same>`.

    Raises one `MissingVisionTowerError` listing every missing tower and the places searched.
    """
    tower_paths = dict(tower_paths or {})
    env_dir = os.environ.get(TOWER_DIR_ENV) or None
    found: dict[str, str] = {}
    missing: dict[str, list[str]] = {}
    for name in names:
        if name in tower_paths:
            candidates = [os.fspath(tower_paths[name])]  # explicit: no silent fallback to another copy
        else:
            candidates = [os.path.join(os.fspath(root), *sub, tower_dir_name(name))
                          for root, sub in ((checkpoint_dir, ("vision_towers",)), (env_dir, ())) if root]
        hit = next((c for c in candidates if os.path.exists(c)), None)
        if hit is None:
            missing[name] = candidates
        else:
            found[name] = hit
    if missing:
        raise MissingVisionTowerError(missing)
    return found


# ----------------------------------------------------------------------------------------------- grids
def to_token_grid(features: torch.Tensor | Sequence[torch.Tensor], grid_side: int) -> torch.Tensor:
    """Tower output -> (B, grid_side**2, C) on the connector's grid.

    features: (B, n*n, C) token-major on a native n x n grid (returned unchanged when n == grid_side), or
        a ConvNeXt list of (B, C_k, h_k, w_k) stage maps (each resized, then concatenated on channels).
    Resizing is bilinear, align_corners=False, no antialias, computed in float32 and cast back
    (`cambrian.kernels.multi_tower_interpolate`).
    """
    from cambrian.kernels import multi_tower_interpolate

    dst = (int(grid_side), int(grid_side))
    if isinstance(features, torch.Tensor):
        if features.ndim != 3:
            raise ValueError(f"expected (B, L, C) token features, got shape {tuple(features.shape)}")
        n = math.isqrt(features.shape[1])
        if n * n != features.shape[1]:
            raise ValueError(f"{features.shape[1]} tokens do not form a square grid (CLS token kept? use "
                             f"select_feature='patch')")
        if n == grid_side:
            return features
        return multi_tower_interpolate([features], [(n, n)], dst)
    maps = list(features)
    if not maps or any(f.ndim != 4 for f in maps):
        raise ValueError("expected a list of (B, C, h, w) stage maps")
    tokens = [f.flatten(2).transpose(1, 2) for f in maps]  # (B, h*w, C) each
    return multi_tower_interpolate(tokens, [tuple(f.shape[-2:]) for f in maps], dst)
