"""Tiny deterministic tokenizer for tests (byte-level BPE trained offline, < 512 ids).

    from helpers_tokenizer import make_test_tokenizer
    tok = make_test_tokenizer()                                   # bos <s>, eos </s>, pad <pad>
    tok3 = make_test_tokenizer(template="llama_3")   # bos <|begin_of_text|>, eos <|eot_id|> (Llama-3 style)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from cambrian.tokenizer_utils import DEFAULT_CORPUS, DEFAULT_SPECIAL_TOKENS, train_tokenizer

TEMPLATE_VECTORS = Path(__file__).resolve().parents[2] / "shared" / "design" / "template_vectors.json"

# Extra sentences so that words used in the tests get a few merges.
_TEST_CORPUS = DEFAULT_CORPUS + (
    "What is shown? A cat. Color? Black.",
    "<image>\nWhat is shown?",
    "A photo of a dog. A photo of a cat. The sky is blue.",
)


def make_test_tokenizer(
    special_tokens: Sequence[str] | None = None,
    vocab_size: int = 384,
    template: str | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = "<pad>",
    unk_token: str | None = "<unk>",
    add_bos_token: bool = True,
):
    """A small real `PreTrainedTokenizerFast` (vocab <= `vocab_size` < 512), same ids on every call.
    bos/eos default to the template's (cambrian.tokenizer_utils.TEMPLATE_BOS_EOS), else <s> / </s>."""
    if vocab_size >= 512:
        raise ValueError("keep the test tokenizer under 512 ids")
    return train_tokenizer(
        _TEST_CORPUS, vocab_size=vocab_size,
        special_tokens=DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens, template=template,
        bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, unk_token=unk_token,
        add_bos_token=add_bos_token,
    )


def load_template_vectors() -> dict:
    """The released templates' prompt strings (shared/design/template_vectors.json)."""
    return json.loads(TEMPLATE_VECTORS.read_text())
