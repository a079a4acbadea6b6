"""Chat templates (byte-identical to the released prompts), image-token placement and training-label masking."""
from __future__ import annotations

import warnings

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from cambrian.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from cambrian.conversation import TEMPLATES, Conversation, default_template_for, get_template
from cambrian.mm_utils import TokenizationMismatchError, build_training_example, tokenizer_image_token
from helpers_tokenizer import TEMPLATE_VECTORS, load_template_vectors, make_test_tokenizer

RELEASED = ("llama_3", "vicuna_v1", "chatml_direct")
CONVERSATION = [("user", "<image>\nWhat is shown?"), ("assistant", "A cat."), ("user", "Color?")]


def _vectors() -> dict:
    # shared/ stands beside the repository on every developer machine and in CI
    assert TEMPLATE_VECTORS.exists(), f"missing {TEMPLATE_VECTORS}"
    return load_template_vectors()


def _open_prompt(name: str, messages) -> str:
    conv = get_template(name)
    for role, text in messages:
        conv.append_message(role, text)
    conv.append_message("assistant", None)
    return conv.get_prompt()


# ----------------------------------------------------------------------------------------------- templates
@pytest.mark.parametrize("name", RELEASED)
def test_released_templates_byte_identical(name):
    vec = _vectors()[name]
    if "conversation" in vec:
        assert [tuple(m) for m in vec["conversation"]] == CONVERSATION
    assert _open_prompt(name, CONVERSATION[:1]) == vec["single_turn"]
    assert _open_prompt(name, CONVERSATION) == vec["two_turns"]
    # add_generation_prompt gives the same open turn
    conv = get_template(name)
    for role, text in CONVERSATION:
        conv.append_message(role, text)
    assert conv.get_prompt(add_generation_prompt=True) == vec["two_turns"]


def test_llama3_system_text_kept_verbatim():
    system = get_template("llama_3").system
    assert system.count("\n    ") == 2 and system.endswith("questions. ")
    assert "<|end_header_id|>\n" not in _open_prompt("llama_3", CONVERSATION)


# Standard chat formats of the other supported LLMs.
OTHER_EXPECTED = {
    "phi3": (
        "<|system|>\nYou are a helpful AI assistant.<|end|>\n"
        "<|user|>\n<image>\nWhat is shown?<|end|>\n<|assistant|>\nA cat.<|end|>\n"
        "<|user|>\nColor?<|end|>\n<|assistant|>\n"
    ),
    "gemma": (
        "<start_of_turn>user\n<image>\nWhat is shown?<end_of_turn>\n<start_of_turn>model\nA cat.<end_of_turn>\n"
        "<start_of_turn>user\nColor?<end_of_turn>\n<start_of_turn>model\n"
    ),
    "mistral_instruct": "[INST] <image>\nWhat is shown? [/INST] A cat.</s>[INST] Color? [/INST]",
}


@pytest.mark.parametrize("name", sorted(OTHER_EXPECTED))
def test_other_templates(name):
    assert _open_prompt(name, CONVERSATION) == OTHER_EXPECTED[name]


def test_single_turn_other_templates():
    assert _open_prompt("gemma", CONVERSATION[:1]) == (
        "<start_of_turn>user\n<image>\nWhat is shown?<end_of_turn>\n<start_of_turn>model\n")
    assert _open_prompt("mistral_instruct", CONVERSATION[:1]) == "[INST] <image>\nWhat is shown? [/INST]"
    assert _open_prompt("phi3", CONVERSATION[:1]).endswith("<|end|>\n<|assistant|>\n")


def test_system_folded_into_first_user_turn_when_template_has_no_system_block():
    conv = get_template("mistral_instruct")
    conv.system = "Be brief."
    conv.append_message("user", "Hi")
    conv.append_message("assistant", None)
    assert conv.get_prompt() == "[INST] Be brief.\n\nHi [/INST]"


def test_plain_template():
    conv = get_template("plain")
    conv.append_message("user", "<image>")
    conv.append_message("assistant", "A cat on a mat.")
    assert conv.get_prompt() == "<image>A cat on a mat.\n"
    assert conv.stop_str == "\n"


