"""CambrianConfig reads released config.json files unchanged and names the key of every bad value."""
from __future__ import annotations

import json

import pytest

from cambrian.model.config import CambrianConfig, ConfigError

# The multimodal part of cambrian-8b's config.json plus its LLaMA-3-8B keys.
RELEASED_8B = {
    "architectures": ["CambrianLlamaForCausalLM"], "model_type": "cambrian_llama", "torch_dtype": "bfloat16",
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05, "bos_token_id": 128000, "eos_token_id": 128001, "tie_word_embeddings": False,
    "mm_projector_type": "sva",
    "mm_vision_tower_aux_list": ["siglip/CLIP-ViT-SO400M-14-384", "openai/clip-vit-large-patch14-336",
                                 "facebook/dinov2-giant-res378", "clip-convnext-XXL-multi-stage"],
    "mm_vision_tower_aux_token_len_list": [576, 576, 576, 9216],
    "vision_tower_aux_token_len_list": [576, 576, 576, 9216],
    "image_token_len": 576, "num_query_group": 1, "query_num_list": [576], "connector_depth": 3,
    "vision_hidden_size": 1024, "connector_only": False, "num_of_vision_sampler_layers": 10,
    "start_of_vision_sampler_layers": 0, "stride_of_vision_sampler_layers": 3, "image_position": 91,
    "mm_vision_select_layer": -1, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
    "mm_patch_merge_type": "flat", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
    "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "tune_mm_mlp_adapter": False,
    "freeze_mm_mlp_adapter": False, "unfreeze_mm_vision_tower": False, "use_mm_proj": True,
    "mm_projector_lr": None, "mm_vision_sampler_lr": 0.0001, "mm_vision_tower_lr": None,
}


def test_released_config_reads_and_writes_back_unchanged(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_8B))
    cfg = CambrianConfig.from_pretrained(str(tmp_path))
    assert type(cfg.llm_config).__name__ == "LlamaConfig"
    assert cfg.hidden_size == 4096 and cfg.final_grid_side == 24 and cfg.tower_grid_sides == [24, 24, 24, 96]
    assert cfg.sampler_layer_indices == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
    out = cfg.to_dict()
    for key, value in RELEASED_8B.items():
        assert out[key] == value, key
    cfg.save_pretrained(str(tmp_path / "again"))
    assert CambrianConfig.from_pretrained(str(tmp_path / "again")).to_dict() == out


@pytest.mark.parametrize("model_type, llm_class", [
    ("llava_llama", "LlamaConfig"), ("cambrian_mistral", "MistralConfig"), ("cambrian_phi3", "Phi3Config"),
    ("cambrian_gemma", "GemmaConfig"), ("cambrian_cohere", "CohereConfig"), ("llava_qwen", "Qwen2Config"),
    ("llama", "LlamaConfig"),
])
def test_any_wrapper_model_type(model_type, llm_class):
    cfg = CambrianConfig.from_dict({**RELEASED_8B, "model_type": model_type})
    assert type(cfg.llm_config).__name__ == llm_class
    assert cfg.to_dict()["model_type"] == model_type


@pytest.mark.parametrize("change, key", [
    ({"num_query_groups": 1}, "num_query_group"),                      # misspelt key
    ({"mm_projector_typ": "sva"}, "mm_projector_type"),
    ({"mm_vision_tower_aux_lst": []}, "mm_vision_tower_aux_lst"),
    ({"mm_frobnicate": True}, "mm_frobnicate"),                        # unknown mm_ key
    ({"mm_projector_type": "qformer"}, "mm_projector_type"),           # unknown value
    ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio"),
    ({"mm_vision_tower_aux_token_len_list": [576, 576, 576]}, "vision_tower_aux_token_len_list"),
    ({"vision_tower_aux_token_len_list": [576, 576, 576, 9000]}, "vision_tower_aux_token_len_list"),
    ({"query_num_list": [576, 144]}, "query_num_list"),                # 2 entries, 1 group
    ({"query_num_list": [100]}, "query_num_list"),                     # 10 does not divide 24
    ({"image_token_len": 500}, "image_token_len"),                     # not square
    ({"vision_hidden_size": 1000}, "vision_hidden_size"),              # not divisible by 16 heads
    ({"num_of_vision_sampler_layers": 12}, "num_of_vision_sampler_layers"),  # runs past layer 31
    ({"tokenizer_padding_side": "middle"}, "tokenizer_padding_side"),
    ({"model_type": "cambrian_nosuchlm"}, "model_type"),
])
def test_bad_config_names_the_key(change, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        CambrianConfig.from_dict({**RELEASED_8B, **change})


def test_missing_model_type_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="model_type"):
        CambrianConfig.from_dict({k: v for k, v in RELEASED_8B.items() if k != "model_type"})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        CambrianConfig.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        CambrianConfig.from_pretrained(str(tmp_path / "nowhere"))


def test_replace_validates():
    cfg = CambrianConfig.from_dict(RELEASED_8B)
    assert cfg.replace(connector_depth=2).connector_depth == 2
    with pytest.raises(ConfigError, match="query_num_list"):
        cfg.replace(num_query_group=2)
    with pytest.raises(ConfigError, match="hidden_size"):
        cfg.replace(hidden_size=8)


def test_image_after_question_is_written_only_when_set(tmp_path):
    cfg = CambrianConfig.from_dict(RELEASED_8B)
    assert cfg.image_after_question is False and "image_after_question" not in cfg.to_dict()
    after = cfg.replace(image_after_question=True)
    assert after.to_dict()["image_after_question"] is True
    after.save_pretrained(str(tmp_path))
    assert CambrianConfig.from_pretrained(str(tmp_path)).image_after_question is True
