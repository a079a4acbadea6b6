"""LLaVA-format data: JSON/JSONL loading, the offset index, images, label masking, truncation, bad records,
collation, grouped batching, and one collated batch through a tiny model."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cambrian.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from cambrian.data import (
    BATCH_META_KEY,
    DataCollatorForSupervisedDataset,
    LazySupervisedDataset,
    LengthGroupedSampler,
    SkippedRecord,
    SkipTracker,
    pop_batch_meta,
    truncate_example,
)
from cambrian.data import dataset as dataset_mod
from cambrian.data.sampler import modality_length_grouped_batches
from cambrian.model.tiny import build_tiny_model, tiny_tokenizer, tiny_vision_towers

TEMPLATES = ("llama_3", "vicuna_v1", "chatml_direct")


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def toks():
    return {t: tiny_tokenizer(t) for t in TEMPLATES}


@pytest.fixture(scope="module")
def processors():
    return [t.processor for t in tiny_vision_towers()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Images: red 40×30, blue 20×50, green 32×32; a corrupt file and a truncated PNG."""
    d = tmp_path_factory.mktemp("imgs")
    Image.new("RGB", (40, 30), (220, 30, 30)).save(d / "red.png")
    Image.new("RGB", (20, 50), (30, 30, 220)).save(d / "blue.png")
    Image.new("RGB", (32, 32), (30, 200, 30)).save(d / "green.png")
    (d / "corrupt.png").write_bytes(b"this is not an image")
    full = (d / "red.png").read_bytes()
    (d / "truncated.png").write_bytes(full[: len(full) // 2])
    return d


def write_jsonl(path, records, raw_lines=()):
    """Write records (dicts) one per line; `raw_lines` maps position -> a literal line inserted there."""
    lines = [json.dumps(r) for r in records]
    for pos, raw in raw_lines:
        lines.insert(pos, raw)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def rec(id_, question="What color is it?", answer="red", image="red.png", **extra):
    conv = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    r = {"id": id_, "conversations": conv, **extra}
    if image is not None:
        r["image"] = image
    return r


def trained_text(tok, item):
    return tok.decode([t for t in item["labels"].tolist() if t != IGNORE_INDEX])


# ---------------------------------------------------------------------------------------------- loading
def test_json_and_jsonl_give_identical_items(tmp_path, folder, toks, processors):
    records = [rec("a", "<image>\nWhat color is it?", "red"), rec("b", "Say hi.", "hi", image=None),
               rec("c", "<image>\nAnd this?", "blue", image="blue.png")]
    (tmp_path / "d.json").write_text(json.dumps(records))
    write_jsonl(tmp_path / "d.jsonl", records)
    kw = dict(tokenizer=toks["llama_3"], processors=processors, template="llama_3", image_folder=str(folder))
    a = LazySupervisedDataset(str(tmp_path / "d.json"), **kw)
    b = LazySupervisedDataset(str(tmp_path / "d.jsonl"), **kw)
    c = LazySupervisedDataset(records, **kw)  # in-memory records
    assert len(a) == len(b) == len(c) == 3
    assert a.index_source is None and b.index_source == "built"
    for i in range(3):
        x, y, z = a[i], b[i], c[i]
        assert x["id"] == y["id"] == z["id"] == records[i]["id"]
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], z["labels"])
        if x["pixel_values"] is None:
            assert y["pixel_values"] is None and x["image_sizes"] == []
        else:
            assert all(torch.equal(p, q) for p, q in zip(x["pixel_values"], y["pixel_values"]))
    assert b.modality_lengths == [6, -3, 4]  # word counts ("<image>" is a word), sign = modality (LLaVA)
    assert b.lengths == [6 + 128, 3, 4 + 128]


