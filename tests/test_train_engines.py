"""A real stage-1 and stage-2 run of the tiny model on every engine that runs here, each checked for which
parameters moved and for an output that `load_pretrained_model` loads:

* plain single process (in this process);
* DeepSpeed ZeRO-2, ZeRO-3 and ZeRO-3 + CPU offload, one process on CPU with gloo (subprocesses); their weights
  must equal the plain run's (same seed, same data order);
* FSDP with 2 CPU processes under torchrun (gloo), on data with a bad record and a text-only record (an empty
  batch on one rank, the dummy image row on the other);
* torch_xla: the engine selection and checkpoint path through a stand-in `torch_xla` module here; the real
  PJRT_DEVICE=CPU step runs in `.venv-xla` (`make test-xla`, torch 2.9 + torch_xla 2.9).
"""
from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import (
    REPO,
    STAGE1,
    STAGE2,
    check_stage1_output,
    check_stage2_output,
    free_port,
    initial_connector,
    make_inputs,
    prepare_in_process,
    read_safetensors,
    run_cli,
    run_in_process,
    subprocess_env,
    train_argv,
)

try:
    import torch_xla  # noqa: F401

    HAVE_XLA = True
except ImportError:
    HAVE_XLA = False


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def plain(inputs, tmp_path_factory):
    """The single-process reference runs: stage 1, then stage 2 from its connector (3 steps each)."""
    if HAVE_XLA:
        pytest.skip("the plain engine is tested in the main venv")
    root = tmp_path_factory.mktemp("plain")
    out1, out2 = str(root / "stage1"), str(root / "stage2")
    run_in_process(train_argv(inputs, out1, *STAGE1, steps=3))
    run_in_process(train_argv(inputs, out2, *STAGE2, "--pretrain_mm_mlp_adapter", out1, steps=3))
    return {"stage1": out1, "stage2": out2}


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert set(a) == set(b)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by up to {worst}"


@pytest.mark.skipif(HAVE_XLA, reason="main venv only")
def test_plain_engine_stage1_and_stage2(plain, inputs):
    conn = check_stage1_output(plain["stage1"], inputs, initial_connector(inputs))
    check_stage2_output(plain["stage2"], inputs, conn)


def _deepspeed_env() -> dict:
    return subprocess_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1")


@pytest.mark.skipif(HAVE_XLA, reason="main venv only")
@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_deepspeed_stage1_and_stage2(config, plain, inputs, tmp_path):
    ds = os.path.join(REPO, "scripts", f"{config}.json")
    out1, out2 = str(tmp_path / "stage1"), str(tmp_path / "stage2")
    proc = run_cli(train_argv(inputs, out1, *STAGE1, "--deepspeed", ds, steps=3), env=_deepspeed_env())
    assert f"on deepspeed-{config}" in proc.stdout
    conn = check_stage1_output(out1, inputs, initial_connector(inputs))
    _assert_same_weights(conn, read_safetensors(os.path.join(plain["stage1"], "mm_projector.safetensors")))
    # stage 2 from the same connector as the plain run, so the two runs must agree
    run_cli(train_argv(inputs, out2, *STAGE2, "--deepspeed", ds, "--pretrain_mm_mlp_adapter", plain["stage1"],
                       steps=3), env=_deepspeed_env())
    check_stage2_output(out2, inputs, conn)
    _assert_same_weights(read_safetensors(os.path.join(out2, "model.safetensors")),
                         read_safetensors(os.path.join(plain["stage2"], "model.safetensors")))


@pytest.mark.skipif(HAVE_XLA, reason="main venv only")
def test_deepspeed_zero3_offload_stage2(plain, inputs, tmp_path):
    out2 = str(tmp_path / "stage2")
    ds = os.path.join(REPO, "scripts", "zero3_offload.json")
    run_cli(train_argv(inputs, out2, *STAGE2, "--deepspeed", ds, "--pretrain_mm_mlp_adapter", plain["stage1"],
                       steps=3), env=_deepspeed_env())
    conn = read_safetensors(os.path.join(plain["stage1"], "mm_projector.safetensors"))
    check_stage2_output(out2, inputs, conn)
    _assert_same_weights(read_safetensors(os.path.join(out2, "model.safetensors")),
                         read_safetensors(os.path.join(plain["stage2"], "model.safetensors")))


