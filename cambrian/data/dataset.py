"""LLaVA-format supervised data: lazy JSON / JSONL loading with bad-record accounting.

A record is a dict::

    {"id": "0001", "image": "coco/1.jpg" | ["a.png", "b.png"] | absent,
     "conversations": [{"from": "system", "value": "..."},            # optional, first only
                       {"from": "human", "value": "<image>\\nWhat is it?"},
                       {"from": "gpt",   "value": "A cat."}, ...]}

`LazySupervisedDataset[i]` turns record i into model inputs (token ids with -200 where each image goes, labels
that train only the assistant replies, per-tower pixel tensors).  Loading is lazy and O(1) per item:

* JSONL: one pass over the file builds a byte-offset index (plus per-record word counts and image counts for
  `modality_lengths`), cached next to the file as ``<file>.idx.npz`` and keyed by the file's size and mtime, so
  later runs (and every rank of a distributed job) open it instantly.  `__getitem__` is seek + readline +
  json.loads of that one line.  If the folder is read-only the index stays in memory.
* JSON (a list): parsed once into memory, as LLaVA does.
* A Python list of dicts (in-memory data, e.g. `cambrian.data.synthetic`); `image` entries may then also be
  PIL images or encoded bytes.

Bad records (see `SKIP_REASONS`) never crash a run and are never replaced by another sample:
`__getitem__` returns a `SkippedRecord` marker, `DataCollatorForSupervisedDataset` drops it from the batch and
reports it in the batch's metadata (`batch["data_meta"]`, see `cambrian.data.collator`).  The dataset also keeps
its own counters (`skipped`, `skipped_examples`, `report()`), but each DataLoader worker process has its own
copy of the dataset, so the trainer should count from the collated batches (`SkipTracker`).
"""
from __future__ import annotations

import dataclasses
import json
import operator
import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cambrian.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from cambrian.conversation import Conversation
from cambrian.mm_utils import build_training_example, place_images
from cambrian.model.image_processing import (
    ASPECT_RATIOS,
    ImageLoadError,
    ImageProcessor,
    load_image,
    process_images,
)

__all__ = [
    "LazySupervisedDataset",
    "SkippedRecord",
    "SkipTracker",
    "SKIP_REASONS",
    "INDEX_SUFFIX",
    "normalize_conversation",
    "record_word_count",
    "record_num_images",
    "truncate_example",
]

# Why a record was skipped.  Keys are stable (they end up in logs and batch metadata).
SKIP_REASONS: dict[str, str] = {
    "malformed_json": "the line is not valid JSON (or not UTF-8)",
    "invalid_record": "the record is not a JSON object, or its `image` field is not a string / list of strings",
    "empty_conversation": "`conversations` is missing or empty",
    "invalid_conversation": "a turn is not {'from': human|gpt|system, 'value': str}, or a system turn is not first",
    "no_assistant_turn": "no gpt turn after the first human turn: nothing to train on",
    "image_placeholder_mismatch": "the number of <image> placeholders differs from the number of images",
    "missing_image": "an image file does not exist",
    "unreadable_image": "an image file exists but cannot be decoded",
    "truncated_no_target": "after truncation to model_max_length no assistant token is left",
}

INDEX_SUFFIX = ".idx.npz"
_INDEX_VERSION = 1
# LLaVA's `lengths` adds this many tokens for a sample with an image (it is only a grouping heuristic).
_LLAVA_IMAGE_LENGTH = 128

_ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "system": "system"}


@dataclasses.dataclass
class SkippedRecord:
    """Marker returned by `LazySupervisedDataset.__getitem__` for a record that cannot be used.

    index: position in the dataset; line: 1-based line number in a JSONL file (None otherwise);
    id: the record's `id` if it could be read; reason: a key of `SKIP_REASONS`; detail: a human-readable message.
    """

    index: int
    reason: str
    detail: str = ""
    id: Any = None
    line: int | None = None

    def __str__(self) -> str:
        where = f"#{self.index}" + (f" (line {self.line})" if self.line is not None else "")
        rid = f" id={self.id!r}" if self.id is not None else ""
        return f"{where}{rid}: {self.reason}" + (f": {self.detail}" if self.detail else "")


