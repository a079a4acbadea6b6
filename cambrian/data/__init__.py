"""Training data: LLaVA-format datasets, collation, length/modality-grouped batching, Cambrian-10M curation
tools, and the synthetic shapes data set of the built-in demo model.

Typical use::

    ds = LazySupervisedDataset("train.jsonl", tokenizer, model.image_processors, template="llama_3",
                               model_max_length=2048)
    sampler = LengthGroupedSampler(ds.modality_lengths, batch_size=4, seed=0)     # a batch sampler
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=DataCollatorForSupervisedDataset(tokenizer))
    for epoch in range(n):
        sampler.set_epoch(epoch)
        for batch in loader:
            meta = pop_batch_meta(batch)          # skipped-record counts: pop before model(**batch)
            ...
"""
from .collator import BATCH_META_KEY, DataCollatorForSupervisedDataset, pop_batch_meta
from .dataset import (
    SKIP_REASONS,
    LazySupervisedDataset,
    SkippedRecord,
    SkipTracker,
    truncate_example,
)
from .sampler import LengthGroupedSampler, modality_length_grouped_batches

__all__ = [
    "LazySupervisedDataset",
    "SkippedRecord",
    "SkipTracker",
    "SKIP_REASONS",
    "truncate_example",
    "DataCollatorForSupervisedDataset",
    "BATCH_META_KEY",
    "pop_batch_meta",
    "LengthGroupedSampler",
    "modality_length_grouped_batches",
]