def _fsdp_data(inputs: dict, path: str) -> None:
    """6 good records, one whose image is missing and one text-only: with batch 1 per rank, some step gives one
    rank an empty batch while the other trains, and a text-only batch meets an image batch."""
    folder = os.path.dirname(inputs["data"])
    with open(inputs["data"], encoding="utf-8") as f:
        good = [json.loads(line) for line in f][:6]
    for r in good:
        r["image"] = os.path.join(folder, r["image"])
    missing = dict(good[0], id="missing", image="/nonexistent/x.png")
    text = {"id": "text", "conversations": [{"from": "human", "value": "What shape has three sides?"},
                                            {"from": "gpt", "value": "triangle"}]}
    rows = good[:2] + [missing] + good[2:4] + [text] + good[4:]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.mark.skipif(HAVE_XLA, reason="main venv only")
def test_fsdp_two_cpu_processes_stage1_and_stage2(inputs, tmp_path):
    data = str(tmp_path / "data.jsonl")
    _fsdp_data(inputs, data)
    cfg = os.path.join(REPO, "scripts", "fsdp_config.json")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port())]
    fsdp = ("--fsdp", "full_shard auto_wrap", "--fsdp_config", cfg)
    out1, out2 = str(tmp_path / "stage1"), str(tmp_path / "stage2")
    # 4 steps x 2 ranks x batch 1 = one epoch of the 8 records
    proc = run_cli(train_argv(inputs, out1, *STAGE1, *fsdp, data=data, batch=1, steps=4), launcher=launcher)
    assert "on fsdp" in proc.stdout and "1 skipped record(s)" in proc.stdout
    conn = check_stage1_output(out1, inputs, initial_connector(inputs))
    launcher[-1] = str(free_port())
    proc = run_cli(train_argv(inputs, out2, *STAGE2, *fsdp, "--pretrain_mm_mlp_adapter", out1,
                              "--group_by_modality_length", "True", data=data, batch=1, steps=4), launcher=launcher)
    assert "on fsdp" in proc.stdout
    check_stage2_output(out2, inputs, conn)
    state = json.load(open(os.path.join(out2, "trainer_state.json")))
    assert state["global_step"] == 4


# ------------------------------------------------------------------------------------------------ torch_xla
def _fake_torch_xla(calls: list) -> dict[str, types.ModuleType]:
    xm = types.ModuleType("torch_xla.core.xla_model")
    xm.mark_step = lambda: calls.append("mark_step")
    xm.rendezvous = lambda tag: calls.append(f"rendezvous:{tag}")

    def to_cpu(state):
        calls.append("to_cpu")
        return {k: v.detach().cpu() for k, v in state.items()}

    xm._maybe_convert_to_cpu = to_cpu
    core = types.ModuleType("torch_xla.core")
    core.xla_model = xm
    root = types.ModuleType("torch_xla")
    root.core = core
    return {"torch_xla": root, "torch_xla.core": core, "torch_xla.core.xla_model": xm}


@pytest.mark.skipif(HAVE_XLA, reason="the real XLA test below runs instead")
def test_xla_engine_is_selected_and_saves_the_released_layout(inputs, tmp_path, monkeypatch):
    """With torch_xla present, HF's Trainer runs on the XLA device (PJRT_DEVICE) and `save_model` must gather the
    state to CPU through torch_xla and write the released layout (HF's own TPU save writes a raw state dict)."""
    import transformers.utils

    from cambrian.train import trainer as trainer_module

    prepared = prepare_in_process(train_argv(inputs, str(tmp_path / "o"), *STAGE1))
    trainer = prepared.trainer
    calls: list = []
    for name, mod in _fake_torch_xla(calls).items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(transformers.utils, "is_torch_xla_available", lambda *a, **k: True)
    assert trainer_module._is_xla()
    assert trainer_module.engine_name(trainer) == "xla"
    out = str(tmp_path / "saved")
    trainer.save_model(out)
    assert calls == ["mark_step", "rendezvous:cambrian_saving_checkpoint", "to_cpu"]
    assert {"config.json", "mm_projector.safetensors", "training_args.bin"} <= set(os.listdir(out))
    saved = read_safetensors(os.path.join(out, "mm_projector.safetensors"))
    for k, v in trainer.model.connector_state_dict().items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0)
    # the FSDP-XLA config of the scripts is what HF reads for torch_xla FSDP
    from cambrian.train.arguments import parse_args

    _, _, t = parse_args(train_argv(inputs, str(tmp_path / "o"), *STAGE1, "--fsdp", "full_shard",
                                    "--fsdp_config", os.path.join(REPO, "scripts", "fsdp_xla.json")))
    assert t.fsdp_config["xla"] is True and t.fsdp_config["xla_fsdp_v2"] is True


