"""Training: arguments, model building per stage, parameter groups, LoRA / QLoRA, NaN guard, bad records, checkpoint
sync (single-process engine, in this process).  Engines: test_train_engines.py; SIGKILL + resume: test_resume.py.

The helpers at the top (`tiny_inputs`, `train_argv`, `run_in_process`, `run_cli`) are shared with those files.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------ shared helpers
def _tiny_inputs_module():
    spec = importlib.util.spec_from_file_location("cambrian_tiny_inputs", os.path.join(REPO, "scripts", "tiny_inputs.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_inputs(base_dir: str, n_train: int = 12) -> dict:
    """The tiny "pretrained" LLM folder, tower folders and a synthetic JSONL data set (cached per test session)."""
    root = os.path.join(base_dir, f"cambrian_tiny_inputs_{n_train}")
    return _tiny_inputs_module().make_tiny_inputs(root, n_train=n_train)


def train_argv(inputs: dict, output_dir: str, *extra: str, data: str | None = None, steps: int = 2,
               batch: int = 2) -> list[str]:
    """A `python -m cambrian.train` command line for the tiny inputs (stage flags go in `extra`)."""
    return ["--model_name_or_path", inputs["llm"], "--tower_paths", json.dumps(inputs["tower_paths"]),
            "--data_path", data or inputs["data"], *inputs["model_args"], "--output_dir", output_dir,
            "--max_steps", str(steps), "--per_device_train_batch_size", str(batch), "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True", "--dataloader_num_workers", "0",
            "--seed", "7", *extra]


STAGE1 = ("--tune_mm_mlp_adapter", "True", "--learning_rate", "1e-3", "--mm_vision_sampler_lr", "1e-4",
          "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.06")
STAGE2 = ("--learning_rate", "4e-5", "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.03")


@contextlib.contextmanager
def one_thread():
    """Training steps of the tiny model are faster on one thread, and much faster when other processes load the
    machine (OpenMP threads spin waiting for each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def prepare_in_process(argv: list[str]):
    from cambrian.train.arguments import parse_args
    from cambrian.train.trainer import prepare

    return prepare(*parse_args(argv))


def run_in_process(argv: list[str]):
    """Run one training stage in this process; returns (TrainResult, trainer)."""
    from cambrian.train.trainer import run

    with one_thread():
        prepared = prepare_in_process(argv)
        return run(prepared), prepared.trainer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               TRANSFORMERS_VERBOSITY="error")
    env.update(extra)
    return env


