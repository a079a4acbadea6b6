"""Batch collation for `LazySupervisedDataset` items.

The collated batch holds the model's inputs under the names `CambrianForCausalLM.forward` takes, plus one
metadata entry the trainer must pop first::

    batch = collator(items)
    meta = batch.pop(BATCH_META_KEY)          # or: meta = pop_batch_meta(batch)
    if meta["num_samples"]:                   # every item of the batch may have been skipped
        loss = model(**batch).loss
    tracker.update_from_batch(meta)           # exact skip counts, whatever the number of DataLoader workers

Metadata (`batch["data_meta"]`): num_samples (items kept), num_skipped, skipped_reasons {reason: count},
skipped (the `SkippedRecord`s), ids (ids of the kept items, in batch order).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from cambrian.constants import IGNORE_INDEX

from .dataset import SkippedRecord

__all__ = ["DataCollatorForSupervisedDataset", "BATCH_META_KEY", "pop_batch_meta"]

BATCH_META_KEY = "data_meta"


def pop_batch_meta(batch: dict[str, Any]) -> dict[str, Any]:
    """Remove and return the collator's metadata so `model(**batch)` gets only model inputs."""
    return batch.pop(BATCH_META_KEY)


class DataCollatorForSupervisedDataset:
    """Pad a list of dataset items into a batch; drop skipped records and report them.

    Args:
        tokenizer: gives the pad id (`pad_token_id`, else `eos_token_id`, else 0).
        padding_side: "right" (training) or "left".

    Returns a dict:
        input_ids       LongTensor (B, S)  padded with the pad id (-200 placeholders kept)
        labels          LongTensor (B, S)  padded with IGNORE_INDEX
        attention_mask  LongTensor (B, S)  1 on real tokens
        images          list per tower of (N, 3, R_t, R_t), the batch's N images in reading order, or None
        image_sizes     list of N (width, height)
        data_meta       see the module docstring (pop it before calling the model)
    B is the number of kept items (may be 0: then input_ids/labels/attention_mask are (0, 0)).
    """

    def __init__(self, tokenizer: Any, padding_side: str = "right") -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0
        self.padding_side = padding_side

    def __call__(self, items: Sequence[Any]) -> dict[str, Any]:
        kept: list[dict[str, Any]] = []
        skipped: list[SkippedRecord] = []
        for it in items:
            if isinstance(it, SkippedRecord):
                skipped.append(it)
            elif it is None:
                skipped.append(SkippedRecord(index=-1, reason="unknown", detail="dataset returned None"))
            else:
                kept.append(it)

        B = len(kept)
        S = max((len(it["input_ids"]) for it in kept), default=0)
        input_ids = torch.full((B, S), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, S), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((B, S), dtype=torch.long)
        for b, it in enumerate(kept):
            n = len(it["input_ids"])
            lo = S - n if self.padding_side == "left" else 0
            input_ids[b, lo:lo + n] = torch.as_tensor(it["input_ids"], dtype=torch.long)
            labels[b, lo:lo + n] = torch.as_tensor(it["labels"], dtype=torch.long)
            attention_mask[b, lo:lo + n] = 1

        # Images in reading order: item 0's images, then item 1's, ... (what the model's splicing expects).
        with_images = [it["pixel_values"] for it in kept if it.get("pixel_values") is not None]
        images = None
        if with_images:
            n_towers = len(with_images[0])
            if any(len(p) != n_towers for p in with_images):
                raise ValueError("items have pixel tensors for different numbers of vision towers")
            images = [torch.cat([p[t] for p in with_images], dim=0) for t in range(n_towers)]
        image_sizes = [tuple(s) for it in kept for s in (it.get("image_sizes") or [])]

        meta = {
            "num_samples": B,
            "num_skipped": len(skipped),
            "skipped_reasons": dict(Counter(r.reason for r in skipped)),
            "skipped": skipped,
            "ids": [it.get("id") for it in kept],
        }
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "images": images,
            "image_sizes": image_sizes,
            BATCH_META_KEY: meta,
        }
