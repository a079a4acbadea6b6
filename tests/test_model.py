"""The whole model: every LLM backend builds, saves, loads and generates; checkpoints round-trip exactly."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cambrian.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from cambrian.model import CheckpointError, load_pretrained_model, save_pretrained
from cambrian.model.image_processing import process_images
from cambrian.model.tiny import LLM_TYPES, build_tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer("llama_3")


@pytest.fixture(scope="module")
def images():
    red = Image.new("RGB", (40, 24), (200, 20, 20))     # wide: unpadding drops rows
    blue = Image.new("RGB", (20, 50), (20, 20, 200))    # tall: unpadding drops columns
    square = Image.new("RGB", (30, 30), (20, 200, 20))
    return [red, blue, square]


def _state(model):
    return {k: v.clone() for k, v in model.checkpoint_state_dict().items()}


@pytest.mark.parametrize("llm_type", LLM_TYPES)
def test_backend_build_save_load_generate(tmp_path, tokenizer, images, llm_type):
    model = build_tiny_model(llm_type, tokenizer=tokenizer)
    before = model.generate(images=[images[0]], prompts=["What color is the shape?"], max_new_tokens=5)
    save_pretrained(model, str(tmp_path / "ckpt"), save_towers=True)
    tok, loaded, processors, context_len = load_pretrained_model(str(tmp_path / "ckpt"))
    assert context_len == 512 and len(processors) == 4
    assert type(loaded.llm).__name__.lower().startswith(llm_type.replace("qwen2", "qwen2").lower()[:4])
    # bit-exact round trip of every checkpoint tensor
    a, b = _state(model), _state(loaded)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    after = loaded.generate(images=[images[0]], prompts=["What color is the shape?"], max_new_tokens=5)
    assert before == after
    assert isinstance(after[0], str)


def test_checkpoint_uses_released_names(tmp_path, tokenizer):
    model = build_tiny_model("llama", tokenizer=tokenizer)
    save_pretrained(model, str(tmp_path / "ckpt"))
    keys = set(load_file(str(tmp_path / "ckpt" / "model.safetensors")))
    for name in ["model.vision_query", "model.image_newline", "model.mm_projector.0.weight", "model.mm_projector.2.bias",
                 "model.mm_projector_aux_3.3.weight", "model.vision_sampler_0.layers.1.cross_attn.k_proj_3.1.weight",
                 "model.vision_sampler_0.layers.0.pos_embed_3", "model.vision_sampler_layers.1.layers.0.proj_in.weight",
                 "model.embed_tokens.weight", "model.layers.3.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"]:
        assert name in keys, name
    assert not any("vision_towers" in k for k in keys)  # tower weights are not in the checkpoint
    cfg = json.load(open(tmp_path / "ckpt" / "config.json"))
    assert cfg["model_type"] == "cambrian_llama" and cfg["mm_projector_type"] == "sva"
    assert cfg["architectures"] == ["CambrianLlamaForCausalLM"]


def test_sharded_checkpoint_and_bin_files(tmp_path, tokenizer, images):
    model = build_tiny_model("llama", tokenizer=tokenizer)
    ref = model.generate(images=[images[1]], prompts=["Describe the picture."], max_new_tokens=4)
    sharded = tmp_path / "sharded"
    save_pretrained(model, str(sharded), max_shard_size=200_000, save_towers=True)
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    _, loaded, _, _ = load_pretrained_model(str(sharded))
    assert loaded.generate(images=[images[1]], prompts=["Describe the picture."], max_new_tokens=4) == ref
    # the older pytorch_model.bin layout, read with weights_only=True
    binary = tmp_path / "bin"
    save_pretrained(model, str(binary), save_towers=True)
    state = load_file(str(binary / "model.safetensors"))
    os.remove(binary / "model.safetensors")
    torch.save(state, binary / "pytorch_model.bin")
    _, loaded_bin, _, _ = load_pretrained_model(str(binary))
    assert loaded_bin.generate(images=[images[1]], prompts=["Describe the picture."], max_new_tokens=4) == ref


def test_missing_and_unexpected_tensors_are_listed(tmp_path, tokenizer):
    model = build_tiny_model("llama", tokenizer=tokenizer)
    ckpt = tmp_path / "ckpt"
    save_pretrained(model, str(ckpt), save_towers=True)
    state = load_file(str(ckpt / "model.safetensors"))
    broken = dict(state)
    del broken["model.vision_sampler_0.layers.1.cross_attn.o_proj.weight"]
    save_file(broken, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match="o_proj.weight"):
        load_pretrained_model(str(ckpt))
    broken = dict(state)
    del broken["model.layers.2.self_attn.q_proj.weight"]
    save_file(broken, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.layers.2.self_attn.q_proj.weight"):
        load_pretrained_model(str(ckpt))
    extra = dict(state)
    extra["model.vision_sampler_7.bogus"] = torch.zeros(2)
    save_file(extra, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match="vision_sampler_7.bogus"):
        load_pretrained_model(str(ckpt))


def test_missing_tower_path_lists_every_tower(tmp_path, tokenizer):
    from cambrian.model.vision_towers import MissingVisionTowerError

    model = build_tiny_model("llama", tokenizer=tokenizer)
    save_pretrained(model, str(tmp_path / "ckpt"))  # no towers saved
    with pytest.raises(MissingVisionTowerError) as err:
        load_pretrained_model(str(tmp_path / "ckpt"))
    for name in model.config.mm_vision_tower_aux_list:
        assert name in str(err.value)


def test_tower_paths_mapping(tmp_path, tokenizer, images):
    model = build_tiny_model("llama", tokenizer=tokenizer)
    save_pretrained(model, str(tmp_path / "ckpt"))
    mapping = {}
    for name, tower in zip(model.config.mm_vision_tower_aux_list, model.vision_towers):
        folder = tmp_path / "towers" / name.replace("/", "_")
        tower.save_pretrained(str(folder))
        mapping[name] = str(folder)
    _, loaded, _, _ = load_pretrained_model(str(tmp_path / "ckpt"), tower_paths=mapping)
    q = ["What shape is it?"]
    assert loaded.generate(images=[images[2]], prompts=q, max_new_tokens=3) == model.generate(images=[images[2]], prompts=q, max_new_tokens=3)
    assert all(not p.requires_grad for t in loaded.vision_towers for p in t.parameters())


def test_batched_left_padded_generation_equals_one_by_one(tokenizer, images):
    model = build_tiny_model("llama", tokenizer=tokenizer)
    prompts = ["What color is the shape?", "How many shapes are there in the picture?", "Is it big?"]
    batched = model.generate(images=images, prompts=prompts, max_new_tokens=6)
    single = [model.generate(images=[im], prompts=[p], max_new_tokens=6)[0] for im, p in zip(images, prompts)]
    assert batched == single


def test_several_images_in_one_prompt_and_text_only(tokenizer, images):
    model = build_tiny_model("llama", tokenizer=tokenizer)
    out = model.generate(images=[[images[0], images[1]], None], prompts=["<image>\nleft <image>\nright: which is red?", "Hello"],
                         max_new_tokens=4)
    assert len(out) == 2
    # image tokens of both images are spliced where the two placeholders were
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 7, IMAGE_TOKEN_INDEX, 9]])
    pix, sizes = process_images([images[0], images[1]], model.image_processors)
    spliced = model.splice_image_tokens(ids, pix, sizes)
    n0, n1 = (t.shape[0] for t in spliced.connector_output.image_tokens)
    assert spliced.image_starts == [(0, 2), (0, 3 + n0)]
    assert spliced.inputs_embeds.shape[1] == 4 + n0 + n1
    # wide image: rows dropped; tall image: columns dropped (grid 4x4, newline per row)
    (h0, w0), (h1, w1) = spliced.connector_output.grid_sizes
    assert (h0, w0) == (2, 4) and (h1, w1) == (4, 2)
    assert n0 == h0 * (w0 + 1) and n1 == h1 * (w1 + 1)


def test_sampler_layers_run_on_prefill_only_at_actual_positions(tokenizer, images):
    model = build_tiny_model("llama", tokenizer=tokenizer, image_position=3)
    calls = []
    original = model.connector.apply_sampler_layer

    def spy(k, hidden, starts, output):
        calls.append((k, hidden.shape[1], list(starts)))
        return original(k, hidden, starts, output)

    model.connector.apply_sampler_layer = spy
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate(images=[images[2]], prompts=["What shape is it?"], max_new_tokens=4)
    assert [c[0] for c in calls] == [0, 1]  # two sampler layers, once each: prefill only
    assert any("image_position" in str(w.message) for w in caught)
    # the sampler layers change the LLM's output (they are really applied)
    ids = torch.tensor([[1, 2, IMAGE_TOKEN_INDEX, 3]])
    pix, sizes = process_images([images[2]], model.image_processors)
    with torch.no_grad():
        with_layers = model(ids, pix, sizes).logits
        model._hook_handles[0].remove()
        model._hook_handles[1].remove()
        without = model(ids, pix, sizes).logits
    assert not torch.allclose(with_layers, without)


def test_forward_loss_and_label_masking(tokenizer, images):
    model = build_tiny_model("qwen2", tokenizer=tokenizer).train()
    ids = torch.tensor([[1, 2, IMAGE_TOKEN_INDEX, 3, 4, 5], [1, 2, 3, 4, 5, 6]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4, 5], [IGNORE_INDEX, 2, 3, 4, 5, 6]])
    pix, sizes = process_images([images[0]], model.image_processors)
    out = model(ids, pix, sizes, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.connector.vision_query.grad is not None
    assert all(p.grad is None for t in model.vision_towers for p in t.parameters())  # towers frozen
    spliced = model.splice_image_tokens(ids, pix, sizes, labels=labels)
    n_img = model.config.final_grid_side * (model.config.final_grid_side + 1)  # training: full grid
    assert spliced.inputs_embeds.shape[1] == 5 + n_img
    assert (spliced.labels[0, 2:2 + n_img] == IGNORE_INDEX).all()
    assert spliced.labels[0, -2:].tolist() == [4, 5]


def test_image_count_mismatch_is_a_clear_error(tokenizer, images):
    model = build_tiny_model("llama", tokenizer=tokenizer)
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 2, IMAGE_TOKEN_INDEX]])
    pix, sizes = process_images([images[0]], model.image_processors)
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        model.splice_image_tokens(ids, pix, sizes)
    with pytest.raises(ValueError, match="no images were given"):
        model.splice_image_tokens(ids)


def test_linear_and_mlp_projectors(tmp_path, tokenizer, images):
    for projector in ("linear", "mlp2x_gelu"):
        model = build_tiny_model("mistral", tokenizer=tokenizer, projector=projector, connector_only=True)
        ref = model.generate(images=[images[0]], prompts=["What is shown?"], max_new_tokens=3)
        save_pretrained(model, str(tmp_path / projector), save_towers=True)
        _, loaded, _, _ = load_pretrained_model(str(tmp_path / projector))
        assert loaded.generate(images=[images[0]], prompts=["What is shown?"], max_new_tokens=3) == ref


def test_connector_only_stage1_checkpoint_with_model_base(tmp_path, tokenizer, images):
    model = build_tiny_model("llama", tokenizer=tokenizer)
    full = tmp_path / "full"
    save_pretrained(model, str(full), save_towers=True)
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    model.config.save_pretrained(str(stage1))
    save_file({k: v.contiguous() for k, v in model.connector_state_dict().items()}, str(stage1 / "mm_projector.safetensors"))
    with pytest.raises(ValueError, match="model_base"):
        load_pretrained_model(str(stage1))
    _, loaded, _, _ = load_pretrained_model(str(stage1), model_base=str(full), tower_paths={
        n: str(full / "vision_towers" / n.replace("/", "--")) for n in model.config.mm_vision_tower_aux_list})
    q = ["What color is the shape?"]
    assert loaded.generate(images=[images[0]], prompts=q, max_new_tokens=4) == model.generate(images=[images[0]], prompts=q, max_new_tokens=4)


def test_lora_adapter_with_model_base(tmp_path, tokenizer, images):
    from peft import LoraConfig, get_peft_model

    base_model = build_tiny_model("llama", tokenizer=tokenizer)
    base = tmp_path / "base"
    save_pretrained(base_model, str(base), save_towers=True)
    tuned = build_tiny_model("llama", tokenizer=tokenizer, seed=1)
    tuned.llm.load_state_dict(base_model.llm.state_dict())
    tuned.vision_towers.load_state_dict(base_model.vision_towers.state_dict())  # towers come from the base
    peft_llm = get_peft_model(tuned.llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in peft_llm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    lora = tmp_path / "lora"
    peft_llm.save_pretrained(str(lora))
    tuned.config.save_pretrained(str(lora))
    torch.save({"base_model.model." + k: v for k, v in tuned.connector_state_dict().items()}, lora / "non_lora_trainables.bin")
    merged = peft_llm.merge_and_unload()
    tuned.llm = merged
    towers = {n: str(base / "vision_towers" / n.replace("/", "--")) for n in base_model.config.mm_vision_tower_aux_list}
    _, loaded, _, _ = load_pretrained_model(str(lora), model_base=str(base), tower_paths=towers)
    ids = torch.tensor([[1, 2, IMAGE_TOKEN_INDEX, 3]])
    pix, sizes = process_images([images[0]], loaded.image_processors)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, pix, sizes).logits, tuned.eval()(ids, pix, sizes).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(loaded(ids, pix, sizes).logits, base_model(ids, pix, sizes).logits, atol=1e-3)


def test_quantised_loading_fails_with_a_reason_on_cpu(tmp_path, tokenizer):
    model = build_tiny_model("llama", tokenizer=tokenizer)
    save_pretrained(model, str(tmp_path / "ckpt"), save_towers=True)
    with pytest.raises(RuntimeError, match="bitsandbytes"):
        load_pretrained_model(str(tmp_path / "ckpt"), load_4bit=True)


def test_dtype_override(tmp_path, tokenizer, images):
    model = build_tiny_model("llama", tokenizer=tokenizer)
    save_pretrained(model, str(tmp_path / "ckpt"), save_towers=True)
    _, loaded, _, _ = load_pretrained_model(str(tmp_path / "ckpt"), dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert next(loaded.connector.parameters()).dtype == torch.bfloat16
    assert len(loaded.generate(images=[images[0]], prompts=["What is shown?"], max_new_tokens=3)) == 1
