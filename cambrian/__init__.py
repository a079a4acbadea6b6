"""cambrian: a vision-centric multimodal LLM stack (Cambrian-1 / LLaVA style), built for speed.

    from cambrian import load_pretrained_model, process_images
    tokenizer, model, image_processor, context_len = load_pretrained_model("path/to/checkpoint")
    answers = model.generate(images=[image], prompts=["What is shown?"], max_new_tokens=64)

Heavy imports (torch, transformers) happen on first use of an attribute, so `python -m cambrian.serve.cli
--help` stays fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_pretrained_model": "cambrian.model.builder",
    "save_pretrained": "cambrian.model.builder",
    "CambrianConfig": "cambrian.model.config",
    "CambrianForCausalLM": "cambrian.model.modeling",
    "build_connector": "cambrian.model.connector",
    "process_images": "cambrian.model.image_processing",
    "load_image": "cambrian.model.image_processing",
    "get_template": "cambrian.conversation",
    "tokenizer_image_token": "cambrian.mm_utils",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cambrian' has no attribute {name!r}")