class _Skip(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


class SkipTracker:
    """Counts skipped records (per reason) and keeps the first `max_examples` of them.

    The dataset uses one for its own counters; a trainer feeds it each batch's metadata with
    `update_from_batch(batch["data_meta"])` to get exact counts even with DataLoader workers.
    """

    def __init__(self, max_examples: int = 20) -> None:
        self.max_examples = max_examples
        self.counts: Counter[str] = Counter()
        self.examples: list[SkippedRecord] = []
        self.seen = 0  # records looked at (good + bad)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, rec: SkippedRecord) -> None:
        self.counts[rec.reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(rec)

    def update_from_batch(self, meta: Mapping[str, Any]) -> None:
        """Add one collated batch's `data_meta`."""
        self.seen += int(meta.get("num_samples", 0)) + int(meta.get("num_skipped", 0))
        for rec in meta.get("skipped", ()):
            self.add(rec)

    def report(self, title: str = "data", total: int | None = None) -> str:
        """Printable summary: total, per-reason counts, first examples.  `total` (records looked at) defaults
        to the count gathered from batches."""
        seen_n = self.seen if total is None else total
        seen = f" of {seen_n} records" if seen_n else ""
        pct = f" ({100.0 * self.total / seen_n:.2f}%)" if seen_n else ""
        lines = [f"{title}: {self.total} skipped{seen}{pct}"]
        for reason, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {reason:<28} {n:>8}  {SKIP_REASONS.get(reason, '')}")
        if self.examples:
            lines.append(f"  first {len(self.examples)} skipped:")
            lines.extend(f"    {rec}" for rec in self.examples)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- record helpers
def record_word_count(record: Any) -> int:
    """Whitespace word count of all turns (LLaVA's length estimate); 0 for unusable records."""
    if not isinstance(record, dict):
        return 0
    convs = record.get("conversations")
    if not isinstance(convs, list):
        return 0
    return sum(len(t["value"].split()) for t in convs if isinstance(t, dict) and isinstance(t.get("value"), str))


def record_num_images(record: Any) -> int:
    """Number of images a record names (0 = text-only)."""
    if not isinstance(record, dict):
        return 0
    image = record.get("image")
    if image is None:
        return 0
    if isinstance(image, (list, tuple)):
        return len(image)
    return 1


def normalize_conversation(convs: Any) -> list[tuple[str, str]]:
    """Validate LLaVA turns and return (role, text) pairs with role in {"system", "human", "gpt"}.

    A system turn is allowed only first.  Leading gpt turns are dropped (LLaVA drops a first turn that is not the
    human's).  Raises `_Skip` with the reason.
    """
    if convs is None or (isinstance(convs, list) and not convs):
        raise _Skip("empty_conversation", "no turns")
    if not isinstance(convs, list):
        raise _Skip("invalid_conversation", f"`conversations` is a {type(convs).__name__}, not a list")
    out: list[tuple[str, str]] = []
    for k, turn in enumerate(convs):
        if not isinstance(turn, dict):
            raise _Skip("invalid_conversation", f"turn {k} is a {type(turn).__name__}")
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        role = _ROLE_ALIASES.get(role.strip().lower()) if isinstance(role, str) else None
        if role is None:
            raise _Skip("invalid_conversation", f"turn {k} has role {turn.get('from', turn.get('role'))!r}")
        if not isinstance(text, str):
            raise _Skip("invalid_conversation", f"turn {k} has a {type(text).__name__} value")
        if role == "system" and k != 0:
            raise _Skip("invalid_conversation", f"system turn at position {k} (only the first turn may be system)")
        out.append((role, text))
    system = out[:1] if out[0][0] == "system" else []
    rest = out[len(system):]
    while rest and rest[0][0] == "gpt":
        rest = rest[1:]
    if not rest:
        raise _Skip("empty_conversation", "no human turn")
    if not any(role == "gpt" for role, _ in rest):
        raise _Skip("no_assistant_turn", f"{len(rest)} turn(s), none from gpt")
    return system + rest


def truncate_example(input_ids: list[int], labels: list[int], max_length: int,
                     image_token_len: int = 1) -> tuple[list[int], list[int], int]:
    """Cut (input_ids, labels) so the sequence costs at most `max_length` tokens, where an image placeholder
    (IMAGE_TOKEN_INDEX) costs `image_token_len` tokens (the image tokens it becomes in the model) and any other
    id costs 1.  An image that does not fit entirely is dropped with everything after it, so an image is never
    cut in half.  Returns (input_ids, labels, number of placeholders kept)."""
    if image_token_len < 1:
        raise ValueError(f"image_token_len must be >= 1, got {image_token_len}")
    budget = max_length
    keep = 0
    for t in input_ids:
        cost = image_token_len if t == IMAGE_TOKEN_INDEX else 1
        if cost > budget:
            break
        budget -= cost
        keep += 1
    ids, labs = input_ids[:keep], labels[:keep]
    return ids, labs, sum(1 for t in ids if t == IMAGE_TOKEN_INDEX)


def _estimate_line(raw: bytes) -> tuple[int, int]:
    """(word count, number of images) of one JSONL line; (0, 0) if it does not parse."""
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return 0, 0
    return record_word_count(record), record_num_images(record)


def build_jsonl_index(path: str) -> dict[str, np.ndarray]:
    """One pass over a JSONL file: byte offset, 1-based line number, word count and image count of every
    non-blank line."""
    offsets: list[int] = []
    line_numbers: list[int] = []
    words: list[int] = []
    images: list[int] = []
    pos = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                w, n = _estimate_line(raw)
                offsets.append(pos)
                line_numbers.append(lineno)
                words.append(w)
                images.append(n)
            pos += len(raw)
    return {
        "offsets": np.asarray(offsets, dtype=np.int64),
        "line_numbers": np.asarray(line_numbers, dtype=np.int64),
        "words": np.asarray(words, dtype=np.int32),
        "images": np.asarray(images, dtype=np.int32),
    }


def _index_key(path: str) -> np.ndarray:
    st = os.stat(path)
    return np.asarray([_INDEX_VERSION, st.st_size, st.st_mtime_ns], dtype=np.int64)


def _as_processors(processors: Any) -> list[ImageProcessor] | None:
    if processors is None:
        return None
    if isinstance(processors, ImageProcessor) or hasattr(processors, "processor"):
        processors = [processors]
    # A vision tower stands for its processor.
    out = [p if isinstance(p, ImageProcessor) else getattr(p, "processor", p) for p in processors]
    return out or None


# ---------------------------------------------------------------------------------------------- the dataset
class LazySupervisedDataset(Dataset):
    """LLaVA-format supervised fine-tuning data.

    Args:
        data_path: a `.jsonl` file (lazy, indexed), a `.json` file holding a list, or a list of record dicts.
        tokenizer: a Hugging Face tokenizer.
        processors: one `ImageProcessor` per vision tower (or the towers themselves: their `.processor` is used);
            None for text-only data.
        template: chat template name or `Conversation` (label masking follows it).  With "plain" (LLaVA's
            stage-1 alignment format) each human turn is reduced to its image placeholders, so the example is
            "<image>" + caption + "\n" with only the caption trained, as in LLaVA's `preprocess_plain`.
        image_folder: where relative image paths are resolved; default the data file's folder (the working
            directory for in-memory records).
        model_max_length: sequence budget; longer examples are truncated (see `truncate_example`).
        image_aspect_ratio: "pad" or "square" (see `process_images`).
        image_token_len: tokens one image occupies in the LLM (training keeps the full grid: side*(side+1) with
            the newline tokens) for the truncation budget.  Default 1: the placeholder counts as one token, as in
            LLaVA's tokenizer-level truncation.
        index_cache: True = cache the JSONL index next to the file; a directory = cache it there; False = memory.
        max_skip_examples: how many skipped records `report()` lists.

    `ds[i]` returns either a dict::

        input_ids    LongTensor (L,)   with IMAGE_TOKEN_INDEX (-200) where each image goes
        labels       LongTensor (L,)   IGNORE_INDEX (-100) except on assistant replies (incl. their stop string)
        pixel_values list per tower of float (n_img, 3, R_t, R_t), or None for a text-only example
        image_sizes  list of n_img original (width, height)
        id           the record's id (or its index)

    or a `SkippedRecord` (never another record in its place).
    """

    def __init__(self, data_path: str | os.PathLike | Sequence[Mapping[str, Any]], tokenizer: Any,
                 processors: Any = None, template: str | Conversation = "llama_3",
                 image_folder: str | os.PathLike | None = None, model_max_length: int = 2048,
                 image_aspect_ratio: str = "pad", image_token_len: int = 1, index_cache: bool | str = True,
                 max_skip_examples: int = 20) -> None:
        super().__init__()
        if image_aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}, got {image_aspect_ratio!r}")
        if model_max_length < 1:
            raise ValueError(f"model_max_length must be positive, got {model_max_length}")
        self.tokenizer = tokenizer
        self.processors = _as_processors(processors)
        self.template = template
        self.model_max_length = int(model_max_length)
        self.image_aspect_ratio = image_aspect_ratio
        self.image_token_len = int(image_token_len)
        self.tracker = SkipTracker(max_skip_examples)
        self._skipped_indices: set[int] = set()

        self.data_path: str | None = None
        self._records: list[Any] | None = None
        self._index: dict[str, np.ndarray] | None = None
        self.index_path: str | None = None   # where the JSONL index is cached (None: memory only)
        self.index_source: str | None = None  # "cache" | "built" for JSONL
        self._fh = None
        self._fh_pid: int | None = None

        if isinstance(data_path, (str, os.PathLike)):
            self.data_path = os.fspath(data_path)
            default_folder = os.path.dirname(os.path.abspath(self.data_path))
            if self._is_jsonl(self.data_path):
                self._open_index(index_cache)
            else:
                with open(self.data_path, encoding="utf-8") as f:
                    data = json.load(f)  # a broken JSON list is a configuration error: raise
                if not isinstance(data, list):
                    raise ValueError(f"{self.data_path}: a .json data file must hold a list of records, "
                                     f"got {type(data).__name__}")
                self._records = data
        else:
            self._records = list(data_path)
            default_folder = os.getcwd()
        self.image_folder = os.fspath(image_folder) if image_folder is not None else default_folder
        if self._records is not None:
            self._words = np.asarray([record_word_count(r) for r in self._records], dtype=np.int64)
            self._nimg = np.asarray([record_num_images(r) for r in self._records], dtype=np.int64)
        else:
            self._words = self._index["words"].astype(np.int64)
            self._nimg = self._index["images"].astype(np.int64)
        if self.processors is None and (self._nimg > 0).any():
            raise ValueError(f"{int((self._nimg > 0).sum())} records have images but no image processors were given")
        name = template if isinstance(template, str) else template.name
        # LLaVA's "plain" (stage-1 alignment) format trains on "<image>" + caption: the human text is dropped.
        self._plain = name in ("plain", "v0_plain")
        self._modality_lengths: list[int] | None = None

    # ------------------------------------------------------------------ index
    @staticmethod
    def _is_jsonl(path: str) -> bool:
        if path.endswith(".jsonl"):
            return True
        if path.endswith(".json"):
            return False
        with open(path, "rb") as f:  # unknown suffix: a JSON list starts with "["
            head = f.read(256).lstrip()
        return not head.startswith(b"[")

    def _open_index(self, index_cache: bool | str) -> None:
        path = self.data_path
        if index_cache is False:
            cache = None
        elif isinstance(index_cache, (str, os.PathLike)) and not isinstance(index_cache, bool):
            os.makedirs(index_cache, exist_ok=True)
            cache = os.path.join(os.fspath(index_cache), os.path.basename(path) + INDEX_SUFFIX)
        else:
            cache = path + INDEX_SUFFIX
        key = _index_key(path)
        if cache is not None and os.path.exists(cache):
            try:
                with np.load(cache) as z:
                    if np.array_equal(z["key"], key):
                        self._index = {k: z[k] for k in ("offsets", "line_numbers", "words", "images")}
                        self.index_path, self.index_source = cache, "cache"
                        return
            except Exception:  # a corrupt / foreign cache file: rebuild it
                pass
        self._index = build_jsonl_index(path)
        self.index_source = "built"
        if cache is None:
            return
        tmp = f"{cache}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, key=key, **self._index)
            os.replace(tmp, cache)  # atomic: concurrent ranks never read a half-written index
            self.index_path = cache
        except OSError as exc:
            warnings.warn(f"cannot cache the JSONL index at {cache} ({exc}); keeping it in memory", stacklevel=3)
            try:
                os.remove(tmp)
            except OSError:
                pass

    def _open_data_file(self):
        """The JSONL file, opened once per process (DataLoader workers must not share a file position)."""
        if self._fh is None or self._fh_pid != os.getpid():
            if self._fh is not None:
                try:  # the parent's handle, inherited by a forked worker: closing our copy is harmless
                    self._fh.close()
                except OSError:
                    pass
            self._fh = open(self.data_path, "rb")
            self._fh_pid = os.getpid()
        return self._fh

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fh"], state["_fh_pid"] = None, None  # file handles do not pickle (spawned workers)
        return state

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return len(self._records) if self._records is not None else len(self._index["offsets"])

    @property
    def modality_lengths(self) -> list[int]:
        """LLaVA convention: word count, positive for samples with images, negative for text-only ones (never 0;
        unparsable records count as text of length 1).  From the index / records, no image is opened."""
        if self._modality_lengths is None:
            w = np.maximum(self._words, 1)
            self._modality_lengths = np.where(self._nimg > 0, w, -w).tolist()
        return self._modality_lengths

    @property
    def lengths(self) -> list[int]:
        """LLaVA's `lengths`: word count + 128 for a sample with images."""
        return (self._words + _LLAVA_IMAGE_LENGTH * (self._nimg > 0)).tolist()

    # ------------------------------------------------------------------ skip accounting
    @property
    def skipped(self) -> Counter:
        """Per-reason counts of distinct bad records met so far by this process."""
        return self.tracker.counts

    @property
    def skipped_examples(self) -> list[SkippedRecord]:
        return self.tracker.examples

    def report(self) -> str:
        """Printable summary of the skipped records (this process's view; see `SkipTracker`)."""
        name = self.data_path or "in-memory records"
        return self.tracker.report(f"{type(self).__name__}({name}, {len(self)} records)")

    def _skip(self, index: int, reason: str, detail: str, rid: Any) -> SkippedRecord:
        line = int(self._index["line_numbers"][index]) if self._index is not None else None
        rec = SkippedRecord(index=index, reason=reason, detail=detail, id=rid, line=line)
        if index not in self._skipped_indices:  # count each bad record once, however many epochs
            self._skipped_indices.add(index)
            self.tracker.add(rec)
        return rec

    # ------------------------------------------------------------------ items
    def read_record(self, index: int) -> Any:
        """The raw record (dict) at `index`; raises `_Skip("malformed_json")` for a broken JSONL line."""
        if self._records is not None:
            return self._records[index]
        f = self._open_data_file()
        f.seek(int(self._index["offsets"][index]))
        raw = f.readline()
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _Skip("malformed_json", str(exc)[:200]) from None

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedRecord:
        index = operator.index(index)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} records")
        rid = None
        self.tracker.seen += 1  # items fetched (this process), so report() can give a skip rate
        try:
            record = self.read_record(index)
            if isinstance(record, dict):
                rid = record.get("id")
            return self._build(index, record)
        except _Skip as s:
            return self._skip(index, s.reason, s.detail, rid)

    def _resolve(self, image: Any) -> Any:
        if isinstance(image, str):
            return image if os.path.isabs(image) else os.path.join(self.image_folder, image)
        return image  # PIL image / bytes from in-memory records

    def _build(self, index: int, record: Any) -> dict[str, Any]:
        if not isinstance(record, dict):
            raise _Skip("invalid_record", f"record is a {type(record).__name__}, not an object")
        images = record.get("image")
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        for im in images:
            if not isinstance(im, (str, bytes, bytearray)) and not hasattr(im, "convert"):
                raise _Skip("invalid_record", f"image entry is a {type(im).__name__}")
        messages = normalize_conversation(record.get("conversations"))

        n_placeholders = sum(text.count(DEFAULT_IMAGE_TOKEN) for _, text in messages)
        if images and n_placeholders == 0:
            # LLaVA: an image sample without a placeholder gets "<image>\n" in front of the first human turn.
            k = next(i for i, (role, _) in enumerate(messages) if role == "human")
            messages[k] = ("human", place_images(messages[k][1], len(images)))
        elif n_placeholders != len(images):
            raise _Skip("image_placeholder_mismatch", f"{n_placeholders} <image> placeholder(s), {len(images)} image(s)")
        if self._plain:
            messages = [(role, DEFAULT_IMAGE_TOKEN * text.count(DEFAULT_IMAGE_TOKEN)) if role == "human"
                        else (role, text) for role, text in messages]

        input_ids, labels = build_training_example(messages, self.tokenizer, self.template)
        input_ids, labels, n_kept = truncate_example(input_ids, labels, self.model_max_length, self.image_token_len)
        if all(lab == IGNORE_INDEX for lab in labels):
            raise _Skip("truncated_no_target", f"no reply token within model_max_length={self.model_max_length}")
        images = images[:n_kept]  # placeholders are in reading order = image order

        pixel_values = None
        image_sizes: list[tuple[int, int]] = []
        if images:
            pil = []
            for im in images:
                src = self._resolve(im)
                if isinstance(src, str) and not os.path.exists(src):
                    raise _Skip("missing_image", f"{src} not found")
                try:
                    pil.append(load_image(src))
                except ImageLoadError as exc:
                    raise _Skip("unreadable_image", str(exc)[:300]) from None
            pixel_values, image_sizes = process_images(pil, self.processors, self.image_aspect_ratio)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": pixel_values,
            "image_sizes": [tuple(s) for s in image_sizes],
            "id": record.get("id", index),
        }