def run_cli(argv: list[str], *, launcher: list[str] | None = None, env: dict | None = None,
            timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m cambrian.train ARGV` (or `LAUNCHER -m cambrian.train ARGV`) in a subprocess; raises with the
    output on failure."""
    cmd = (launcher or [sys.executable]) + ["-m", "cambrian.train", *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def initial_connector(inputs: dict, *extra: str) -> dict[str, torch.Tensor]:
    """The connector a stage-1 run starts from (built exactly as the trainer does: same seed), checkpoint names."""
    from transformers import set_seed

    from cambrian.train.arguments import parse_args
    from cambrian.train.builder import build_model

    model_args, data_args, training_args = parse_args(train_argv(inputs, "/tmp/unused", *STAGE1, *extra))
    set_seed(training_args.seed)
    model = build_model(model_args, data_args, training_args).model
    return {k: v.clone() for k, v in model.connector_state_dict().items()}


def llm_state(inputs: dict) -> dict[str, torch.Tensor]:
    return read_safetensors(os.path.join(inputs["llm"], "model.safetensors"))


def changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.equal(a.float(), b.float())


def check_stage1_output(out_dir: str, inputs: dict, init: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stage-1 output: config.json + mm_projector.safetensors only (no LLM weights), every connector tensor that
    gets a gradient moved, and the checkpoint loads with `load_pretrained_model(model_base=LLM)`."""
    from cambrian.model.builder import load_pretrained_model

    files = set(os.listdir(out_dir))
    assert {"config.json", "mm_projector.safetensors", "cambrian_template.txt", "tokenizer.json"} <= files
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files), files
    conn = read_safetensors(os.path.join(out_dir, "mm_projector.safetensors"))
    assert set(conn) == set(init)
    moved = [k for k in conn if changed(conn[k], init[k])]
    # The whole connector trains: projectors, queries, SVA layers before and inside the LLM, newline token.
    for key in ("model.vision_query", "model.image_newline", "model.mm_projector.0.weight",
                "model.mm_projector_aux_0.0.weight", "model.vision_sampler_0.layers.0.proj_in.weight",
                "model.vision_sampler_layers.1.layers.0.proj_in.weight"):
        assert key in moved, f"{key} did not change in stage 1"
    assert len(moved) >= 0.9 * len(conn), f"only {len(moved)}/{len(conn)} connector tensors changed"
    loaded = load_pretrained_model(out_dir, model_base=inputs["llm"], tower_paths=inputs["tower_paths"])
    for k, v in loaded.model.connector_state_dict().items():
        torch.testing.assert_close(v.float(), conn[k].float(), rtol=0, atol=0)
    base = llm_state(inputs)
    for k, v in loaded.model.llm.state_dict().items():  # the LLM is the untouched base
        torch.testing.assert_close(v, base[k], rtol=0, atol=0)
    return conn


def check_stage2_output(out_dir: str, inputs: dict, stage1_connector: dict[str, torch.Tensor]) -> dict:
    """Stage-2 output: released layout (config.json + model.safetensors with LLM + connector keys, no tower
    weights); LLM and connector moved, towers untouched; loads with `load_pretrained_model`."""
    from cambrian.model.builder import load_pretrained_model

    files = set(os.listdir(out_dir))
    assert {"config.json", "model.safetensors", "cambrian_template.txt", "tokenizer.json"} <= files
    state = read_safetensors(os.path.join(out_dir, "model.safetensors"))
    base = llm_state(inputs)
    assert not any("vision_tower" in k for k in state)
    llm_keys = [k for k in state if not k.startswith(("model.vision", "model.mm_projector", "model.image_newline"))]
    assert set(llm_keys) == set(base)
    moved_llm = [k for k in llm_keys if changed(state[k], base[k])]
    assert len(moved_llm) >= 0.9 * len(llm_keys), f"only {len(moved_llm)}/{len(llm_keys)} LLM tensors changed"
    moved_conn = [k for k in stage1_connector if changed(state[k], stage1_connector[k])]
    assert len(moved_conn) >= 0.9 * len(stage1_connector)
    loaded = load_pretrained_model(out_dir, tower_paths=inputs["tower_paths"])
    from cambrian.model.vision_towers import load_vision_tower

    for name, tower in zip(loaded.model.config.mm_vision_tower_aux_list, loaded.model.vision_towers):
        ref = load_vision_tower(name, inputs["tower_paths"][name])
        for (k, a), (_, b) in zip(tower.state_dict().items(), ref.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    cfg = json.load(open(os.path.join(out_dir, "config.json")))
    assert cfg["model_type"] == "cambrian_llama" and cfg["use_cache"] is True
    return state


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(str(tmp_path_factory.getbasetemp()))


# ------------------------------------------------------------------------------------------------ arguments
def test_arguments_original_names_config_file_and_overrides(tmp_path):
    import yaml

    from cambrian.train.arguments import parse_args, parse_tower_paths, scaled_lr

    argv = ["--model_name_or_path", "llm", "--version", "llama_v3", "--data_path", "d.jsonl",
            "--vision_tower_aux_list", '["siglip/CLIP-ViT-SO400M-14-384", "openai/clip-vit-large-patch14-336"]',
            "--vision_tower_aux_token_len_list", "[576, 576]", "--image_token_len", "576", "--query_num_list", "[576]",
            "--connector_only", "False", "--mm_vision_sampler_lr", "1e-4", "--tune_mm_mlp_adapter", "True",
            "--evaluation_strategy", "no", "--warmup_ratio", "0.06", "--lazy_preprocess", "True",
            "--mm_use_im_patch_token", "False", "--image_position", "91", "--output_dir", str(tmp_path),
            "--report_to", "none"]
    m, d, t = parse_args(argv)
    assert d.data_path == "d.jsonl" and d.image_aspect_ratio == "pad" and m.version == "llama_v3"
    assert m.tower_names == ["siglip/CLIP-ViT-SO400M-14-384", "openai/clip-vit-large-patch14-336"]
    assert m.tower_token_lens == [576, 576] and m.query_nums == [576] and m.connector_only is False
    assert t.mm_vision_sampler_lr == 1e-4 and t.warmup_steps == 0.06 and t.eval_strategy == "no"
    assert t.remove_unused_columns is False and t.nan_policy == "stop" and t.model_max_length == 2048

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": "llm", "data_path": "d.jsonl", "output_dir": str(tmp_path),
                                   "vision_tower_aux_list": ["a/b", "c/d"], "learning_rate": 1e-3,
                                   "report_to": "none", "tower_paths": {"a/b": "/x", "c/d": "/y"}}))
    m, _, t = parse_args([str(cfg), "--learning_rate", "2e-3"])  # flags after the file override it
    assert m.tower_names == ["a/b", "c/d"] and t.learning_rate == 2e-3
    assert m.tower_path_map == {"a/b": "/x", "c/d": "/y"}
    _, _, t2 = parse_args(["--config", str(cfg)])
    assert t2.learning_rate == 1e-3
    assert parse_tower_paths("a/b=/x, c/d=/y") == {"a/b": "/x", "c/d": "/y"}
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_tower_paths("a/b")
    with pytest.raises(ValueError, match="nan_policy"):
        parse_args(argv + ["--nan_policy", "ignore"])
    with pytest.raises(ValueError, match="unknown arguments"):
        parse_args(argv + ["--no_such_flag", "1"])
    # Cambrian's rule for another batch size: lr * sqrt(bs / base_bs)
    assert scaled_lr(4e-5, 512, 512) == 4e-5
    assert math.isclose(scaled_lr(4e-5, 128, 512), 2e-5)
    assert math.isclose(scaled_lr(2e-5, 2048, 1024), 2e-5 * math.sqrt(2))


def test_deepspeed_config_with_optimizer_block_and_group_lrs_is_refused(tmp_path):
    from cambrian.train.arguments import parse_args

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
                              "zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    with pytest.raises(ValueError, match="optimizer"):
        parse_args(["--output_dir", str(tmp_path), "--deepspeed", str(ds), "--mm_vision_sampler_lr", "1e-4",
                    "--report_to", "none"])


def test_lr_scaling_and_batch_size_check(inputs, tmp_path):
    from cambrian.train.arguments import parse_args
    from cambrian.train.trainer import apply_lr_scaling, prepare

    _, _, t = parse_args(train_argv(inputs, str(tmp_path), *STAGE1, "--base_batch_size", "8",
                                    "--gradient_accumulation_steps", "1"))
    assert t.global_batch_size == 2
    factor = apply_lr_scaling(t)
    assert math.isclose(factor, 0.5) and math.isclose(t.learning_rate, 5e-4) and math.isclose(t.mm_vision_sampler_lr, 5e-5)
    with pytest.raises(ValueError, match="batch_size 64"):
        prepare(*parse_args(train_argv(inputs, str(tmp_path), *STAGE1, "--batch_size", "64")))


# ------------------------------------------------------------------------------------------------ stages
def _trainable(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_stage1_trains_only_the_connector_with_sva_lr_group(inputs, tmp_path):
    prepared = prepare_in_process(train_argv(inputs, str(tmp_path), *STAGE1, "--mm_projector_lr", "2e-3",
                                             "--weight_decay", "0.1"))
    trainer, model = prepared.trainer, prepared.trainer.model
    assert prepared.stage == 1
    flags = _trainable(model)
    assert all(v == n.startswith("connector.") for n, v in flags.items()), "stage 1: connector only"
    assert any(n.startswith("connector.vision_sampler_layers.") for n in flags)  # the in-LLM SVA layers train too
    groups = {g["name"]: g for g in trainer.parameter_groups(model)}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert groups["sampler/decay"]["lr"] == 1e-4 and groups["projector/decay"]["lr"] == 2e-3
    assert groups["base/decay"]["lr"] == 1e-3  # image_newline: base lr, as in the original
    assert "connector.vision_query" in members["sampler/decay"]
    assert any(n.startswith("connector.vision_sampler_layers.1.") for n in members["sampler/decay"])
    assert any(n.startswith("connector.vision_sampler_0.") for n in members["sampler/decay"])
    assert any(n.startswith("connector.mm_projector_aux_3.") for n in members["projector/decay"])
    assert all(n.endswith(".bias") or ".norm" in n or "layernorm" in n or n.endswith((".0.weight", ".3.weight"))
               for g in ("sampler/no_decay", "projector/no_decay") for n in members.get(g, ())
               ), "no-decay groups hold biases and norms only"
    assert all(not n.endswith(".bias") for k, v in members.items() if k.endswith("/decay") for n in v)
    assert groups["sampler/no_decay"]["weight_decay"] == 0.0 and groups["sampler/decay"]["weight_decay"] == 0.1
    opt = trainer.create_optimizer()
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(flags.values())


def test_connector_init_orthogonal_and_default(inputs, tmp_path):
    default = prepare_in_process(train_argv(inputs, str(tmp_path / "d"), *STAGE1)).trainer.model
    ortho = prepare_in_process(train_argv(inputs, str(tmp_path / "o"), *STAGE1, "--mm_connector_init",
                                          "orthogonal")).trainer.model
    linears = [(n, m) for n, m in ortho.connector.named_modules() if isinstance(m, torch.nn.Linear)]
    assert any(n.startswith("vision_sampler_layers.") for n, _ in linears)  # in-LLM sampler layers included
    for name, m in linears:
        w = m.weight.detach().double()
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w  # orthonormal rows or columns
        assert torch.allclose(gram, torch.eye(gram.shape[0], dtype=torch.double), atol=1e-5), name
        assert m.bias is None or not m.bias.any(), name
    # the default init is PyTorch's (same seed: same weights as a model built without the flag)
    again = prepare_in_process(train_argv(inputs, str(tmp_path / "d2"), *STAGE1, "--mm_connector_init",
                                          "default")).trainer.model
    for (n, a), b in zip(default.connector.state_dict().items(), again.connector.state_dict().values()):
        assert torch.equal(a, b), n
    assert not torch.equal(default.connector.mm_projector[0].weight, ortho.connector.mm_projector[0].weight)


def test_connector_init_unknown_is_a_clear_error(inputs, tmp_path, capsys):
    from cambrian.train.__main__ import main

    assert main(train_argv(inputs, str(tmp_path), *STAGE1, "--mm_connector_init", "xavier")) == 2
    assert "--mm_connector_init 'xavier'" in capsys.readouterr().err


def test_stage2_trains_llm_and_connector_towers_only_when_unfrozen(inputs, tmp_path):
    prepared = prepare_in_process(train_argv(inputs, str(tmp_path), *STAGE2))
    flags = _trainable(prepared.trainer.model)
    assert prepared.stage == 2
    assert all(v == (not n.startswith("vision_towers.")) for n, v in flags.items())
    assert all(not t.training for t in prepared.trainer.model.train().vision_towers)  # frozen towers stay in eval

    prepared = prepare_in_process(train_argv(inputs, str(tmp_path), *STAGE2, "--unfreeze_mm_vision_tower", "True",
                                             "--mm_vision_tower_lr", "2e-6", "--freeze_backbone", "True"))
    model = prepared.trainer.model
    flags = _trainable(model)
    assert all(flags[n] for n in flags if n.startswith(("vision_towers.", "connector.", "llm.lm_head")))
    assert not any(flags[n] for n in flags if n.startswith("llm.model."))  # --freeze_backbone: decoder frozen
    groups = {g["name"]: g for g in prepared.trainer.parameter_groups(model)}
    assert groups["tower/decay"]["lr"] == 2e-6 and groups["base/decay"]["lr"] == 4e-5


def test_unfrozen_towers_are_trained_and_saved_with_the_checkpoint(inputs, tmp_path):
    from cambrian.model.builder import load_pretrained_model
    from cambrian.model.vision_towers import load_vision_tower

    out = str(tmp_path / "out")
    run_in_process(train_argv(inputs, out, *STAGE2, "--unfreeze_mm_vision_tower", "True", "--mm_vision_tower_lr",
                              "1e-3", "--lr_scheduler_type", "constant", "--warmup_ratio", "0", steps=1))
    assert sorted(os.listdir(os.path.join(out, "vision_towers"))) == sorted(
        os.path.basename(p) for p in inputs["tower_paths"].values())
    loaded = load_pretrained_model(out)  # towers found under <checkpoint>/vision_towers/
    for name, tower in zip(loaded.model.config.mm_vision_tower_aux_list, loaded.model.vision_towers):
        ref = load_vision_tower(name, inputs["tower_paths"][name])
        moved = [k for (k, a), (_, b) in zip(tower.state_dict().items(), ref.state_dict().items()) if changed(a, b)]
        assert moved, f"tower {name} did not train"


def test_stage2_loads_pretrained_adapter_and_rejects_mismatch(inputs, tmp_path):
    from safetensors.torch import save_file

    from cambrian.model.builder import CheckpointError

    conn = initial_connector(inputs)
    conn = {k: v + 1.0 for k, v in conn.items()}
    save_file(conn, str(tmp_path / "mm_projector.safetensors"))
    prepared = prepare_in_process(train_argv(inputs, str(tmp_path / "o"), *STAGE2,
                                             "--pretrain_mm_mlp_adapter", str(tmp_path)))
    for k, v in prepared.trainer.model.connector_state_dict().items():
        torch.testing.assert_close(v, conn[k], rtol=0, atol=0)
    bad = dict(conn)
    bad.pop("model.vision_query")
    bad["model.something_else"] = torch.zeros(1)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="vision_query"):
        prepare_in_process(train_argv(inputs, str(tmp_path / "o"), *STAGE2,
                                      "--pretrain_mm_mlp_adapter", str(tmp_path / "bad.safetensors")))


def test_lora_stage2_saves_adapter_layout_that_loads_merged(inputs, tmp_path):
    from cambrian.model.builder import load_pretrained_model

    out = str(tmp_path / "lora")
    _, trainer = run_in_process(train_argv(inputs, out, *STAGE2, "--lora_enable", "True", "--lora_r", "4",
                                                "--lora_alpha", "8", "--learning_rate", "1e-3"))
    model = trainer.model
    flags = _trainable(model)
    assert all(v == ("lora_" in n or n.startswith("connector.")) for n, v in flags.items())
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin", "config.json"} <= files
    assert "model.safetensors" not in files
    loaded = load_pretrained_model(out, model_base=inputs["llm"], tower_paths=inputs["tower_paths"])
    base = llm_state(inputs)
    merged = loaded.model.llm.state_dict()
    assert any(changed(merged[k], base[k]) for k in base if "q_proj" in k)  # the adapters were merged in
    for k, v in loaded.model.connector_state_dict().items():
        torch.testing.assert_close(v, model.connector_state_dict()[k], rtol=0, atol=0)


def test_qlora_on_cpu_is_a_clear_error(inputs, tmp_path, capsys):
    from cambrian.train.__main__ import main

    rc = main(train_argv(inputs, str(tmp_path), *STAGE2, "--lora_enable", "True", "--bits", "4"))
    err = capsys.readouterr().err
    assert rc == 2 and "--bits 4" in err and ("CUDA" in err or "bitsandbytes" in err)


def test_gradient_checkpointing_reaches_the_llm(inputs, tmp_path):
    result, trainer = run_in_process(train_argv(inputs, str(tmp_path), *STAGE2, "--gradient_checkpointing", "True",
                                                steps=1))
    llm = trainer.model.llm
    assert llm.is_activation_checkpointing
    assert all(layer.gradient_checkpointing for layer in llm.model.layers)
    assert math.isfinite(result.train_loss)


# ------------------------------------------------------------------------------------------------ data / robustness
def _write_data_with_bad_records(inputs: dict, path: str, n_good: int = 6) -> int:
    with open(inputs["data"], encoding="utf-8") as f:
        good = [json.loads(line) for line in f][:n_good]
    folder = os.path.dirname(inputs["data"])
    for r in good:
        r["image"] = os.path.join(folder, r["image"])
    bad = [
        '{"id": "missing", "image": "/nonexistent/x.png", "conversations": [{"from": "human", "value": "<image>\\nq"}, {"from": "gpt", "value": "a"}]}',
        '{"id": "broken", "conversations": [',
        json.dumps({"id": "empty", "image": good[0]["image"], "conversations": []}),
    ]
    lines = [json.dumps(good[0]), bad[0], json.dumps(good[1]), bad[1], json.dumps(good[2]), bad[2]]
    lines += [json.dumps(r) for r in good[3:]]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return len(bad)


def test_bad_records_are_counted_and_empty_batches_keep_training(inputs, tmp_path):
    data = str(tmp_path / "mixed.jsonl")
    n_bad = _write_data_with_bad_records(inputs, data)
    # batch size 1 over one epoch of 9 records: three batches are empty (their only record is bad)
    result, trainer = run_in_process(train_argv(inputs, str(tmp_path / "o"), *STAGE1, data=data, batch=1, steps=9))
    assert result.global_step == 9 and math.isfinite(result.train_loss)
    assert result.skipped_records == n_bad
    assert dict(trainer.skip_tracker.counts) == {"missing_image": 1, "malformed_json": 1, "empty_conversation": 1}
    final = [h for h in trainer.state.log_history if "train_loss" in h][-1]
    assert final["skipped_records"] == n_bad
    assert "missing_image" in trainer.skip_report()


def test_empty_batch_step_is_zero_weight_and_dummy_row_keeps_the_loss(inputs, tmp_path):
    from cambrian.data import DataCollatorForSupervisedDataset

    prepared = prepare_in_process(train_argv(inputs, str(tmp_path), *STAGE2))
    trainer, model = prepared.trainer, prepared.trainer.model
    trainer.create_optimizer()
    collator = DataCollatorForSupervisedDataset(trainer.cambrian_tokenizer)
    from cambrian.data import SkippedRecord

    with one_thread():
        empty = collator([SkippedRecord(index=3, reason="missing_image", id="x")])
        loss = trainer.training_step(model, empty)
        assert loss.item() == 0.0
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())
        assert trainer.skip_tracker.total == 1

        # A text-only batch with an extra blank-image row (multi-process runs) has exactly the same loss.
        text = [{"id": "t", "conversations": [{"from": "human", "value": "What shape is it?"},
                                               {"from": "gpt", "value": "circle"}]}]
        from cambrian.data import LazySupervisedDataset

        ds = LazySupervisedDataset(text, trainer.cambrian_tokenizer, list(model.vision_towers),
                                   template=trainer.cambrian_template)
        batch = collator([ds[0]])
        batch.pop("data_meta")
        model.eval()
        with torch.no_grad():
            plain = model(**batch).loss
            padded = trainer._with_dummy_image_row(batch)
            assert padded["images"] is not None and padded["input_ids"].shape[0] == 2
            with_row = model(**padded).loss
        torch.testing.assert_close(with_row, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_loss_guard(inputs, tmp_path, monkeypatch, policy):
    from cambrian.train.callbacks import NonFiniteLossError
    from cambrian.train.trainer import CambrianTrainer

    original = CambrianTrainer.compute_loss
    snapshots = []

    def compute_loss(self, model, inputs_, **kwargs):
        loss = original(self, model, inputs_, **kwargs)
        snapshots.append((self.state.global_step, model.connector.vision_query.detach().clone()))
        return loss * float("nan") if self.state.global_step == 1 else loss  # the 2nd optimizer step

    monkeypatch.setattr(CambrianTrainer, "compute_loss", compute_loss)
    argv = train_argv(inputs, str(tmp_path), *STAGE1, "--nan_policy", policy, "--lr_scheduler_type", "constant",
                      "--warmup_ratio", "0", steps=4)
    if policy == "stop":
        with pytest.raises(NonFiniteLossError) as info:
            run_in_process(argv)
        report = info.value.report
        assert "optimizer step 2" in report and "nan" in report and "train-" in report  # step, loss, sample ids
        return
    result, trainer = run_in_process(argv)
    assert result.global_step == 4 and trainer.nan_guard.skipped_steps == [2]
    # weights seen by the forward of steps 2 and 3 are equal: the NaN step changed nothing
    by_step = dict(snapshots)
    torch.testing.assert_close(by_step[1], by_step[2], rtol=0, atol=0)
    assert changed(by_step[0], by_step[1]) and changed(by_step[2], by_step[3])
    assert any(h.get("nan_skipped") == 1 for h in trainer.state.log_history)
    assert all(torch.isfinite(p).all() for p in trainer.model.connector.parameters())


def test_checkpoint_sync_and_loss_log(inputs, tmp_path):
    out, sync = str(tmp_path / "out"), str(tmp_path / "sync")
    log = str(tmp_path / "losses.jsonl")
    argv = train_argv(inputs, out, *STAGE1, "--save_strategy", "steps", "--save_steps", "2",
                      "--checkpoint_sync_dir", sync, "--loss_log_file", log, steps=4)
    _, trainer = run_in_process(argv)
    assert sorted(os.listdir(sync)) == ["checkpoint-2", "checkpoint-4", "final"]  # no temporary folders left
    for name in ("checkpoint-2", "checkpoint-4"):
        assert sorted(os.listdir(os.path.join(sync, name))) == sorted(os.listdir(os.path.join(out, name)))
    assert os.path.isfile(os.path.join(sync, "final", "mm_projector.safetensors"))
    rows = [json.loads(line) for line in open(log)]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    hf = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    for r, h in zip(rows, hf):
        assert math.isclose(r["loss"], h, rel_tol=1e-6)


def test_bf16_mixed_precision_stage2_step(inputs, tmp_path):
    from cambrian.model.builder import load_pretrained_model

    out = str(tmp_path / "bf16")
    result, trainer = run_in_process(train_argv(inputs, out, *STAGE2, "--bf16", "True", steps=1))
    assert trainer.accelerator.mixed_precision == "bf16" and math.isfinite(result.train_loss)
    loaded = load_pretrained_model(out, tower_paths=inputs["tower_paths"])
    assert loaded.model.llm.dtype == torch.float32  # fp32 master weights; bf16 only inside autocast


def test_continue_training_a_cambrian_checkpoint(inputs, tmp_path):
    """--model_name_or_path can be a full Cambrian checkpoint (its config.json defines the connector; its towers
    come from <checkpoint>/vision_towers/ here): stage 2 continues from its weights."""
    from cambrian.model.builder import load_pretrained_model, save_pretrained
    from cambrian.model.tiny import build_tiny_model

    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    save_pretrained(build_tiny_model(seed=3), ckpt, save_towers=True)
    argv = ["--model_name_or_path", ckpt, "--data_path", inputs["data"], "--output_dir", out, "--max_steps", "1",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--save_strategy", "no",
            "--report_to", "none", "--disable_tqdm", "True"]
    _, trainer = run_in_process(argv)
    assert trainer.cambrian_template == "llama_3" and trainer.stage == 2
    before = read_safetensors(os.path.join(ckpt, "model.safetensors"))
    after = read_safetensors(os.path.join(out, "model.safetensors"))
    assert set(before) == set(after)
    assert changed(after["model.vision_query"], before["model.vision_query"])
    assert changed(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    load_pretrained_model(out, tower_paths={n: os.path.join(ckpt, "vision_towers", n.replace("/", "--"))
                                            for n in trainer.model.config.mm_vision_tower_aux_list})
