"""Tiny, randomly initialised Cambrian models for tests and the demo.

Everything is built from configs with the project's own code (no hub downloads): four small vision
towers of the released kinds (SigLIP, CLIP, DINOv2, ConvNeXt multi-stage) whose native grids differ
from their token grids (so the interpolation runs), an SVA connector with in-LLM sampler layers, a
small LLM of any supported backend, and a tokenizer trained on a small corpus with `tokenizers`.
The shapes mirror cambrian-8b at toy scale: token grids 8×8 (three ViTs, native 9×9 / 8×8) and 16×16
(ConvNeXt), final grid 4×4, so windows are r = [2, 2, 2, 4].
"""
from __future__ import annotations

from typing import Any

import torch

from .config import CambrianConfig

LLM_TYPES = ("llama", "mistral", "phi3", "gemma", "cohere", "qwen2")

TOWER_NAMES = ["tiny/siglip-36", "tiny/clip-32", "tiny/dinov2-36", "tiny/convnext-64-multi-stage"]

# Words of the demo's questions and answers, so the tiny tokenizer has whole-word tokens for them.
CORPUS = [
    "What is shown in the image? Describe the picture.",
    "What color is the shape? red green blue yellow purple orange white black gray",
    "What shape is it? circle square triangle star cross",
    "How many shapes are there? zero one two three four five six seven eight nine",
    "Is the red circle left of the blue square? yes no left right above below top bottom",
    "Which shape is bigger? small large big tiny the a an of in on is are there",
    "Answer the question using a single word or phrase.",
    "A chat between a curious user and an artificial intelligence assistant.",
    "You are Cambrian, a highly intelligent multimodal AI trained by NYU Vision X.",
]


def tiny_llm_config(llm_type: str = "llama", vocab_size: int = 512, **overrides: Any):
    """A small transformers config of `llm_type` (hidden 64, 4 layers, GQA 4/2 heads)."""
    from transformers import AutoConfig

    if llm_type not in LLM_TYPES:
        raise ValueError(f"unknown tiny LLM type {llm_type!r}; choose from {LLM_TYPES}")
    kw: dict[str, Any] = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                              tie_word_embeddings=False)
    if llm_type == "gemma":
        kw["head_dim"] = 16
    if llm_type == "phi3":
        kw.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return AutoConfig.for_model(llm_type, **kw)


def tiny_config(llm_type: str = "llama", vocab_size: int = 512, projector: str = "sva",
                connector_only: bool = False, llm_overrides: dict | None = None, **mm: Any) -> CambrianConfig:
    """A `CambrianConfig` for the tiny towers below; multimodal keys can be overridden by keyword."""
    fields: dict[str, Any] = dict(
        mm_projector_type=projector,
        mm_vision_tower_aux_list=list(TOWER_NAMES),
        mm_vision_tower_aux_token_len_list=[64, 64, 64, 256],
        image_token_len=16,
        num_query_group=1,
        query_num_list=[16],
        connector_depth=2,
        vision_hidden_size=32,
        connector_only=connector_only,
        num_of_vision_sampler_layers=2,
        start_of_vision_sampler_layers=0,
        stride_of_vision_sampler_layers=2,
        image_position=None,
        mm_vision_select_layer=-2,
        tokenizer_model_max_length=256,
    )
    fields.update(mm)
    return CambrianConfig(llm_config=tiny_llm_config(llm_type, vocab_size, **(llm_overrides or {})),
                          model_type=f"cambrian_{llm_type}", **fields)


def tiny_vision_towers(names: list[str] | None = None) -> list:
    """Four random towers: SigLIP 36 px/p4 (9×9), CLIP 32 px/p4 (8×8 + CLS), DINOv2 36 px/p4 (9×9),
    ConvNeXt 64 px (stages 16², 8², 4², 2²; channels 8/16/32/64)."""
    from transformers import CLIPVisionConfig, ConvNextConfig, Dinov2Config, SiglipVisionConfig

    from .vision_towers import build_vision_tower

    names = names or TOWER_NAMES
    vit = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=4)
    return [
        build_vision_tower("siglip", SiglipVisionConfig(image_size=36, **vit), name=names[0]),
        build_vision_tower("clip", CLIPVisionConfig(image_size=32, projection_dim=32,
                                                    **{**vit, "num_hidden_layers": 3}), name=names[1],
                           select_layer=-2),
        build_vision_tower("dinov2", Dinov2Config(image_size=36, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, mlp_ratio=2, patch_size=4), name=names[2]),
        build_vision_tower("convnext", ConvNextConfig(image_size=64, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                                      patch_size=4), name=names[3]),
    ]


def tiny_tokenizer(template: str = "llama_3", vocab_size: int = 400):
    """A small BPE tokenizer trained on `CORPUS` with the template's special tokens."""
    from ..tokenizer_utils import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=vocab_size, template=template)


def build_tiny_model(llm_type: str = "llama", template: str = "llama_3", projector: str = "sva",
                     connector_only: bool = False, seed: int = 0, tokenizer: Any = None, **mm: Any):
    """A complete random tiny Cambrian model with tokenizer and template attached."""
    from .modeling import CambrianForCausalLM

    torch.manual_seed(seed)
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer(template)
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    config = tiny_config(llm_type, vocab_size=len(tokenizer), projector=projector, connector_only=connector_only,
                         llm_overrides=special, **mm)
    model = CambrianForCausalLM(config, tiny_vision_towers(config.mm_vision_tower_aux_list))
    model.tokenizer = tokenizer
    model.template_name = template
    return model.eval()