def test_make_test_xla_target_exists():
    makefile = open(os.path.join(REPO, "Makefile"), encoding="utf-8").read()
    assert "test-xla:" in makefile
    script = open(os.path.join(REPO, "scripts", "test_xla.sh"), encoding="utf-8").read()
    assert "torch_xla==2.9" in script and "PJRT_DEVICE=CPU" in script


@pytest.mark.skipif(not HAVE_XLA, reason="needs torch_xla: run `make test-xla` (its own venv, torch 2.9)")
def test_xla_real_stage1_and_stage2(inputs, tmp_path):
    """PJRT_DEVICE=CPU: a real XLA training step for each stage (run by `make test-xla` in .venv-xla)."""
    env = subprocess_env(PJRT_DEVICE="CPU")
    const = ("--lr_scheduler_type", "constant", "--warmup_ratio", "0")  # one step: no warmup at lr 0
    out1, out2 = str(tmp_path / "stage1"), str(tmp_path / "stage2")
    # one step per stage: XLA compiles the graph of every new sequence length, which is slow on CPU
    proc = run_cli(train_argv(inputs, out1, *STAGE1, *const, steps=1), env=env, timeout=900)
    assert "on xla" in proc.stdout
    conn = check_stage1_output(out1, inputs, initial_connector(inputs))
    proc = run_cli(train_argv(inputs, out2, *STAGE2, *const, "--pretrain_mm_mlp_adapter", out1, steps=1), env=env,
                   timeout=900)
    assert "on xla" in proc.stdout
    check_stage2_output(out2, inputs, conn)


_NAN_SCRIPT = r'''
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_train import train_argv, STAGE1
from cambrian.train.arguments import parse_args
from cambrian.train import trainer as T

inputs = json.loads({inputs!r})
original = T.CambrianTrainer.compute_loss
seen = {{}}

def compute_loss(self, model, batch, **kwargs):
    loss = original(self, model, batch, **kwargs)
    seen[self.state.global_step] = self.unwrapped_model.connector.mm_projector[0].bias.detach().clone()
    return loss * float("nan") if self.state.global_step == 1 else loss

T.CambrianTrainer.compute_loss = compute_loss
argv = train_argv(inputs, {out!r}, *STAGE1, "--nan_policy", "skip", "--lr_scheduler_type", "constant",
                  "--warmup_ratio", "0", "--deepspeed", {ds!r}, steps=4)
prepared = T.prepare(*parse_args(argv))
result = T.run(prepared)
print("RESULT", json.dumps({{"steps": result.global_step, "skipped": prepared.trainer.nan_guard.skipped_steps,
                            "nan_step_moved": not torch.equal(seen[1], seen[2]),
                            "next_step_moved": not torch.equal(seen[2], seen[3])}}))
'''


@pytest.mark.skipif(HAVE_XLA, reason="main venv only")
@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_deepspeed_nan_skip_leaves_weights_unchanged(config, inputs, tmp_path):
    import subprocess

    script = tmp_path / "nan.py"
    script.write_text(_NAN_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), inputs=json.dumps(inputs),
                                         out=str(tmp_path / "out"), ds=os.path.join(REPO, "scripts", f"{config}.json")))
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=_deepspeed_env(), capture_output=True,
                          text=True, timeout=240)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(line[len("RESULT "):])
    assert result == {"steps": 4, "skipped": [2], "nan_step_moved": False, "next_step_moved": True}