def test_images_relative_to_data_file_by_default(tmp_path, toks, processors):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "x.png")
    write_jsonl(tmp_path / "d.jsonl", [rec("a", image="x.png")])
    ds = LazySupervisedDataset(str(tmp_path / "d.jsonl"), toks["llama_3"], processors)
    assert ds[0]["image_sizes"] == [(8, 8)]


def test_jsonl_index_is_cached_reused_and_invalidated(tmp_path, folder, toks, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [rec(str(i), image=None) for i in range(5)])
    ds = LazySupervisedDataset(str(path), toks["llama_3"])
    assert ds.index_source == "built" and ds.index_path == str(path) + ".idx.npz"
    assert os.path.exists(ds.index_path)

    def no_rebuild(_path):
        raise AssertionError("the cached index should have been used")

    monkeypatch.setattr(dataset_mod, "build_jsonl_index", no_rebuild)
    again = LazySupervisedDataset(str(path), toks["llama_3"])
    assert again.index_source == "cache" and len(again) == 5
    assert [again[i]["id"] for i in range(5)] == ["0", "1", "2", "3", "4"]
    monkeypatch.undo()

    # The file changes (size + mtime): the stale cache is ignored and rebuilt.
    with open(path, "a") as f:
        f.write(json.dumps(rec("5", image=None)) + "\n")
    fresh = LazySupervisedDataset(str(path), toks["llama_3"])
    assert fresh.index_source == "built" and len(fresh) == 6 and fresh[5]["id"] == "5"
    # Blank lines are not records; line numbers stay exact.
    path.write_text("\n" + json.dumps(rec("x", image=None)) + "\n\n" + "{broken\n")
    ds = LazySupervisedDataset(str(path), toks["llama_3"])
    assert len(ds) == 2 and ds[0]["id"] == "x"
    assert ds[1].reason == "malformed_json" and ds[1].line == 4


def test_index_falls_back_to_memory_when_folder_is_read_only(tmp_path, toks, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [rec(str(i), image=None) for i in range(3)])

    def read_only(*_args, **_kw):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(dataset_mod.os, "replace", read_only)
    with pytest.warns(UserWarning, match="keeping it in memory"):
        ds = LazySupervisedDataset(str(path), toks["llama_3"])
    assert ds.index_path is None and ds.index_source == "built"
    assert [ds[i]["id"] for i in range(3)] == ["0", "1", "2"]
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl"]  # no temp file left behind
    # An explicit cache directory also works (for read-only data folders).
    monkeypatch.undo()
    ds = LazySupervisedDataset(str(path), toks["llama_3"], index_cache=str(tmp_path / "cache"))
    assert ds.index_path == str(tmp_path / "cache" / "d.jsonl.idx.npz")


class _SpyFile:
    """Wraps the dataset's file handle; records every call so the test can check an item reads only its line."""

    def __init__(self, fh):
        self.fh, self.calls = fh, []

    def seek(self, pos, whence=0):
        self.calls.append(("seek", pos))
        return self.fh.seek(pos, whence)

    def readline(self, *a):
        line = self.fh.readline(*a)
        self.calls.append(("readline", line))
        return line

    def __getattr__(self, name):  # read(), readlines(), iteration ... would be a rescan
        raise AssertionError(f"unexpected file call {name}")


