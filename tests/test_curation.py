"""Cambrian-10M curation: per-source cap, category re-balancing, short-answer system prompt, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from cambrian.data import curation as C

PROMPT = "Answer the question using a single word or phrase."


def make_record(source, category, k, short=True, image=True, with_category=True, prompt_in_question=False):
    q = "What is it?" + (" " + PROMPT if prompt_in_question else "")
    a = "a red car" if short else "It is a red car parked by the road."
    r = {"id": f"{source}-{k}", "source": source,
         "conversations": [{"from": "human", "value": "<image>\n" + q if image else q},
                           {"from": "gpt", "value": a}]}
    if with_category:
        r["category"] = category
    if image:
        r["image"] = f"{source}/{k}.jpg"
    return r


# source -> (category, size); General has 2 sources, one above the cap.
POOL = {"vqa_big": ("General", 900), "chat": ("General", 150), "ocr_a": ("OCR", 500), "text": ("Language", 300),
        "count": ("Counting", 120), "math": ("Math", 90), "code": ("Code", 12), "sci": ("Science", 15)}


def write_pool(tmp_path, malformed=0):
    paths = []
    for source, (cat, n) in POOL.items():
        p = tmp_path / f"{source}.jsonl"
        with open(p, "w") as f:
            for k in range(n):
                f.write(json.dumps(make_record(source, cat, k, short=k % 3 != 0, image=cat != "Language")) + "\n")
            for _ in range(malformed if source == "chat" else 0):
                f.write('{"id": broken\n')
        paths.append(str(p))
    return paths


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------- helpers
def test_default_ratios_sum_to_100_40_and_are_normalised():
    assert sum(C.DEFAULT_RATIOS.values()) == pytest.approx(100.40)
    norm = C.normalize_ratios(C.DEFAULT_RATIOS)
    assert sum(norm.values()) == pytest.approx(1.0)
    assert norm["General"] == pytest.approx(34.52 / 100.40)


def test_allocate_is_exact_and_within_rounding():
    for total in (0, 1, 7, 1000, 12345):
        counts = C.allocate(total, C.DEFAULT_RATIOS)
        assert sum(counts.values()) == total
        norm = C.normalize_ratios(C.DEFAULT_RATIOS)
        assert all(abs(counts[k] - total * norm[k]) < 1 for k in counts)


@pytest.mark.parametrize("text,short", [
    ("Yes", True), ("2", True), ("3.5", True), ("New York City", True), ("a red car", True),
    ("It is red", True), ("It is very red", False), ("Yes.", False), ("What? No", False), ("", False), ("   ", False),
    ("one two three four", False), ("red; blue", False),
])
def test_is_short_answer(text, short):
    assert C.is_short_answer(text) is short


def test_short_answer_vqa_and_system_prompt_rules():
    r = make_record("s", "General", 0)
    assert C.is_short_answer_vqa(r)
    assert not C.is_short_answer_vqa(make_record("s", "General", 0, short=False))
    assert not C.is_short_answer_vqa(make_record("s", "General", 0, image=False))  # not VQA: no image
    multi = make_record("s", "General", 0)
    multi["conversations"] += [{"from": "human", "value": "Why?"}, {"from": "gpt", "value": "Because it is."}]
    assert not C.is_short_answer_vqa(multi)  # every answer must be short
    assert C.add_system_prompt(r) is True
    assert r["conversations"][0] == {"from": "system", "value": PROMPT}
    assert C.add_system_prompt(r) is False and len(r["conversations"]) == 3  # only once
    already = make_record("s", "General", 0, prompt_in_question=True)
    assert C.add_system_prompt(already) is False
    custom = make_record("s", "General", 0)
    custom["conversations"].insert(0, {"from": "system", "value": "Be nice."})
    assert C.add_system_prompt(custom) and custom["conversations"][0]["value"] == "Be nice. " + PROMPT


def test_cap_per_source_is_exact_and_seeded():
    codes = np.repeat([0, 1, 2], [1000, 350, 10]).astype(np.int32)
    codes = np.concatenate([codes, [-1]])
    keep = C.cap_per_source(codes, ["a", "b", "c"], cap=350, seed=0)
    assert [int(keep[codes == c].sum()) for c in range(3)] == [350, 350, 10] and not keep[-1]
    assert np.array_equal(keep, C.cap_per_source(codes, ["a", "b", "c"], cap=350, seed=0))
    assert not np.array_equal(keep, C.cap_per_source(codes, ["a", "b", "c"], cap=350, seed=1))


# ---------------------------------------------------------------------------------------------- curate
def test_curate_cap_ratios_and_system_prompt(tmp_path):
    paths = write_pool(tmp_path, malformed=3)
    out = tmp_path / "curated.jsonl"
    ratios = {"General": 50, "OCR": 30, "Language": 20}
    rep = C.curate(paths, str(out), cap=400, ratios=ratios, seed=0)
    records = read_jsonl(out)
    assert rep.n_malformed == 3 and rep.n_in == sum(n for _, n in POOL.values())
    # Cap: vqa_big 900 -> 400 exactly; the rest are below the cap.
    assert rep.sources["vqa_big"][0] == 900
    assert rep.n_after_cap == sum(min(n, 400) for _, n in POOL.values())
    # General: 400 + 150 = 550, OCR: 400 (capped), Language: 300.  Largest set with the exact ratios:
    # N = min(550 / .5, 400 / .3, 300 / .2) = 1100 -> 550 / 330 / 220.
    per_cat = Counter(r["category"] for r in records)
    assert dict(per_cat) == {"General": 550, "OCR": 330, "Language": 220} and rep.n_out == 1100
    assert rep.categories["General"][:2] == (550, 550) and rep.categories["OCR"][:2] == (400, 330)
    assert rep.categories["Math"][1] == 0  # categories without a target ratio are dropped (and noted)
    assert any("'Math' has no target ratio" in n for n in rep.notes)
    per_src = Counter(r["source"] for r in records)
    assert per_src["vqa_big"] <= 400 and per_src["vqa_big"] + per_src["chat"] == 550
    assert sum(rep.sources[s][1] for s in rep.sources) == 1100
    # System prompt: exactly the kept records with an image and short answers, nothing else.
    with_prompt = [r for r in records if r["conversations"][0]["from"] == "system"]
    assert all(r["conversations"][0]["value"] == PROMPT for r in with_prompt)
    expected = [r for r in records if r.get("image") and int(r["id"].rsplit("-", 1)[1]) % 3 != 0]
    assert {r["id"] for r in with_prompt} == {r["id"] for r in expected}
    assert rep.n_system_prompt == len(expected) > 0
    assert not any(r["category"] == "Language" and r["conversations"][0]["from"] == "system" for r in records)
    # Output keeps the input order.
    order = [(list(POOL).index(r["source"]), int(r["id"].rsplit("-", 1)[1])) for r in records]
    assert order == sorted(order)


def test_curate_default_ratios_with_target_size_and_determinism(tmp_path):
    paths = write_pool(tmp_path)
    out1, out2, out3 = (str(tmp_path / f"o{k}.jsonl") for k in range(3))
    rep = C.curate(paths, out1, cap=350, target_size=300, seed=5)
    counts = Counter(r["category"] for r in read_jsonl(out1))
    norm = C.normalize_ratios(C.DEFAULT_RATIOS)  # the 100.40% table, normalised
    assert sum(counts.values()) == 300
    for cat, share in norm.items():
        assert abs(counts[cat] - 300 * share) < 1, cat  # within rounding
        assert rep.categories[cat][2] == pytest.approx(share)
    assert counts == Counter(C.allocate(300, C.DEFAULT_RATIOS))
    assert "100.4" in rep.notes[0]
    table = rep.format_table()
    for word in ("source", "category", "share", "target", "vqa_big", "General", "34.38%"):
        assert word in table
    # Deterministic for a seed, different for another.
    C.curate(paths, out2, cap=350, target_size=300, seed=5)
    C.curate(paths, out3, cap=350, target_size=300, seed=6)
    assert open(out1).read() == open(out2).read() != open(out3).read()
    # Without a target size: the largest set with exactly these ratios, limited by the scarcest category.
    rep = C.curate(paths, out2, cap=350, seed=5)
    capped = Counter()
    for cat, n in POOL.values():
        capped[cat] += min(n, 350)
    n_max = int(min(capped[c] / norm[c] for c in norm))
    assert n_max == 1255  # Math: 90 / (7.20 / 100.40)
    assert rep.n_out == n_max
    # A target the pool cannot meet is clipped per category and reported.
    rep = C.curate(paths, out2, cap=350, target_size=5000, seed=5)
    assert rep.categories["Code"][1] == 12 and any("'Code': wanted" in n for n in rep.notes)


def test_curate_source_map_json_list_and_no_rebalancing(tmp_path):
    recs = [make_record("x", None, k, with_category=False) for k in range(20)]
    for r in recs:
        del r["source"]  # source = file name
    (tmp_path / "x.json").write_text(json.dumps(recs))
    out = tmp_path / "out.json"
    rep = C.curate([str(tmp_path / "x.json")], str(out), cap=8, ratios=None, source_map={"x": "OCR"},
                   system_prompt=None)
    data = json.loads(out.read_text())  # .json output is a list
    assert len(data) == 8 and rep.sources == {"x": (20, 8)} and rep.categories["OCR"][:2] == (8, 8)
    assert all(r["conversations"][0]["from"] == "human" for r in data)  # prompt disabled


def test_cli_end_to_end(tmp_path):
    paths = write_pool(tmp_path, malformed=1)
    ratios = tmp_path / "ratios.json"
    ratios.write_text(json.dumps({"General": 2, "OCR": 1, "Counting": 1}))
    out = tmp_path / "cli.jsonl"
    proc = subprocess.run([sys.executable, "-m", "cambrian.data.curation", "--inputs", *paths, "--output", str(out),
                           "--cap", "300", "--ratios", str(ratios), "--seed", "0"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(out)
    counts = Counter(r["category"] for r in records)
    # After the cap: General 300 + 150 = 450, OCR 300, Counting 120 -> N = min(450/.5, 300/.25, 120/.25) = 480
    assert dict(counts) == {"General": 240, "OCR": 120, "Counting": 120}
    assert "vqa_big" in proc.stdout and "wrote 480 records" in proc.stdout
    assert "malformed lines skipped: 1" in proc.stdout
    assert "50.00%" in proc.stdout and "25.00%" in proc.stdout
    assert "rec" in proc.stderr and "100%" in proc.stderr  # tqdm progress bar
    # The in-process entry point gives the same file.
    out2 = tmp_path / "cli2.jsonl"
    assert C.main(["--inputs", *paths, "--output", str(out2), "--cap", "300", "--ratios", str(ratios),
                   "--no-progress"]) == 0
    assert out.read_text() == out2.read_text()
