"""Length- and modality-grouped batching (LLaVA's `group_by_modality_length`), as a batch sampler.

LLaVA shuffles indices, cuts them into mega-batches of `world_size * batch_size`, sorts each mega-batch by length
and deals it out to the ranks so every rank gets a similar total length; with `group_by_modality_length` the
multimodal (length > 0) and text-only (length < 0) samples are grouped separately, so a batch never mixes them.
LLaVA yields a flat index list and its last batch mixes the two leftovers; this sampler yields the batches
themselves, so every batch is modality-pure (the last one of each modality may be short) and every index is
used exactly once per epoch.

Use it as ``DataLoader(dataset, batch_sampler=LengthGroupedSampler(...), collate_fn=collator)`` and call
`set_epoch(epoch)` before each epoch.  The order depends only on (seed, epoch).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["LengthGroupedSampler", "modality_length_grouped_batches", "split_to_even_chunks"]


def split_to_even_chunks(indices: Sequence[int], lengths: Sequence[int] | np.ndarray,
                         num_chunks: int) -> list[list[int]]:
    """Deal `indices` (sorted longest first) into `num_chunks` chunks of equal size, each next index going to the
    chunk with the smallest total length so far (LLaVA's rule: ranks get similar amounts of work)."""
    indices = [int(i) for i in indices]
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for i in indices:
        k = totals.index(min(totals))
        chunks[k].append(i)
        totals[k] += float(lengths[i])
        if len(chunks[k]) == per_chunk:
            totals[k] = float("inf")
    return chunks


def modality_length_grouped_batches(lengths: Sequence[int], batch_size: int, world_size: int = 1, seed: int = 0,
                                    epoch: int = 0, group_by_modality: bool = True,
                                    mega_batch_mult: int = 1) -> list[list[int]]:
    """All batches of one epoch, in order; consecutive runs of `world_size` batches form one step (batch k of a
    step goes to rank k).

    lengths: per sample, > 0 multimodal, < 0 text-only (`LazySupervisedDataset.modality_lengths`); magnitudes
        are the lengths to group by.  With `group_by_modality=False` only the magnitudes matter.
    mega_batch_mult: mega-batch = mega_batch_mult steps; larger values group lengths more tightly (LLaVA: 1).

    Full steps from both modalities are shuffled together; the leftover (< one step) of each modality comes
    last, cut into batches of `batch_size` (full ones first, then at most one short batch per modality).
    """
    if batch_size < 1 or world_size < 1 or mega_batch_mult < 1:
        raise ValueError("batch_size, world_size and mega_batch_mult must be >= 1")
    lengths = np.asarray(lengths, dtype=np.int64)
    magnitude = np.abs(lengths)
    rng = np.random.default_rng([int(seed), int(epoch)])
    if group_by_modality:
        groups = [np.flatnonzero(lengths > 0), np.flatnonzero(lengths <= 0)]
    else:
        groups = [np.arange(len(lengths))]
    per_step = world_size * batch_size
    mega = per_step * mega_batch_mult
    steps: list[list[list[int]]] = []  # each: world_size batches of batch_size
    leftovers: list[np.ndarray] = []
    for group in groups:
        if len(group) == 0:
            continue
        group = group[rng.permutation(len(group))]
        for start in range(0, len(group), mega):
            mb = group[start:start + mega]
            mb = mb[np.argsort(-magnitude[mb], kind="stable")]  # longest first
            for s in range(0, len(mb), per_step):
                step = mb[s:s + per_step]
                if len(step) == per_step:
                    steps.append(split_to_even_chunks(step, magnitude, world_size))
                else:
                    leftovers.append(step)
    order = rng.permutation(len(steps))
    batches = [b for k in order for b in steps[k]]
    full, short = [], []
    for step in leftovers:
        for s in range(0, len(step), batch_size):
            chunk = [int(i) for i in step[s:s + batch_size]]
            (full if len(chunk) == batch_size else short).append(chunk)
    return batches + full + short


class LengthGroupedSampler(Sampler[list[int]]):
    """A *batch* sampler: yields lists of dataset indices, grouped by length and (optionally) modality.

    Args:
        lengths: `dataset.modality_lengths` (sign = modality) or plain lengths.
        batch_size: per-device batch size.
        world_size / rank: with `rank=None` every batch of the epoch is yielded (single process, or a wrapper
            such as accelerate that shards a batch sampler round-robin).  With a rank, this rank's batches
            (`batches[rank::world_size]`); the list is first padded by repeating its first batches (or, with
            `drop_last`, truncated) to a multiple of world_size so all ranks take the same number of steps.
        seed: base seed; the epoch's order depends only on (seed, epoch).
        group_by_modality: keep multimodal and text-only samples in separate batches.
        mega_batch_mult: see `modality_length_grouped_batches`.
        drop_last: drop batches shorter than `batch_size`.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int = 1, rank: int | None = None,
                 seed: int = 0, group_by_modality: bool = True, mega_batch_mult: int = 1,
                 drop_last: bool = False) -> None:
        if rank is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if group_by_modality and (self.lengths == 0).any():
            raise ValueError("modality lengths must be non-zero (positive: multimodal, negative: text-only)")
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)
        self.rank = rank
        self.seed = int(seed)
        self.group_by_modality = group_by_modality
        self.mega_batch_mult = int(mega_batch_mult)
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order; `start_batch` skips that many of this rank's batches on the next iteration
        only (resuming mid-epoch)."""
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def all_batches(self) -> list[list[int]]:
        """Every batch of the current epoch (all ranks), in order."""
        batches = modality_length_grouped_batches(
            self.lengths, self.batch_size, self.world_size, self.seed, self.epoch, self.group_by_modality,
            self.mega_batch_mult)
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        return batches

    def batches(self) -> list[list[int]]:
        """This rank's batches for the current epoch."""
        batches = self.all_batches()
        if self.rank is None or self.world_size == 1:
            return batches
        rem = len(batches) % self.world_size
        if rem:
            if self.drop_last:
                batches = batches[: len(batches) - rem]
            else:
                pad = self.world_size - rem
                batches = batches + [batches[k % len(batches)] for k in range(pad)]
        return batches[self.rank::self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        start, self.start_batch = self.start_batch, 0
        yield from self.batches()[start:]

    def _num_all_batches(self) -> int:
        if self.group_by_modality:
            sizes = [int((self.lengths > 0).sum()), int((self.lengths <= 0).sum())]
        else:
            sizes = [len(self.lengths)]
        per_step = self.world_size * self.batch_size
        n = 0
        for size in sizes:
            tail = size % per_step
            n += (size // per_step) * self.world_size + tail // self.batch_size
            if tail % self.batch_size and not self.drop_last:
                n += 1
        return n

    def __len__(self) -> int:
        n = self._num_all_batches()
        if self.rank is None or self.world_size == 1:
            return n
        return n // self.world_size if self.drop_last else -(-n // self.world_size)
