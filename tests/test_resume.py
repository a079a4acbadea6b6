"""SIGKILL mid-training, then `--resume_from_checkpoint`: the loss curve and final weights must equal those of an
uninterrupted run, which needs model, optimizer, scheduler, RNG and data position all restored.

Each case runs `python -m cambrian.train` three times: uninterrupted; again, killed with SIGKILL once the step
after a checkpoint has been logged (so the process is mid-training and the checkpoint is complete); resumed from
that checkpoint.  Per-step losses come from `--loss_log_file` (exact floats; HF's log rounds to 4 decimals).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import (
    REPO,
    STAGE1,
    STAGE2,
    make_inputs,
    read_safetensors,
    run_cli,
    subprocess_env,
    train_argv,
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(str(tmp_path_factory.getbasetemp()))


def _losses(path: str) -> dict[int, float]:
    with open(path, encoding="utf-8") as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f)}


def _run_and_kill(argv: list[str], loss_log: str, kill_after_step: int, timeout: float = 240) -> None:
    """Start a run and SIGKILL it as soon as step `kill_after_step` is in its loss log."""
    log = open(loss_log + ".out", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cambrian.train", *argv], cwd=REPO, env=subprocess_env(),
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            if os.path.exists(loss_log) and kill_after_step in _losses(loss_log):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == -signal.SIGKILL, (
        f"the run was not killed mid-training (exit {proc.returncode}):\n{open(loss_log + '.out').read()[-3000:]}")


def _final_weights(out_dir: str) -> dict[str, torch.Tensor]:
    for name in ("model.safetensors", "mm_projector.safetensors", "adapter_model.safetensors"):
        if os.path.isfile(os.path.join(out_dir, name)):
            return read_safetensors(os.path.join(out_dir, name))
    raise AssertionError(f"no weights in {out_dir}")


CASES = {
    # stage 1: connector-only checkpoints (mm_projector.safetensors), HF's random sampler
    "stage1": dict(flags=STAGE1, steps=9, save=4, ga=1),
    # stage 2: full released-layout checkpoints, modality-grouped batch sampler, gradient accumulation, and more
    # than one epoch (the checkpoint falls inside the second epoch)
    "stage2-grouped-accum": dict(flags=STAGE2 + ("--group_by_modality_length", "True"), steps=7, save=4, ga=2),
    # stage 2 with LoRA: adapter checkpoints, and dropout in the adapters makes the restored RNG matter
    "lora-dropout": dict(flags=STAGE2 + ("--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8",
                                         "--lora_dropout", "0.2", "--learning_rate", "1e-3"), steps=7, save=3, ga=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_and_resume_reproduces_the_loss_curve(case, inputs, tmp_path):
    c = CASES[case]

    def argv(out: str, log: str, *extra: str) -> list[str]:
        return train_argv(inputs, out, *c["flags"], "--gradient_accumulation_steps", str(c["ga"]),
                          "--save_strategy", "steps", "--save_steps", str(c["save"]), "--loss_log_file", log,
                          *extra, steps=c["steps"])

    full_out, full_log = str(tmp_path / "full"), str(tmp_path / "full.jsonl")
    run_cli(argv(full_out, full_log))
    reference = _losses(full_log)
    assert sorted(reference) == list(range(1, c["steps"] + 1))

    killed_out, killed_log = str(tmp_path / "killed"), str(tmp_path / "killed.jsonl")
    _run_and_kill(argv(killed_out, killed_log), killed_log, kill_after_step=c["save"] + 1)
    checkpoint = os.path.join(killed_out, f"checkpoint-{c['save']}")
    assert os.path.isfile(os.path.join(checkpoint, "trainer_state.json"))
    assert not os.path.exists(os.path.join(killed_out, "config.json")), "the killed run must not have finished"

    resumed_log = str(tmp_path / "resumed.jsonl")
    run_cli(argv(killed_out, resumed_log, "--resume_from_checkpoint", checkpoint))
    before = {s: v for s, v in _losses(killed_log).items() if s <= c["save"]}
    after = _losses(resumed_log)
    assert sorted(after) == list(range(c["save"] + 1, c["steps"] + 1))
    curve = {**before, **after}
    assert sorted(curve) == sorted(reference)
    for step in reference:
        assert abs(curve[step] - reference[step]) <= 1e-6, (
            f"step {step}: resumed {curve[step]!r} vs uninterrupted {reference[step]!r}\n"
            f"uninterrupted {reference}\nresumed {curve}")
    # and the final weights agree too
    a, b = _final_weights(full_out), _final_weights(killed_out)
    assert set(a) == set(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"final weights differ by {worst}"
