"""The built-in demo model: the committed checkpoint scores what its recipe says, and a short training run of a
smaller version (the same code path as `make demo --retrain`) learns far above chance."""
from __future__ import annotations

import json
import os
from collections import Counter

import pytest

from cambrian import demo
from cambrian.data import synthetic as S

from test_train import one_thread


def majority_baseline(train, heldout) -> float:
    """Held-out accuracy of always answering the most frequent train answer of the question's type."""
    by_type: dict[str, Counter] = {}
    for s in train:
        by_type.setdefault(s.qtype, Counter())[s.answer] += 1
    best = {q: c.most_common(1)[0][0] for q, c in by_type.items()}
    return sum(best[s.qtype] == s.answer for s in heldout) / len(heldout)


def test_committed_checkpoint_scores_as_recorded():
    """The committed model still scores what `make demo-model` measured when it trained it, and meets the target."""
    with open(os.path.join(demo.COMMITTED_CHECKPOINT, "demo_recipe.json"), encoding="utf-8") as f:
        recorded_recipe = json.load(f)
    with open(os.path.join(demo.COMMITTED_CHECKPOINT, demo.SCORES_FILE), encoding="utf-8") as f:
        recorded = json.load(f)
    recipe = demo.DemoRecipe()
    assert recorded_recipe["n_train"] == recipe.n_train and recorded_recipe["seed"] == recipe.seed
    _, heldout = recipe.splits()
    assert recorded["n_heldout"] == len(heldout)
    scores = demo.evaluate(demo.COMMITTED_CHECKPOINT, heldout, progress=False)
    assert scores["overall"] >= 0.95, scores
    for qtype, value in recorded["scores"].items():  # greedy decoding: the same answers up to float rounding
        assert abs(scores[qtype] - value) <= 0.01, (qtype, scores, recorded)


def test_short_training_run_learns_far_above_chance(tmp_path, capsys):
    """The demo recipe on a smaller task (three question types, 600 steps): the same code path as `make demo`."""
    recipe = demo.DemoRecipe(question_types=("color", "shape", "size"), n_train=4000, n_heldout=200,
                             stage1_steps=10, stage2_steps=600)
    with one_thread():
        model_dir = demo.train_demo_model(str(tmp_path), recipe, log=lambda *a: None)
    for part in ("config.json", "model.safetensors", "demo_recipe.json", "cambrian_template.txt"):
        assert os.path.isfile(os.path.join(model_dir, part)), part
    assert os.path.isdir(os.path.join(model_dir, "vision_towers"))
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["image_after_question"] is True
    train, heldout = recipe.splits()
    scores = demo.evaluate(model_dir, heldout, progress=False)
    chance = majority_baseline(train, heldout)
    print(f"short demo run: {scores}, majority baseline {chance:.3f}")
    assert scores["overall"] >= chance + 0.25, (scores, chance)


def test_demo_cli_uses_a_checkpoint_and_answers(tmp_path, capsys):
    """`python -m cambrian.demo` with an existing checkpoint: no training, per-type scores, the final line, and
    an answer through the CLI."""
    recipe = demo.DemoRecipe(n_train=200, n_heldout=20, stage1_steps=0, stage2_steps=2)
    model_dir = demo.train_demo_model(str(tmp_path / "run"), recipe, log=lambda *a: None)
    capsys.readouterr()
    assert demo.main(["--output-dir", str(tmp_path / "out"), "--checkpoint", model_dir,
                      "--train-samples", "200", "--heldout-samples", "20"]) == 0
    out = capsys.readouterr().out
    assert "using the trained demo model" in out and "stage 2" not in out
    lines = out.splitlines()
    scored = [line for line in lines if line.startswith("held-out accuracy: ")]
    assert len(scored) == 1 and scored[0].endswith("%")
    for qtype in S.QUESTION_TYPES:
        assert any(line.strip().startswith(qtype) for line in lines), qtype
    assert "model: " in out  # the CLI's answer line (gemma template role "model")
    assert (tmp_path / "out" / "example.png").exists()


def test_damaged_checkpoint_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    assert demo.main(["--output-dir", str(tmp_path / "out"), "--checkpoint", str(bad), "--train-samples", "50",
                      "--heldout-samples", "5"]) == 2
    err = capsys.readouterr().err
    assert "cannot load the demo model" in err and "--retrain" in err
