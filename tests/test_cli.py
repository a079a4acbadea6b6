"""CLI (one-shot and interactive), batch inference, streaming/stop strings, and the demo, end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from cambrian import inference
from cambrian.model import load_pretrained_model, save_pretrained
from cambrian.model.tiny import build_tiny_model
from cambrian.serve import cli


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = build_tiny_model("llama")
    save_pretrained(model, str(root / "ckpt"), save_towers=True)
    Image.new("RGB", (48, 32), (250, 10, 10)).save(root / "red.png")
    Image.new("RGB", (32, 48), (10, 10, 250)).save(root / "blue.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def test_one_shot_matches_the_python_api(checkpoint, capsys):
    args = ["--model-path", str(checkpoint / "ckpt"), "--image-file", str(checkpoint / "red.png"),
            "--query", "What color is it?", "--max-new-tokens", "6", "--no-stream"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    _, model, _, _ = load_pretrained_model(str(checkpoint / "ckpt"))
    expected = model.generate(images=[str(checkpoint / "red.png")], prompts=["What color is it?"], max_new_tokens=6)[0]
    assert printed == expected
    # streaming prints the same text, piece by piece
    assert cli.main(args[:-1]) == 0
    assert expected in capsys.readouterr().out


def test_streaming_callback_concatenates_to_the_answer(checkpoint):
    _, model, _, _ = load_pretrained_model(str(checkpoint / "ckpt"))
    pieces = []
    answer = model.generate(images=[str(checkpoint / "blue.png")], prompts=["Describe the picture."], max_new_tokens=8,
                            stream_callback=pieces.append)[0]
    assert len(pieces) >= 1 and "".join(pieces).strip() == answer


def test_stop_strings_cut_the_answer(checkpoint):
    _, model, _, _ = load_pretrained_model(str(checkpoint / "ckpt"))
    full = model.generate(images=[None], prompts=["Hello there"], max_new_tokens=10)[0]
    if len(full) < 2:
        pytest.skip("the random model stopped at once")
    stop = full[1]
    cut = model.generate(images=[None], prompts=["Hello there"], max_new_tokens=10, stop=[stop])[0]
    assert stop not in cut and full.startswith(cut)


def test_sampling_is_seeded(checkpoint):
    _, model, _, _ = load_pretrained_model(str(checkpoint / "ckpt"))
    kw = dict(images=[str(checkpoint / "red.png")], prompts=["What is shown?"], max_new_tokens=6, temperature=1.0, top_p=0.9)
    assert model.generate(seed=3, **kw) == model.generate(seed=3, **kw)


def test_interactive_chat_keeps_history(checkpoint):
    cmd = [sys.executable, "-m", "cambrian.serve.cli", "--model-path", str(checkpoint / "ckpt"),
           "--image-file", str(checkpoint / "red.png"), "--max-new-tokens", "4"]
    run = subprocess.run(cmd, input="What color is it?\nAnd the shape?\n\n", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("ASSISTANT") + run.stdout.count("assistant") >= 2
    assert "Chatting with" in run.stdout


def test_cli_errors_are_clear(checkpoint, capsys):
    assert cli.main(["--model-path", str(checkpoint / "ckpt"), "--image-file", str(checkpoint / "broken.png"),
                     "--query", "hi"]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert cli.main(["--model-path", str(checkpoint / "missing"), "--query", "hi"]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--model-path", str(checkpoint / "ckpt"), "--tower-path", "no-equals-sign", "--query", "hi"])


def test_batch_inference_records_bad_lines_and_resumes(checkpoint, capsys):
    questions = checkpoint / "q.jsonl"
    lines = [
        {"question_id": 1, "image": "red.png", "text": "What color is it?"},
        {"question_id": 2, "image": ["red.png", "blue.png"], "text": "Which one is blue?"},
        "{this is not json",
        {"question_id": 4, "image": "missing.png", "text": "?"},
        {"question_id": 5, "image": "broken.png", "text": "?"},
        {"question_id": 6, "text": "A text-only question."},
        {"question_id": 7, "image": "blue.png"},
        {"question_id": 8, "image": "blue.png", "question": "What shape?"},
    ]
    questions.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    out = checkpoint / "answers.jsonl"
    base = ["--model-path", str(checkpoint / "ckpt"), "--image-folder", str(checkpoint), "--questions", str(questions),
            "--output-file", str(out), "--batch-size", "2", "--max-new-tokens", "3"]
    assert inference.main(base) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 8
    by_id = {r["question_id"]: r for r in rows}
    assert {1, 2, 6, 8} <= {k for k, r in by_id.items() if "text" in r}
    errors = {k: r["error"] for k, r in by_id.items() if "error" in r}
    assert set(errors) == {"line-3", 4, 5, 7}
    assert "malformed JSON" in errors["line-3"] and "missing.png" in errors[4] and "broken.png" in errors[5]
    # the answer for a question does not depend on its batch neighbours
    _, model, _, _ = load_pretrained_model(str(checkpoint / "ckpt"))
    assert by_id[1]["text"] == model.generate(images=[str(checkpoint / "red.png")], prompts=["What color is it?"],
                                              max_new_tokens=3)[0]
    # resume: everything is done, nothing is added
    assert inference.main(base + ["--resume"]) == 0
    assert len(out.read_text().splitlines()) == 8


def test_image_placement_follows_the_checkpoint(checkpoint, capsys):
    """A model trained with the image after the question (config.image_after_question) is prompted that way by
    `generate` and the CLI; an explicit <image> in the question is kept where it is."""
    from cambrian.mm_utils import place_images
    from cambrian.model.generation import build_prompt

    assert place_images("What is it?", 1) == "<image>\nWhat is it?"
    assert place_images("What is it?", 2, after_question=True) == "What is it?\n<image>\n<image>"
    assert place_images("Look: <image> what?", 1, after_question=True) == "Look: <image> what?"
    assert place_images("What is it?", 0, after_question=True) == "What is it?"
    assert build_prompt("vicuna_v1", "Q?", 1, image_after_question=True).endswith("USER: Q?\n<image> ASSISTANT:")
    _, model, _, _ = load_pretrained_model(str(checkpoint / "ckpt"))
    image = str(checkpoint / "red.png")
    before = model.generate(images=[image], prompts=["What color is it?"], max_new_tokens=6)[0]
    model.config.image_after_question = True
    after = model.generate(images=[image], prompts=["What color is it?"], max_new_tokens=6)[0]
    assert after == model.generate(images=[image], prompts=["What color is it?\n<image>"], max_new_tokens=6)[0]
    model.config.image_after_question = False
    assert before == model.generate(images=[image], prompts=["<image>\nWhat color is it?"], max_new_tokens=6)[0]


def test_role_labels_drop_template_markup():
    assert cli.role_label("<start_of_turn>model\n") == "model"
    assert cli.role_label("<|im_start|>assistant\n") == "assistant"
    assert cli.role_label("<|user|>\n") == "user"
    assert cli.role_label("ASSISTANT") == "ASSISTANT"


def test_help_explains(capsys):
    for main in (cli.main, inference.main):
        with pytest.raises(SystemExit) as exc:
            main(["--help"])
        assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--tower-path" in text and "--resume" in text and "--image-folder" in text