def test_getitem_is_o1_seek_and_readline_of_its_own_line(tmp_path, toks, monkeypatch):
    records = [rec(f"r{i}", "word " * (i + 1), "ok", image=None) for i in range(50)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    raw_lines = path.read_bytes().splitlines(keepends=True)
    offsets = np.cumsum([0] + [len(x) for x in raw_lines])[:-1]
    ds = LazySupervisedDataset(str(path), toks["llama_3"])
    opens = []
    real_open = ds._open_data_file

    def counting_open():
        fh = real_open()
        opens.append(fh)
        return spy

    spy = _SpyFile(real_open())
    monkeypatch.setattr(ds, "_open_data_file", counting_open)
    for i in [49, 0, 17, 17, 3, 48]:
        spy.calls.clear()
        item = ds[i]
        assert item["id"] == f"r{i}"
        assert spy.calls == [("seek", int(offsets[i])), ("readline", raw_lines[i])]
    # The real file was opened once for all those reads (per process), not once per item.
    assert len({id(f) for f in opens}) == 1


def test_file_handle_reopened_per_process_and_dataset_pickles(tmp_path, toks):
    import pickle

    path = write_jsonl(tmp_path / "d.jsonl", [rec(str(i), image=None) for i in range(3)])
    ds = LazySupervisedDataset(str(path), toks["llama_3"])
    assert ds[1]["id"] == "1"
    ds._fh_pid = -1  # pretend we are a forked worker: must not reuse the parent's file position
    old = ds._fh
    assert ds[2]["id"] == "2" and ds._fh is not old
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._fh is None and clone[0]["id"] == "0"


# ---------------------------------------------------------------------------------------------- images
def test_multiple_images_in_reading_order(tmp_path, folder, toks, processors):
    r = {"id": "m", "image": ["red.png", "blue.png", "green.png"], "conversations": [
        {"from": "human", "value": "<image>\nFirst?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "<image> and <image>: colours?"}, {"from": "gpt", "value": "blue green"}]}
    ds = LazySupervisedDataset([r], toks["llama_3"], processors, image_folder=str(folder))
    item = ds[0]
    assert (item["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 3
    assert item["image_sizes"] == [(40, 30), (20, 50), (32, 32)]
    for p, proc in zip(item["pixel_values"], processors):
        assert p.shape == (3, 3, proc.image_size, proc.image_size)
    # Image k's pixels are image k's (pad colour aside, the centre pixel is the image colour).
    conv = processors[0]
    centre = item["pixel_values"][0][:, :, conv.image_size // 2, conv.image_size // 2]  # (3 images, 3 channels)
    mean, std = torch.tensor(conv.image_mean), torch.tensor(conv.image_std)
    rgb = ((centre * std + mean) * 255).round()
    assert rgb.argmax(dim=1).tolist() == [0, 2, 1]  # red, blue, green
    assert (item["labels"][item["input_ids"] == IMAGE_TOKEN_INDEX] == IGNORE_INDEX).all()
    assert ds.modality_lengths == [9]


def test_missing_placeholder_is_prepended_like_llava(folder, toks, processors):
    one = rec("1", "What color is it?", "red")
    two = rec("2", "What colors?", "red blue", image=["red.png", "blue.png"])
    ds = LazySupervisedDataset([one, two], toks["llama_3"], processors, image_folder=str(folder))
    tok = toks["llama_3"]
    for i, n in ((0, 1), (1, 2)):
        ids = ds[i]["input_ids"].tolist()
        k = ids.index(IMAGE_TOKEN_INDEX)
        assert ids.count(IMAGE_TOKEN_INDEX) == n
        # "<image>\n" * n goes right at the start of the first user message
        assert tok.decode(ids[:k]).endswith("<|start_header_id|>user<|end_header_id|>")
        after = tok.decode([t for t in ids[k:] if t != IMAGE_TOKEN_INDEX])
        assert after.startswith("\n" * n + ("What color is it?" if i == 0 else "What colors?"))


def test_text_only_samples(toks, processors):
    ds = LazySupervisedDataset([rec("t", "Hello there.", "Hi.", image=None)], toks["llama_3"], processors)
    item = ds[0]
    assert item["pixel_values"] is None and item["image_sizes"] == []
    assert IMAGE_TOKEN_INDEX not in item["input_ids"].tolist()
    assert ds.modality_lengths == [-3]
    # A text-only dataset needs no image processors at all.
    assert LazySupervisedDataset([rec("t", image=None)], toks["llama_3"])[0]["pixel_values"] is None


@pytest.mark.parametrize("template,expected", [
    ("llama_3", "red<|eot_id|>circle<|eot_id|>"),
    ("vicuna_v1", " red</s> circle</s>"),
    ("chatml_direct", "red<|im_end|>circle<|im_end|>"),
])
def test_label_masking_per_template(folder, toks, processors, template, expected):
    tok = toks[template]
    r = {"id": "x", "image": "red.png", "conversations": [
        {"from": "system", "value": "Answer the question using a single word or phrase."},
        {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "Shape?"}, {"from": "gpt", "value": "circle"}]}
    item = LazySupervisedDataset([r], tok, processors, template=template, image_folder=str(folder))[0]
    ids, labels = item["input_ids"], item["labels"]
    kept = labels != IGNORE_INDEX
    assert torch.equal(labels[kept], ids[kept])  # labels are the input ids where trained
    assert trained_text(tok, item) == expected  # exactly the replies and their stop strings
    text = tok.decode([t for t in ids.tolist() if t != IMAGE_TOKEN_INDEX])
    assert "Answer the question using a single word or phrase." in text  # system turn used, not trained
    assert "Cambrian" not in text and "curious user" not in text  # ... in place of the template's default
    # The trained tokens are contiguous runs that each end with the template's stop token.
    stop = {"llama_3": "<|eot_id|>", "vicuna_v1": "</s>", "chatml_direct": "<|im_end|>"}[template]
    runs = np.split(np.flatnonzero(kept.numpy()), np.flatnonzero(np.diff(np.flatnonzero(kept.numpy())) != 1) + 1)
    assert len(runs) == 2
    assert all(tok.decode([int(ids[r[-1]])]) == stop for r in runs)


def test_plain_template_trains_image_then_caption(folder, processors):
    tok = tiny_tokenizer("plain")
    r = rec("p", "<image>\nRender a clear and concise summary of the photo.", "A red square.")
    item = LazySupervisedDataset([r], tok, processors, template="plain", image_folder=str(folder))[0]
    ids = item["input_ids"].tolist()
    assert ids[:2] == [tok.bos_token_id, IMAGE_TOKEN_INDEX]  # LLaVA preprocess_plain: "<image>" + caption + "\n"
    assert tok.decode(ids[2:]) == "A red square.\n"
    assert trained_text(tok, item) == "A red square.\n"


def test_images_without_processors_is_a_configuration_error(folder, toks):
    with pytest.raises(ValueError, match="no image processors"):
        LazySupervisedDataset([rec("a")], toks["llama_3"], image_folder=str(folder))


def test_leading_gpt_turn_dropped_like_llava(toks):
    r = {"id": "g", "conversations": [{"from": "gpt", "value": "orphan"}, {"from": "human", "value": "Hi?"},
                                      {"from": "gpt", "value": "yes"}]}
    item = LazySupervisedDataset([r], toks["llama_3"])[0]
    assert trained_text(toks["llama_3"], item) == "yes<|eot_id|>"


# ---------------------------------------------------------------------------------------------- truncation
def test_truncate_example_never_splits_an_image():
    I = IMAGE_TOKEN_INDEX
    ids = [1, 2, I, 3, 4, I, 5]
    labs = [-100, -100, -100, -100, 4, -100, 5]
    assert truncate_example(ids, labs, 7) == (ids, labs, 2)
    assert truncate_example(ids, labs, 5) == (ids[:5], labs[:5], 1)
    # an image costs 10: the first fits in 12 (2 + 10), the second one does not fit -> cut before it
    assert truncate_example(ids, labs, 16, image_token_len=10) == (ids[:5], labs[:5], 1)
    # 2 + 10 > 11: the first image would be cut, so it goes (and everything after it)
    assert truncate_example(ids, labs, 11, image_token_len=10) == (ids[:2], labs[:2], 0)
    assert truncate_example(ids, labs, 25, image_token_len=10) == (ids, labs, 2)


def test_truncation_keeps_images_consistent_with_placeholders(folder, toks, processors):
    tok = toks["llama_3"]
    r = {"id": "t", "image": ["red.png", "blue.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "<image>\nAnd this one?"}, {"from": "gpt", "value": "blue"}]}
    full = LazySupervisedDataset([r], tok, processors, image_folder=str(folder))[0]
    ids = full["input_ids"].tolist()
    second = [k for k, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX][1]
    for max_len in (second, second + 1, len(ids)):
        item = LazySupervisedDataset([r], tok, processors, image_folder=str(folder), model_max_length=max_len)[0]
        n_ph = int((item["input_ids"] == IMAGE_TOKEN_INDEX).sum())
        assert len(item["input_ids"]) == len(item["labels"]) == max_len
        assert n_ph == (1 if max_len <= second else 2)
        assert [p.shape[0] for p in item["pixel_values"]] == [n_ph] * 4
        assert item["image_sizes"] == [(40, 30), (20, 50)][:n_ph]
        assert item["input_ids"].tolist() == ids[:max_len]
    # With each image costing 17 tokens (a 4×4 grid + newlines), the second image is dropped as soon as it
    # does not fit entirely, even though its placeholder would.
    budget = second + 1 + 16 - 1  # placeholder position fits, its 17 tokens do not
    item = LazySupervisedDataset([r], tok, processors, image_folder=str(folder), model_max_length=budget,
                                 image_token_len=17)[0]
    assert int((item["input_ids"] == IMAGE_TOKEN_INDEX).sum()) == 1 and item["image_sizes"] == [(40, 30)]
    assert len(item["input_ids"]) + 16 <= budget
    assert trained_text(tok, item) == "red<|eot_id|>"


def test_truncation_that_removes_every_reply_skips_the_record(folder, toks, processors):
    ds = LazySupervisedDataset([rec("long", "<image>\nWhat color is it?", "red")], toks["llama_3"], processors,
                               image_folder=str(folder), model_max_length=10)
    out = ds[0]
    assert isinstance(out, SkippedRecord) and out.reason == "truncated_no_target"


# ---------------------------------------------------------------------------------------------- bad records
BAD_KINDS = ["malformed_json", "invalid_record", "empty_conversation", "invalid_conversation",
             "no_assistant_turn", "image_placeholder_mismatch", "missing_image", "unreadable_image"]


def make_bad_file(path):
    good1 = rec("good1", "<image>\nColor?", "red")
    good2 = rec("good2", "Hello.", "hi", image=None)
    records = [
        good1,
        rec("missing", image="nope.png"),
        rec("corrupt", image="corrupt.png"),
        rec("truncated_png", image="truncated.png"),
        {"id": "empty", "image": "red.png", "conversations": []},
        {"id": "noconv", "image": "red.png"},
        {"id": "badrole", "conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"id": "badvalue", "conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "y"}]},
        {"id": "noanswer", "conversations": [{"from": "human", "value": "Anyone?"}]},
        rec("mismatch", "<image>\n<image>\nTwo?", "one"),
        good2,
    ]
    raw = [(2, '{"id": "broken", "conversations": [}'), (5, "[1, 2, 3]")]
    return write_jsonl(path, records, raw), {
        "missing_image": 1, "unreadable_image": 2, "empty_conversation": 2, "invalid_conversation": 2,
        "no_assistant_turn": 1, "image_placeholder_mismatch": 1, "malformed_json": 1, "invalid_record": 1}


def test_every_bad_record_kind_is_skipped_counted_reported_not_replaced(tmp_path, folder, toks, processors):
    path, expected = make_bad_file(tmp_path / "bad.jsonl")
    ds = LazySupervisedDataset(str(path), toks["llama_3"], processors, image_folder=str(folder),
                               max_skip_examples=5)
    assert len(ds) == 13
    collator = DataCollatorForSupervisedDataset(toks["llama_3"])
    loader = DataLoader(ds, batch_size=13, shuffle=False, collate_fn=collator)
    batches = list(loader)
    assert len(batches) == 1
    batch = batches[0]
    meta = pop_batch_meta(batch)
    # The batch really has only the two good items, in their own places: nothing was substituted.
    assert batch["input_ids"].shape[0] == 2 and meta["num_samples"] == 2
    assert meta["ids"] == ["good1", "good2"]
    assert meta["num_skipped"] == 11 and meta["skipped_reasons"] == expected
    assert len(batch["image_sizes"]) == 1 and batch["images"][0].shape[0] == 1
    assert set(expected) == set(BAD_KINDS)
    # Dataset-side counters (this process) agree, and the report names every reason and the first examples.
    assert dict(ds.skipped) == expected
    report = ds.report()
    for reason in expected:
        assert reason in report
    assert "11 skipped of 13 records" in report
    assert len(ds.skipped_examples) == 5 and "first 5 skipped" in report
    by_id = {r.id: r for r in meta["skipped"]}
    assert by_id["missing"].reason == "missing_image" and "nope.png" in by_id["missing"].detail
    assert by_id["corrupt"].reason == "unreadable_image"
    assert by_id["truncated_png"].reason == "unreadable_image"
    broken = [r for r in meta["skipped"] if r.reason == "malformed_json"][0]
    assert broken.line == 3 and broken.index == 2 and broken.id is None
    # A second epoch does not double-count distinct bad records on the dataset side.
    list(loader)
    assert sum(ds.skipped.values()) == 11


def test_skip_counts_exact_with_dataloader_workers(tmp_path, folder, toks, processors):
    path, expected = make_bad_file(tmp_path / "bad.jsonl")
    ds = LazySupervisedDataset(str(path), toks["llama_3"], processors, image_folder=str(folder))
    loader = DataLoader(ds, batch_size=3, shuffle=False, num_workers=2,
                        collate_fn=DataCollatorForSupervisedDataset(toks["llama_3"]))
    tracker = SkipTracker()
    ids = []
    for batch in loader:
        meta = batch.pop(BATCH_META_KEY)
        tracker.update_from_batch(meta)
        ids += meta["ids"]
        assert batch["input_ids"].shape[0] == meta["num_samples"]
    assert ids == ["good1", "good2"]
    assert dict(tracker.counts) == expected and tracker.seen == 13
    assert sum(ds.skipped.values()) == 0  # the workers' copies counted, not this one: use the batches
    assert "11 skipped of 13 records" in tracker.report()


# ---------------------------------------------------------------------------------------------- collator
def _item(ids, labels, n_img=0, R=(4, 8), sizes=None, id_=None):
    pix = None
    if n_img:
        pix = [torch.full((n_img, 3, r, r), float(ids[0])) for r in R]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pix,
            "image_sizes": sizes or [(10 + k, 20) for k in range(n_img)], "id": id_}


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_and_concatenates_images_in_order(toks, side):
    tok = toks["llama_3"]
    pad = tok.pad_token_id
    items = [_item([5, IMAGE_TOKEN_INDEX, 6], [-100, -100, 6], n_img=1, sizes=[(1, 2)], id_="a"),
             _item([7, 8], [7, 8], id_="text"),
             SkippedRecord(index=2, reason="missing_image"),
             _item([9, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, 1, 2], [-100, -100, -100, 1, 2], n_img=2,
                   sizes=[(3, 4), (5, 6)], id_="b")]
    batch = DataCollatorForSupervisedDataset(tok, padding_side=side)(items)
    meta = batch.pop(BATCH_META_KEY)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "images", "image_sizes"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, 5)
    row1 = batch["input_ids"][1].tolist()
    assert row1 == ([7, 8, pad, pad, pad] if side == "right" else [pad, pad, pad, 7, 8])
    assert batch["labels"][1].tolist() == ([7, 8] + [IGNORE_INDEX] * 3 if side == "right" else [IGNORE_INDEX] * 3 + [7, 8])
    assert batch["attention_mask"].sum(1).tolist() == [3, 2, 5]
    assert [t.shape for t in batch["images"]] == [(3, 3, 4, 4), (3, 3, 8, 8)]
    assert batch["images"][0][:, 0, 0, 0].tolist() == [5.0, 9.0, 9.0]  # item a's image, then b's two
    assert batch["image_sizes"] == [(1, 2), (3, 4), (5, 6)]
    assert meta["num_skipped"] == 1 and meta["skipped_reasons"] == {"missing_image": 1}
    assert meta["ids"] == ["a", "text", "b"]


def test_collator_all_text_and_all_skipped(toks):
    col = DataCollatorForSupervisedDataset(toks["llama_3"])
    b = col([_item([1, 2], [1, 2]), _item([3], [3])])
    assert b["images"] is None and b["image_sizes"] == [] and b["input_ids"].shape == (2, 2)
    b = col([SkippedRecord(0, "malformed_json"), None])
    assert b["input_ids"].shape == (0, 0) and b["images"] is None
    assert b[BATCH_META_KEY]["num_samples"] == 0
    assert b[BATCH_META_KEY]["skipped_reasons"] == {"malformed_json": 1, "unknown": 1}


# ---------------------------------------------------------------------------------------------- sampler
def _lengths(n=203, seed=0):
    rng = np.random.default_rng(seed)
    mags = rng.integers(1, 500, size=n)
    return np.where(rng.random(n) < 0.6, mags, -mags).tolist()


@pytest.mark.parametrize("batch_size,world_size,mult", [(4, 1, 1), (3, 2, 1), (5, 1, 8), (2, 4, 3)])
def test_grouped_sampler_pure_complete_deterministic(batch_size, world_size, mult):
    lengths = _lengths()
    s = LengthGroupedSampler(lengths, batch_size, world_size=world_size, seed=7, mega_batch_mult=mult)
    epoch0 = list(s)
    assert len(epoch0) == len(s)
    flat = [i for b in epoch0 for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    for b in epoch0:
        assert 1 <= len(b) <= batch_size
        assert len({lengths[i] > 0 for i in b}) == 1  # modality-pure
    assert sum(len(b) < batch_size for b in epoch0) <= 2  # at most one short batch per modality
    assert list(s) == epoch0  # same epoch, same order
    again = LengthGroupedSampler(lengths, batch_size, world_size=world_size, seed=7, mega_batch_mult=mult)
    assert list(again) == epoch0
    s.set_epoch(1)
    epoch1 = list(s)
    assert epoch1 != epoch0 and sorted(i for b in epoch1 for i in b) == list(range(len(lengths)))
    assert list(LengthGroupedSampler(lengths, batch_size, world_size=world_size, seed=8,
                                     mega_batch_mult=mult)) != epoch0


def test_grouped_sampler_groups_lengths_and_balances_ranks():
    lengths = _lengths(4000, seed=1)
    mags = np.abs(lengths)
    # A large mega-batch sorts many samples together: batches are much tighter in length than random ones.
    batches = modality_length_grouped_batches(lengths, 8, world_size=1, seed=0, mega_batch_mult=50)
    spread = np.mean([mags[b].max() - mags[b].min() for b in batches if len(b) == 8])
    rng = np.random.default_rng(0)
    random_spread = np.mean([np.ptp(mags[rng.choice(4000, 8, replace=False)]) for _ in range(200)])
    assert spread < random_spread / 5
    # world_size 2: the two batches of a step have similar total lengths (LLaVA's even chunks).
    batches = modality_length_grouped_batches(lengths, 8, world_size=2, seed=0, mega_batch_mult=1)
    steps = [(batches[k], batches[k + 1]) for k in range(0, len(batches) - 4, 2)]
    imbalance = np.mean([abs(mags[a].sum() - mags[b].sum()) / (mags[a].sum() + mags[b].sum()) for a, b in steps])
    assert imbalance < 0.1


def test_grouped_sampler_ranks_and_resume():
    lengths = _lengths(101)
    ranks = [LengthGroupedSampler(lengths, 4, world_size=3, rank=r, seed=1) for r in range(3)]
    per_rank = [list(s) for s in ranks]
    assert len({len(p) for p in per_rank}) == 1 and all(len(p) == len(s) for p, s in zip(per_rank, ranks))
    flat = [i for p in per_rank for b in p for i in b]
    assert set(flat) == set(range(101))  # all covered; padding repeats at most world_size - 1 batches
    assert len(flat) - 101 <= 2 * 4
    full = LengthGroupedSampler(lengths, 4, world_size=3, seed=1)
    assert per_rank[0] == list(full)[0::3][: len(per_rank[0])]
    # Resume mid-epoch: skip the batches already done, then the next epoch starts from the beginning.
    s = LengthGroupedSampler(lengths, 4, seed=3)
    s.set_epoch(2)
    order = list(s)
    s.set_epoch(2, start_batch=5)
    assert list(s) == order[5:]
    assert list(s) == order
    # drop_last keeps only full batches.
    dl = LengthGroupedSampler(lengths, 4, seed=3, drop_last=True)
    assert all(len(b) == 4 for b in dl) and len(list(dl)) == len(dl)
    # Without modality grouping, plain length grouping over everything (batches may mix).
    mixed = list(LengthGroupedSampler(np.abs(lengths), 4, seed=3, group_by_modality=False))
    assert sorted(i for b in mixed for i in b) == list(range(101))


def test_sampler_with_dataloader_and_dataset_lengths(tmp_path, folder, toks, processors):
    records = [rec(f"m{i}", "<image>\n" + "q " * i, "red") for i in range(6)]
    records += [rec(f"t{i}", "q " * i + "?", "hi", image=None) for i in range(5)]
    ds = LazySupervisedDataset(records, toks["llama_3"], processors, image_folder=str(folder))
    sampler = LengthGroupedSampler(ds.modality_lengths, batch_size=4, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=DataCollatorForSupervisedDataset(toks["llama_3"]))
    seen = []
    for batch in loader:
        meta = pop_batch_meta(batch)
        kinds = {i[0] for i in meta["ids"]}
        assert len(kinds) == 1  # modality-pure
        assert (batch["images"] is None) == (kinds == {"t"})
        seen += meta["ids"]
    assert sorted(seen) == sorted(r["id"] for r in records)


# ---------------------------------------------------------------------------------------------- model smoke test
def test_collated_batch_trains_a_tiny_model(folder, toks):
    tok = toks["llama_3"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_tiny_model("llama", tokenizer=tok).train()
    records = [rec("a", "<image>\nWhat color is it?", "red"),
               {"id": "b", "image": ["blue.png", "green.png"], "conversations": [
                   {"from": "human", "value": "<image>\n<image>\nColors?"}, {"from": "gpt", "value": "blue green"}]},
               rec("c", "Say hi.", "hi", image=None),
               rec("d", image="nope.png")]
    ds = LazySupervisedDataset(records, tok, model.vision_towers, template="llama_3", image_folder=str(folder),
                               model_max_length=512)
    batch = DataCollatorForSupervisedDataset(tok)([ds[i] for i in range(len(ds))])
    meta = pop_batch_meta(batch)
    assert meta["num_samples"] == 3 and meta["skipped_reasons"] == {"missing_image": 1}
    assert batch["images"][0].shape[0] == 3 and len(batch["image_sizes"]) == 3
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    assert model.connector.vision_query.grad is not None
    assert torch.isfinite(model.connector.vision_query.grad).all()
    assert model.llm.get_input_embeddings().weight.grad.abs().sum() > 0