def test_stop_strings_and_roles():
    stops = {name: get_template(name).stop_str for name in TEMPLATES}
    assert stops == {"llama_3": "<|eot_id|>", "vicuna_v1": "</s>", "chatml_direct": "<|im_end|>",
                     "phi3": "<|end|>", "gemma": "<end_of_turn>", "mistral_instruct": "</s>", "plain": "\n"}
    conv = get_template("chatml_direct")
    conv.append_message(conv.roles[0], "hi")  # released role string
    conv.append_message("human", "hi")        # LLaVA role name
    conv.append_message("gpt", "yo")
    conv.append_message("ASSISTANT", "yo")
    assert [m[0] for m in conv.messages] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="unknown role"):
        conv.append_message("narrator", "x")
    with pytest.raises(ValueError, match="open"):
        conv.append_message("user", None)


def test_get_template_returns_fresh_copy_and_copy_is_independent():
    a = get_template("vicuna_v1")
    a.append_message("user", "hi")
    b = get_template("vicuna_v1")
    assert b.messages == [] and TEMPLATES["vicuna_v1"].messages == []
    c = a.copy()
    c.append_message("assistant", "yo")
    c.messages[0][1] = "changed"
    assert a.messages == [[0, "hi"]]
    assert isinstance(c, Conversation)
    assert get_template("llama_v3").get_prompt() == get_template("llama_3").get_prompt()  # released alias


def test_segments_concatenate_to_prompt():
    for name in TEMPLATES:
        conv = get_template(name)
        for role, text in CONVERSATION + [("assistant", "Black.")]:
            conv.append_message(role, text)
        segs = conv.segments()
        assert "".join(s.text for s in segs) == conv.get_prompt()
        replies = [s.text for s in segs if s.kind == "assistant_reply"]
        assert len(replies) == 2 and all(r.endswith(conv.stop_str) for r in replies)


def test_unknown_template_error_lists_known_names():
    with pytest.raises(ValueError) as err:
        get_template("llama_4")
    for name in TEMPLATES:
        assert name in str(err.value)


@pytest.mark.parametrize("name_or_type, vocab, expected", [
    ("nyu-visionx/cambrian-8b", None, "llama_3"),
    ("nyu-visionx/cambrian-13b", None, "vicuna_v1"),
    ("nyu-visionx/cambrian-34b", None, "chatml_direct"),
    ("nyu-visionx/cambrian-phi3-3b", None, "phi3"),
    ("llama", 128256, "llama_3"),
    ("llama", 32000, "vicuna_v1"),
    ("meta-llama/Meta-Llama-3-8B-Instruct", None, "llama_3"),
    ("NousResearch/Nous-Hermes-2-Yi-34B", None, "chatml_direct"),
    ("phi3", None, "phi3"),
    ("gemma2", None, "gemma"),
    ("mistral", None, "mistral_instruct"),
    ("something-else", None, "vicuna_v1"),
    (None, None, "vicuna_v1"),
])
def test_default_template_for(name_or_type, vocab, expected):
    assert default_template_for(name_or_type, vocab_size=vocab) == expected


# ----------------------------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def tok():
    return make_test_tokenizer()


@pytest.fixture(scope="module")
def tok_llama3():
    # Like Meta's Llama-3 tokenizer: adds <|begin_of_text|> by itself.
    return make_test_tokenizer(template="llama_3")


@pytest.fixture(scope="module")
def template_tokenizers():
    """One tokenizer per template, bos/eos chosen from the template (cambrian.tokenizer_utils.TEMPLATE_BOS_EOS)."""
    return {name: make_test_tokenizer(template=name) for name in TEMPLATES}


