"""The synthetic shapes data set: determinism, answerability (checked independently of the generator), splits,
files, scoring."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from cambrian.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from cambrian.data import LazySupervisedDataset
from cambrian.data import synthetic as S
from cambrian.model.image_processing import ImageProcessor
from cambrian.model.tiny import tiny_tokenizer

ALLOWED = {
    "color": set(S.COLORS), "shape": set(S.SHAPES), "count": set(S.NUMBER_WORDS[:5]),
    "position": set(S.SHAPES), "size": set(S.SIZES),
}


def _matching(objects, desc):
    words = desc.split()
    return [o for o in objects if all(w in (o.shape, o.color, o.size) for w in words)]


def _one(objects, desc):
    found = _matching(objects, desc)
    assert len(found) == 1, f"{desc!r} names {len(found)} objects"
    return found[0]


def check_answer(sample):
    """Re-derive the answer from the scene by parsing the question (independent of the generator's code)."""
    q, objs = sample.question, sample.objects
    if m := re.fullmatch(r"What color is the (.+)\?", q):
        return _one(objs, m[1]).color
    if m := re.fullmatch(r"What shape is the (.+) object\?", q):
        return _one(objs, m[1]).shape
    if q == "How many shapes are there?":
        return S.NUMBER_WORDS[len(objs)]
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", q):
        assert m[1] in S.COLORS
        return S.NUMBER_WORDS[sum(o.color == m[1] for o in objs)]
    if m := re.fullmatch(r"How many (\w+)s are there\?", q):
        assert m[1] in S.SHAPES
        return S.NUMBER_WORDS[sum(o.shape == m[1] for o in objs)]
    if m := re.fullmatch(r"Which shape is (further left|further right|higher|lower)\?", q):
        assert len(objs) == 2, "relative-position questions are about two-object scenes"
        a, b = objs
        assert a.shape != b.shape, "the shape word must tell the two objects apart"
        key = {"further left": lambda o: o.col, "further right": lambda o: -o.col,
               "higher": lambda o: o.row, "lower": lambda o: -o.row}[m[1]]
        assert key(a) != key(b), "the two objects must differ along the asked direction"
        return min((a, b), key=key).shape
    if m := re.fullmatch(r"What size is the (.+)\?", q):
        assert not set(m[1].split()) & set(S.SIZES), "the question must not give the answer away"
        return _one(objs, m[1]).size
    raise AssertionError(f"unknown question form {q!r}")


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_deterministic_per_seed_and_per_sample():
    a = S.generate(60, seed=3)
    b = S.generate(60, seed=3)
    assert [(s.objects, s.question, s.answer, s.qtype) for s in a] == [(s.objects, s.question, s.answer, s.qtype) for s in b]
    assert all(png_bytes(x.image) == png_bytes(y.image) for x, y in zip(a[:10], b[:10]))
    c = S.generate(60, seed=4)
    assert [s.objects for s in a] != [s.objects for s in c]
    # Sample i depends only on (seed, split, i): a longer run starts with the shorter one.
    assert [s.question for s in S.generate(20, seed=3)] == [s.question for s in a[:20]]
    assert [s.id for s in S.generate(3, seed=3, start=7)] == ["train-000007", "train-000008", "train-000009"]
    assert S.generate(3, seed=3, start=7)[0].question == a[7].question


def test_every_question_is_unambiguous_and_correct():
    samples = S.generate(1500, seed=0)
    by_type = Counter(s.qtype for s in samples)
    assert by_type == {q: 300 for q in S.QUESTION_TYPES}  # balanced: type i mod 5
    answers = {q: Counter() for q in S.QUESTION_TYPES}
    for s in samples:
        assert check_answer(s) == s.answer, (s.question, s.objects)
        assert s.answer in ALLOWED[s.qtype] and len(s.answer.split()) == 1
        answers[s.qtype][s.answer] += 1
        cells = [(o.row, o.col) for o in s.objects]
        assert len(set(cells)) == len(cells) and 1 <= len(cells) <= 4
    for q, allowed in ALLOWED.items():
        assert set(answers[q]) == allowed, q  # every answer value occurs
    # No single answer dominates a question type (a model cannot score well by always giving one answer).
    assert max(c.most_common(1)[0][1] / sum(c.values()) for c in answers.values()) < 0.6


def test_images_show_what_the_scene_says():
    cfg = S.SyntheticConfig()
    cell = cfg.image_size / cfg.grid
    for s in S.generate(150, seed=1):
        px = np.asarray(s.image)
        assert px.shape == (64, 64, 3)
        for o in s.objects:
            cy, cx = int((o.row + 0.5) * cell), int((o.col + 0.5) * cell)
            assert tuple(px[cy, cx]) == S.COLORS[o.color]
            # the object's colour fills a small or large area of its cell
            y0, x0 = int(o.row * cell), int(o.col * cell)
            patch = px[y0:y0 + int(cell) + 1, x0:x0 + int(cell) + 1]
            area = int((patch == np.array(S.COLORS[o.color])).all(-1).sum())
            # measured: small 40-76 px, large 157-277 px (triangles smallest, circles largest)
            assert (area > 120) if o.size == "large" else (30 < area < 90), (o, area)
        # empty cells are background only
        occupied = {(o.row, o.col) for o in s.objects}
        for r in range(cfg.grid):
            for c in range(cfg.grid):
                if (r, c) not in occupied:
                    patch = px[int(r * cell) + 1:int((r + 1) * cell) - 1, int(c * cell) + 1:int((c + 1) * cell) - 1]
                    assert (patch == np.array(cfg.background)).all()


def test_splits_are_disjoint_and_balanced():
    train, heldout = S.make_splits(800, 200, seed=0)
    assert len(train) == 800 and len(heldout) == 200
    assert not {s.scene_key for s in heldout} & {s.scene_key for s in train}  # no held-out image seen in training
    assert not {s.id for s in train} & {s.id for s in heldout}
    assert Counter(s.qtype for s in heldout) == {q: 40 for q in S.QUESTION_TYPES}
    again = S.make_splits(800, 200, seed=0)[1]
    assert [s.question for s in again] == [s.question for s in heldout]


def test_config_options_and_validation():
    cfg = S.SyntheticConfig(image_size=48, grid=4, max_shapes=6, jitter=0.05, question_types=("count", "color"))
    samples = S.generate(40, seed=2, config=cfg)
    assert {s.qtype for s in samples} == {"count", "color"} and samples[0].image.size == (48, 48)
    assert max(len(s.objects) for s in samples) > 4
    assert all(check_answer(s) == s.answer for s in samples)
    with pytest.raises(ValueError):
        S.SyntheticConfig(max_shapes=10)
    with pytest.raises(ValueError):
        S.SyntheticConfig(jitter=0.2)
    with pytest.raises(ValueError):
        S.SyntheticConfig(question_types=("weather",))


def test_score_per_type_and_overall():
    refs = [("red", "color"), ("two", "count"), ("circle", "position"), ("small", "size")]
    scores = S.score(["Red.", "2", "square", "small, I think"], refs)
    assert scores == {"color": 1.0, "count": 1.0, "position": 0.0, "size": 1.0, "overall": 0.75}
    samples = S.generate(10, seed=0)
    assert S.score([s.answer for s in samples], samples)["overall"] == 1.0
    records = [s.to_record("x.png") for s in samples]
    assert S.score(["nope"] * 10, records)["overall"] == 0.0
    text = S.format_scores(scores)
    assert text.splitlines()[-1] == "held-out accuracy: 75.0%" and "position" in text
    with pytest.raises(ValueError):
        S.score(["a"], refs)
    assert S.normalize_answer("  Four!") == "four" and S.normalize_answer("") == ""


def test_in_memory_records_train_through_the_dataset():
    tok = tiny_tokenizer("llama_3")
    procs = [ImageProcessor(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), ImageProcessor(64, (0.5,) * 3, (0.5,) * 3)]
    samples = S.generate(5, seed=0)
    ds = LazySupervisedDataset(S.to_records(samples), tok, procs, template="llama_3")
    assert all(l > 0 for l in ds.modality_lengths)
    for i, s in enumerate(samples):
        item = ds[i]
        assert item["image_sizes"] == [(64, 64)] and item["pixel_values"][1].shape == (1, 3, 64, 64)
        assert (item["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 1
        trained = tok.decode([t for t in item["labels"].tolist() if t != IGNORE_INDEX])
        assert trained == s.answer + "<|eot_id|>"
    words = set(" ".join(S.tokenizer_corpus()).replace("?", " ").split())
    used = {w.strip("?") for s in S.generate(300, seed=0) for w in (s.question + " " + s.answer).split()}
    assert used <= words


def test_question_first_records_put_the_image_after_the_question():
    tok = tiny_tokenizer("llama_3")
    procs = [ImageProcessor(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    samples = S.generate(3, seed=0)
    records = S.to_records(samples, question_first=True)
    assert [r["conversations"][0]["value"] for r in records] == [s.question + "\n<image>" for s in samples]
    ds = LazySupervisedDataset(records, tok, procs, template="llama_3")
    for i, s in enumerate(samples):
        ids = ds[i]["input_ids"].tolist()
        image_at = ids.index(IMAGE_TOKEN_INDEX)
        assert s.question.split()[-1] in tok.decode(ids[:image_at])  # the whole question precedes the image
        assert tok.decode([t for t in ds[i]["labels"].tolist() if t != IGNORE_INDEX]) == s.answer + "<|eot_id|>"


def test_cli_writes_llava_jsonl_and_pngs(tmp_path):
    out = tmp_path / "shapes"
    proc = subprocess.run([sys.executable, "-m", "cambrian.data.synthetic", "--output-dir", str(out),
                           "--train", "25", "--heldout", "10", "--seed", "0", "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train: 25 samples" in proc.stdout and "heldout: 10 samples" in proc.stdout
    train, heldout = S.make_splits(25, 10, seed=0)
    for split, samples in (("train", train), ("heldout", heldout)):
        lines = (out / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == len(samples)
        for line, s in zip(lines, samples):
            r = json.loads(line)
            assert r["id"] == s.id and r["answer"] == s.answer and r["question_type"] == s.qtype
            assert r["conversations"] == [{"from": "human", "value": "<image>\n" + s.question},
                                          {"from": "gpt", "value": s.answer}]
            assert r["image"] == f"images/{split}/{s.id}.png"
            assert (out / r["image"]).read_bytes() == png_bytes(s.image)  # same pixels as in memory
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"] == {"train": 25, "heldout": 10} and meta["seed"] == 0
    # The written set loads with the LLaVA dataset (image paths relative to the JSONL file).
    tok = tiny_tokenizer("llama_3")
    ds = LazySupervisedDataset(str(out / "heldout.jsonl"), tok, ImageProcessor(32, (0.5,) * 3, (0.5,) * 3))
    assert all(not isinstance(ds[i], S.SyntheticSample) and ds[i]["image_sizes"] == [(64, 64)] for i in range(10))
    assert sum(ds.skipped.values()) == 0
