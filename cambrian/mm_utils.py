"""Prompt tokenization with image placeholders, and supervised training examples (input_ids + masked labels).

`<image>` in a prompt is never given to the tokenizer: the text is split on it and the marker becomes the single
id IMAGE_TOKEN_INDEX (-200); the model later replaces that position with the image's h*(w+1) tokens.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable, Sequence

from cambrian.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from cambrian.conversation import Conversation, get_template

__all__ = [
    "place_images",
    "tokenizer_image_token",
    "build_training_example",
    "normalize_messages",
    "TokenizationMismatchError",
]


def place_images(question: str, num_images: int, after_question: bool = False) -> str:
    """Add `num_images` `<image>` placeholders to a question that has none: "<image>\n" before it (LLaVA's layout)
    or, with `after_question` (models trained that way: `config.image_after_question`), "\n<image>" after it."""
    if not num_images or DEFAULT_IMAGE_TOKEN in question:
        return question
    if after_question:
        return question + ("\n" + DEFAULT_IMAGE_TOKEN) * num_images
    return (DEFAULT_IMAGE_TOKEN + "\n") * num_images + question


class TokenizationMismatchError(ValueError):
    """Tokenizing a prompt prefix does not give a prefix of the full prompt's tokens (the tokenizer merged
    characters across a turn boundary), so label spans cannot be placed exactly."""


def _auto_special_prefix(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts in front of any text by itself (typically [bos_id], or [] if it adds none)."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return list(full[:k])
    return []


def _encode_with_images(text: str, tokenizer: Any, image_token_index: int) -> list[int]:
    """Tokenize `text` without special tokens, each `<image>` becoming `image_token_index`."""
    ids: list[int] = []
    for i, chunk in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
        if i > 0:
            ids.append(image_token_index)
        if chunk:
            ids.extend(tokenizer.encode(chunk, add_special_tokens=False))
    return ids


def tokenizer_image_token(
    prompt: str,
    tokenizer: Any,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    return_tensors: str | None = None,
):
    """Tokenize `prompt`, replacing each "<image>" with `image_token_index`.

    Same result as LLaVA/Cambrian's function for the usual tokenizers: every chunk between "<image>" markers is
    tokenized on its own, and the BOS the tokenizer adds appears once, at the very start.  Differences, on
    purpose:
      * if the prompt text itself starts with the BOS token (llama_3's "<|begin_of_text|>") and the tokenizer
        also adds one, only one is kept (the released code would give two);
      * a tokenizer that does not add BOS never loses the first token of a chunk (the released code stripped
        the first token of every chunk whenever the text began with the BOS string);
      * an EOS that a tokenizer appends by itself is not added (a prompt is continued, not ended).

    Returns list[int], or a 1-D LongTensor with return_tensors="pt".
    """
    special_prefix = _auto_special_prefix(tokenizer)
    body = _encode_with_images(prompt, tokenizer, image_token_index)
    if special_prefix and body[: len(special_prefix)] == special_prefix:
        special_prefix = []  # the text already starts with BOS: keep one
    input_ids = special_prefix + body
    if return_tensors is None:
        return input_ids
    if return_tensors == "pt":
        import torch

        return torch.tensor(input_ids, dtype=torch.long)
    raise ValueError(f"unsupported return_tensors {return_tensors!r} (use None or 'pt')")


def normalize_messages(messages: Iterable[Any]) -> list[tuple[str, str]]:
    """Accept (role, text) pairs, LLaVA dicts {"from": "human"|"gpt", "value": ...} or chat dicts
    {"role": ..., "content": ...}; return (role, text) pairs."""
    out: list[tuple[str, str]] = []
    for m in messages:
        if isinstance(m, dict):
            role = m.get("from", m.get("role"))
            text = m.get("value", m.get("content"))
        else:
            role, text = m
        out.append((role, text))
    return out


def build_training_example(
    messages: Sequence[Any],
    tokenizer: Any,
    template: str | Conversation,
    max_length: int | None = None,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    strict: bool = False,
) -> tuple[list[int], list[int]]:
    """Tokenize a conversation for supervised training.

    Args:
        messages: (role, text) pairs, role 'user'/'assistant' (or 'human'/'gpt', or the template's role strings);
            LLaVA/chat dicts are accepted too.  An optional leading 'system' message overrides the template's
            system text.
        tokenizer: a Hugging Face tokenizer.
        template: a template name or a `Conversation` (its system text is used, its messages ignored).
        max_length: truncate input_ids and labels to this many ids (the image placeholder counts as one).
        strict: raise `TokenizationMismatchError` instead of falling back (see below).

    Returns:
        (input_ids, labels), equal-length lists.  input_ids == tokenizer_image_token(full prompt) and
        labels[i] == input_ids[i] exactly on the tokens of the assistant replies, each including its
        end-of-turn stop string (e.g. "<|eot_id|>", "</s>") so the model learns to stop; IGNORE_INDEX elsewhere
        (system, user turns, role headers, separators after the stop string, image placeholders).

    How the spans are found (template-agnostic): the conversation is rendered as segments; for each assistant
    reply the prompt prefixes that end just before and just after it are tokenized, and their lengths give the
    reply's token span.  Each prefix's tokens must be a prefix of the full prompt's tokens; this holds whenever
    the tokenizer does not merge characters across a turn boundary (true for the released templates, whose
    boundaries sit next to special tokens, spaces or newlines).  If it fails, the default is to fall back to
    tokenizing the text between boundaries piece by piece and concatenating (the ids then differ slightly from
    the one-shot tokenization, the labels stay exact) with a warning; `strict=True` raises instead.
    """
    conv = get_template(template) if isinstance(template, str) else template.copy().clear()
    for role, text in normalize_messages(messages):
        if isinstance(role, str) and role.strip().lower() == "system":
            conv.system = text
            continue
        if text is None:
            raise ValueError("training messages need text (got None)")
        conv.append_message(role, text)
    if not any(idx == 1 for idx, _ in conv.messages):
        warnings.warn("conversation has no assistant turn: every label is IGNORE_INDEX", stacklevel=2)

    segments = conv.segments()
    full = "".join(s.text for s in segments)
    # Character spans of the assistant replies.
    spans: list[tuple[int, int]] = []
    pos = 0
    for s in segments:
        if s.kind == "assistant_reply":
            spans.append((pos, pos + len(s.text)))
        pos += len(s.text)

    input_ids = tokenizer_image_token(full, tokenizer, image_token_index)
    boundaries = sorted({c for span in spans for c in span})
    tok_at: dict[int, int] = {}
    bad: int | None = None
    for c in boundaries:
        prefix_ids = input_ids if c == len(full) else tokenizer_image_token(full[:c], tokenizer, image_token_index)
        if input_ids[: len(prefix_ids)] != prefix_ids:
            bad = c
            break
        tok_at[c] = len(prefix_ids)

    if bad is not None:
        context = full[max(0, bad - 20): bad] + "|" + full[bad: bad + 20]
        msg = (f"template {conv.name!r}: the tokenizer merges across the turn boundary at {context!r} "
               f"(marked '|'), so label spans cannot be taken from the one-shot tokenization")
        if strict:
            raise TokenizationMismatchError(msg)
        warnings.warn(msg + "; tokenizing the pieces separately instead", stacklevel=2)
        input_ids, tok_at = _tokenize_pieces(full, boundaries, tokenizer, image_token_index)

    labels = [IGNORE_INDEX] * len(input_ids)
    for a, b in spans:
        ta, tb = tok_at[a], tok_at[b]
        labels[ta:tb] = input_ids[ta:tb]
    labels = [IGNORE_INDEX if t == image_token_index else lab for t, lab in zip(input_ids, labels)]

    if max_length is not None:
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return input_ids, labels


def _tokenize_pieces(
    full: str, boundaries: list[int], tokenizer: Any, image_token_index: int
) -> tuple[list[int], dict[int, int]]:
    """Fallback: tokenize full[b_k:b_{k+1}] separately (special prefix once) and concatenate.
    Returns the ids and the token index of every character boundary."""
    cuts = [0] + [c for c in boundaries if 0 < c < len(full)] + [len(full)]
    ids: list[int] = list(tokenizer_image_token(full[: cuts[1]], tokenizer, image_token_index))
    # A reply starting at character 0 starts after the special prefix (BOS), as in the main path.
    tok_at = {0: len(tokenizer_image_token("", tokenizer, image_token_index)), cuts[1]: len(ids)}
    for a, b in zip(cuts[1:-1], cuts[2:]):
        ids.extend(_encode_with_images(full[a:b], tokenizer, image_token_index))
        tok_at[b] = len(ids)
    return ids, tok_at