def test_template_tokenizers_bos_eos(template_tokenizers, tok_llama3):
    assert (tok_llama3.bos_token, tok_llama3.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    for name, tk in template_tokenizers.items():
        assert len(tk) < 512
        stop = get_template(name).stop_str
        if stop != "\n":  # every other stop string is a single special token, and the tokenizer's eos
            assert tk.eos_token == stop and len(tk.encode(stop, add_special_tokens=False)) == 1
    assert template_tokenizers["gemma"].bos_token == "<bos>"
    with pytest.raises(ValueError, match="known templates"):
        make_test_tokenizer(template="nope")


def test_test_tokenizer_small_deterministic_and_round_trips(tmp_path, tok):
    assert len(tok) < 512
    again = make_test_tokenizer()
    assert again.get_vocab() == tok.get_vocab()
    text = _open_prompt("llama_3", CONVERSATION)
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == text
    for special in ("<|eot_id|>", "<|im_start|>", "<|start_header_id|>", "</s>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>" and tok.bos_token == "<s>"
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.encode(text) == ids
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


def test_tokenizer_image_token_positions(tok):
    prompt = _open_prompt("vicuna_v1", [("user", "<image>\nWhat is shown? <image> and<image>")])
    ids = tokenizer_image_token(prompt, tok)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids.count(IMAGE_TOKEN_INDEX) == 3
    # Each -200 sits exactly where "<image>" was: the text pieces between them tokenize to the ids between them.
    pieces = prompt.split("<image>")
    pos = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
    bounds = [0] + pos + [len(ids)]
    for k, piece in enumerate(pieces):
        start = 1 if k == 0 else bounds[k] + 1
        assert ids[start:bounds[k + 1]] == tok.encode(piece, add_special_tokens=False)
    # Same as LLaVA's per-chunk semantics for a BOS-adding tokenizer.
    chunks = [tok(c).input_ids for c in prompt.split("<image>")]
    llava = [chunks[0][0]]
    for k, c in enumerate(chunks):
        llava += ([IMAGE_TOKEN_INDEX] if k else []) + c[1:]
    assert ids == llava
    t = tokenizer_image_token(prompt, tok, return_tensors="pt")
    assert t.dtype == torch.long and t.tolist() == ids
    with pytest.raises(ValueError):
        tokenizer_image_token(prompt, tok, return_tensors="np")


def test_tokenizer_image_token_bos_once(tok_llama3):
    prompt = _open_prompt("llama_3", CONVERSATION)  # starts with the literal "<|begin_of_text|>"
    ids = tokenizer_image_token(prompt, tok_llama3)
    bos = tok_llama3.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1
    assert ids.index(IMAGE_TOKEN_INDEX) == len(tokenizer_image_token(prompt.split("<image>")[0], tok_llama3))
    # A tokenizer that does not add BOS keeps the text's BOS and loses nothing after the image.
    no_bos = make_test_tokenizer(template="llama_3", add_bos_token=False)
    ids2 = tokenizer_image_token(prompt, no_bos)
    assert ids2 == ids and no_bos.decode(ids2[ids2.index(IMAGE_TOKEN_INDEX) + 1:]) == prompt.split("<image>")[1]
    # No BOS anywhere: none added.
    plain_ids = tokenizer_image_token("<image>hi", no_bos)
    assert plain_ids[0] == IMAGE_TOKEN_INDEX and no_bos.decode(plain_ids[1:]) == "hi"


# ----------------------------------------------------------------------------------------------- training labels
TRAIN_MESSAGES = [("user", "<image>\nWhat is shown?"), ("assistant", "A cat."),
                  ("user", "Color?"), ("assistant", "Black and white.")]


def _label_spans(input_ids, labels):
    spans, cur = [], []
    for t, lab in zip(input_ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == t
            cur.append(lab)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return spans


# template -> (text before each reply that the model generates, stop string)
REPLY_FORMS = {"llama_3": ("", "<|eot_id|>"), "vicuna_v1": (" ", "</s>"), "chatml_direct": ("", "<|im_end|>"),
               "phi3": ("", "<|end|>"), "gemma": ("", "<end_of_turn>"), "mistral_instruct": (" ", "</s>")}


@pytest.mark.parametrize("name", sorted(REPLY_FORMS))
@pytest.mark.parametrize("own_tokenizer", [False, True], ids=["shared-tok", "template-tok"])
def test_training_labels_are_exactly_the_replies(name, own_tokenizer, tok, tok_llama3, template_tokenizers):
    tk = template_tokenizers[name] if own_tokenizer else (tok_llama3 if name == "llama_3" else tok)
    ids, labels = build_training_example(TRAIN_MESSAGES, tk, name)
    assert len(ids) == len(labels)
    conv = get_template(name)
    for role, text in TRAIN_MESSAGES:
        conv.append_message(role, text)
    assert ids == tokenizer_image_token(conv.get_prompt(), tk)  # one-shot tokenization of the full prompt
    lead, stop = REPLY_FORMS[name]
    spans = [tk.decode(s) for s in _label_spans(ids, labels)]
    assert spans == [lead + "A cat." + stop, lead + "Black and white." + stop]
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and labels[ids.index(IMAGE_TOKEN_INDEX)] == IGNORE_INDEX
    assert labels[0] == IGNORE_INDEX and ids.count(tk.bos_token_id) == 1
    # The stop token is a single trained token right at the end of each span.
    stop_id = tk.convert_tokens_to_ids(stop)
    assert [s[-1] for s in _label_spans(ids, labels)] == [stop_id, stop_id]


def test_training_llava_roles_and_dicts(tok):
    a = build_training_example(TRAIN_MESSAGES, tok, "vicuna_v1")
    b = build_training_example([("human", m[1]) if m[0] == "user" else ("gpt", m[1]) for m in TRAIN_MESSAGES],
                               tok, "vicuna_v1")
    c = build_training_example([{"from": "human" if r == "user" else "gpt", "value": t} for r, t in TRAIN_MESSAGES],
                               tok, get_template("vicuna_v1"))
    assert a == b == c


def test_training_plain_template(tok):
    ids, labels = build_training_example([("human", "<image>"), ("gpt", "A photo of a dog.")], tok, "plain")
    assert ids[:2] == [tok.bos_token_id, IMAGE_TOKEN_INDEX]
    assert labels[:2] == [IGNORE_INDEX, IGNORE_INDEX]
    assert tok.decode(labels[2:]) == "A photo of a dog.\n" and ids[2:] == labels[2:]


def test_training_system_override(tok):
    ids, labels = build_training_example([("system", "Be brief.")] + TRAIN_MESSAGES, tok, "chatml_direct")
    assert tok.decode(ids[1:ids.index(IMAGE_TOKEN_INDEX)]) == "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n"
    assert [tok.decode(s) for s in _label_spans(ids, labels)] == ["A cat.<|im_end|>", "Black and white.<|im_end|>"]


def test_training_truncation(tok):
    ids, labels = build_training_example(TRAIN_MESSAGES, tok, "vicuna_v1")
    first_label = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    for n in (5, first_label + 2, len(ids), len(ids) + 10):
        ids_n, labels_n = build_training_example(TRAIN_MESSAGES, tok, "vicuna_v1", max_length=n)
        assert ids_n == ids[:n] and labels_n == labels[:n] and len(ids_n) == min(n, len(ids))
    with pytest.raises(ValueError):
        build_training_example(TRAIN_MESSAGES, tok, "vicuna_v1", max_length=0)


def _merging_tokenizer():
    """Byte-level BPE *without* the word-splitting regex: merges run across spaces and punctuation, so
    "ASSISTANT:" + " A" tokenizes differently alone and in context."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t.train_from_iterator(["ASSISTANT: A cat. ASSISTANT: A dog. USER: Color? ASSISTANT: A"] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_training_boundary_merge_strict_raises_and_fallback_is_exact():
    tk = _merging_tokenizer()
    msgs = [("user", "Color?"), ("assistant", "A cat.")]
    with pytest.raises(TokenizationMismatchError, match="merges across the turn boundary"):
        build_training_example(msgs, tk, "vicuna_v1", strict=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids, labels = build_training_example(msgs, tk, "vicuna_v1")
    assert any("pieces separately" in str(w.message) for w in caught)
    assert [tk.decode(s) for s in _label_spans(ids, labels)] == [" A cat.</s>"]
    assert tk.decode(ids) == get_template("vicuna_v1").system + " USER: Color? ASSISTANT: A cat.</s>"


def test_training_metaspace_tokenizer(tok):
    """SentencePiece-style tokenizer (Llama-2/Vicuna): prefix tokenization still lines up."""
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>", "<s>", "</s>"],
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.:?'\n, "),
                                  show_progress=False)
    t.train_from_iterator([get_template("vicuna_v1").system, "USER: What is shown? ASSISTANT: A cat."],
                          trainer=trainer)
    tk = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    ids, labels = build_training_example(TRAIN_MESSAGES, tk, "vicuna_v1", strict=True)
    spans = _label_spans(ids, labels)
    assert [tk.decode(s).strip() for s in spans] == ["A cat.</s>", "Black and white.</s>"]
    assert all(s[-1] == tk.eos_token_id for s in spans)
