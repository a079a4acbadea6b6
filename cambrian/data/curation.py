"""Cambrian-10M -> Cambrian-7M style data curation.

Three steps from the Cambrian-1 data study, in this order:

1. **Per-source cap t** (default 350k, the study's best value): a source with more than t samples is randomly
   subsampled to exactly t (seeded per source); smaller sources are kept whole.
2. **Re-balancing to target category ratios**.  The study's table (Language 21.00%, General 34.52%, OCR 27.22%,
   Counting 8.71%, Math 7.20%, Code 0.87%, Science 0.88%) sums to 100.40%, not 100%: the ratios are used
   normalised (each divided by their sum), so e.g. General's target share is 34.52 / 100.40 = 34.38%.  Ratios
   are also re-normalised over the categories that actually occur in the pool.  Only subsampling is done
   (nothing is duplicated): without `target_size` the output is the largest set with exactly these ratios
   (limited by the scarcest category relative to its ratio); with `target_size` N each category gets its
   largest-remainder share of N, clipped to what it has (a shortfall is reported, not filled from elsewhere).
   Records whose category has no target ratio are dropped (and listed in the summary).
3. **System prompt for short-answer VQA**: "Answer the question using a single word or phrase." is added as a
   system turn to items that have an image and whose gpt answers are all short (`is_short_answer`: at most
   `max_answer_words` words (3) and no sentence punctuation - a ".", "!", "?" or ";" followed by a space or the
   end - so "3.5" or "New York" qualify but "Yes." or "It is red" do not), unless the prompt text already occurs
   in the conversation.  An existing system turn gets the prompt appended.

Each record needs a `source` (default: the input file's name without extension) and a `category` (the record's
field, else `source_map[source]`).  Input files are JSONL (streamed twice: once to count, once to write; only two
small integer arrays are held) or JSON lists.  Output keeps the input order.

CLI::

    python -m cambrian.data.curation --inputs a.jsonl b.jsonl --output curated.jsonl \\
        [--cap 350000] [--target-size N] [--ratios default|none|file.json] [--source-map map.json] [--seed 0]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import zlib
from array import array
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_CAP",
    "DEFAULT_RATIOS",
    "SHORT_ANSWER_PROMPT",
    "normalize_ratios",
    "allocate",
    "is_short_answer",
    "is_short_answer_vqa",
    "add_system_prompt",
    "cap_per_source",
    "rebalance",
    "curate",
    "CurationReport",
    "main",
]

DEFAULT_CAP = 350_000
# Percentages as printed in the Cambrian-1 data study (they sum to 100.40; see the module docstring).
DEFAULT_RATIOS: dict[str, float] = {
    "Language": 21.00, "General": 34.52, "OCR": 27.22, "Counting": 8.71, "Math": 7.20, "Code": 0.87,
    "Science": 0.88,
}
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
UNCATEGORISED = "(uncategorised)"

_SENTENCE_PUNCT = re.compile(r"[.!?;](?=\s|$)")


# ---------------------------------------------------------------------------------------------- pure helpers
def normalize_ratios(ratios: Mapping[str, float]) -> dict[str, float]:
    """Divide by the sum so the ratios add up to 1 (the study's table sums to 100.40%)."""
    total = float(sum(ratios.values()))
    if total <= 0 or any(v < 0 for v in ratios.values()):
        raise ValueError(f"ratios must be non-negative with a positive sum, got {dict(ratios)}")
    return {k: float(v) / total for k, v in ratios.items()}


def allocate(total: int, ratios: Mapping[str, float]) -> dict[str, int]:
    """Split `total` into integer counts proportional to `ratios` (largest remainder: counts sum to `total`,
    each within 1 of its exact share)."""
    norm = normalize_ratios(ratios)
    exact = {k: total * r for k, r in norm.items()}
    counts = {k: int(np.floor(v)) for k, v in exact.items()}
    rest = total - sum(counts.values())
    for k in sorted(exact, key=lambda k: (-(exact[k] - counts[k]), k))[:rest]:
        counts[k] += 1
    return counts


def is_short_answer(text: str, max_words: int = 3) -> bool:
    """A single word or short phrase: non-empty, at most `max_words` words, no sentence punctuation."""
    t = text.strip()
    return bool(t) and len(t.split()) <= max_words and not _SENTENCE_PUNCT.search(t)


def _turns(record: Mapping[str, Any]) -> list[dict]:
    convs = record.get("conversations")
    return [t for t in convs if isinstance(t, dict)] if isinstance(convs, list) else []


def is_short_answer_vqa(record: Mapping[str, Any], max_words: int = 3) -> bool:
    """The record has an image and all its gpt answers are short (`is_short_answer`)."""
    image = record.get("image")
    if not image:
        return False
    answers = [t.get("value") for t in _turns(record) if t.get("from") in ("gpt", "assistant")]
    return bool(answers) and all(isinstance(a, str) and is_short_answer(a, max_words) for a in answers)


def add_system_prompt(record: dict[str, Any], prompt: str = SHORT_ANSWER_PROMPT) -> bool:
    """Add `prompt` as a system turn (in place) unless it already occurs in the conversation.
    Returns True if the record was changed."""
    convs = record.get("conversations")
    if not isinstance(convs, list):
        return False
    if any(isinstance(t.get("value"), str) and prompt.lower() in t["value"].lower() for t in _turns(record)):
        return False
    first = convs[0] if convs else None
    if isinstance(first, dict) and first.get("from") == "system" and isinstance(first.get("value"), str):
        first["value"] = (first["value"].rstrip() + " " + prompt).strip()
    else:
        convs.insert(0, {"from": "system", "value": prompt})
    return True


def _stable_seed(seed: int, name: str) -> list[int]:
    return [int(seed), zlib.crc32(name.encode("utf-8"))]


def cap_per_source(source_codes: np.ndarray, source_names: Sequence[str], cap: int | None,
                   seed: int = 0) -> np.ndarray:
    """Boolean keep-mask: every source with more than `cap` records is subsampled to exactly `cap` (random,
    seeded by (seed, source name)); codes < 0 (unusable records) are never kept."""
    keep = source_codes >= 0
    if cap is None:
        return keep
    order = np.argsort(source_codes, kind="stable")  # group record positions by source in one sort
    bounds = np.searchsorted(source_codes[order], np.arange(len(source_names) + 1))
    for code, name in enumerate(source_names):
        idx = order[bounds[code]:bounds[code + 1]]
        if len(idx) > cap:
            rng = np.random.default_rng(_stable_seed(seed, name))
            keep[idx] = False
            keep[rng.choice(idx, size=cap, replace=False)] = True
    return keep


def rebalance(category_codes: np.ndarray, category_names: Sequence[str], keep: np.ndarray,
              ratios: Mapping[str, float] | None, target_size: int | None = None,
              seed: int = 0) -> tuple[np.ndarray, dict[str, int], dict[str, float]]:
    """Subsample the kept records so categories follow `ratios`.

    Returns (new keep-mask, target count per category, target share per category (normalised over the
    categories present)).  See the module docstring for the rules."""
    counts = np.bincount(category_codes[keep & (category_codes >= 0)], minlength=len(category_names))
    available = {name: int(counts[c]) for c, name in enumerate(category_names)}
    if ratios is None:
        return keep.copy(), available, {}
    present = {k: v for k, v in ratios.items() if v > 0 and available.get(k, 0) > 0}
    if not present:
        return np.zeros_like(keep), {k: 0 for k in category_names}, {}
    shares = normalize_ratios(present)
    if target_size is None:
        target_size = int(min(available[k] / r for k, r in shares.items()) + 1e-9)
    targets = allocate(int(target_size), shares)
    targets = {k: min(n, available[k]) for k, n in targets.items()}
    new_keep = np.zeros_like(keep)
    for c, name in enumerate(category_names):
        n = targets.get(name, 0)
        if n <= 0:
            continue
        idx = np.flatnonzero((category_codes == c) & keep)  # one pass per target category (a handful)
        if n >= len(idx):
            new_keep[idx] = True
        else:
            rng = np.random.default_rng(_stable_seed(seed, "category:" + name))
            new_keep[rng.choice(idx, size=n, replace=False)] = True
    return new_keep, {k: targets.get(k, 0) for k in category_names}, shares


# ---------------------------------------------------------------------------------------------- file I/O
def iter_records(path: str) -> Iterator[Any]:
    """Records of a JSONL file (a malformed line yields None) or of a JSON list."""
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json input must hold a list of records")
        yield from data
        return
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                yield json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                yield None


def _progress(iterable, total: int | None, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=" rec", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


@dataclasses.dataclass
class CurationReport:
    """What `curate` did.  sources: name -> (records in, kept); categories: name -> (available after the cap,
    kept, target share or None); plus totals."""

    sources: dict[str, tuple[int, int]]
    categories: dict[str, tuple[int, int, float | None]]
    n_in: int
    n_after_cap: int
    n_out: int
    n_malformed: int
    n_system_prompt: int
    ratio_sum: float | None
    notes: list[str]

    def format_table(self) -> str:
        w = max([len("source")] + [len(s) for s in self.sources])
        lines = [f"{'source':<{w}} {'in':>10} {'kept':>10}", "-" * (w + 22)]
        for name, (n_in, kept) in sorted(self.sources.items()):
            lines.append(f"{name:<{w}} {n_in:>10,} {kept:>10,}")
        wc = max([len("category")] + [len(c) for c in self.categories])
        lines += ["", f"{'category':<{wc}} {'available':>10} {'count':>10} {'share':>8} {'target':>8}",
                  "-" * (wc + 40)]
        for name, (avail, kept, target) in sorted(self.categories.items(), key=lambda kv: -kv[1][1]):
            share = 100.0 * kept / self.n_out if self.n_out else 0.0
            tgt = f"{100.0 * target:7.2f}%" if target is not None else "      - "
            lines.append(f"{name:<{wc}} {avail:>10,} {kept:>10,} {share:7.2f}% {tgt}")
        totals = (f"records in: {self.n_in:,}   after cap: {self.n_after_cap:,}   out: {self.n_out:,}   "
                  f"malformed lines skipped: {self.n_malformed:,}   system prompt added: {self.n_system_prompt:,}")
        lines += ["", totals]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def load_ratios(spec: str | Mapping[str, float] | None) -> dict[str, float] | None:
    """"default" -> DEFAULT_RATIOS, "none"/None -> no re-balancing, a path -> JSON {category: ratio}."""
    if spec is None or (isinstance(spec, str) and spec.lower() == "none"):
        return None
    if isinstance(spec, Mapping):
        return {str(k): float(v) for k, v in spec.items()}
    if spec == "default":
        return dict(DEFAULT_RATIOS)
    with open(spec, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{spec}: ratios file must hold a JSON object {{category: ratio}}")
    return {str(k): float(v) for k, v in data.items()}


def curate(inputs: Sequence[str], output: str, cap: int | None = DEFAULT_CAP, target_size: int | None = None,
           ratios: str | Mapping[str, float] | None = "default", seed: int = 0,
           source_map: Mapping[str, str] | None = None, system_prompt: str | None = SHORT_ANSWER_PROMPT,
           max_answer_words: int = 3, progress: bool = False) -> CurationReport:
    """Cap per source, re-balance categories, add the short-answer system prompt; write `output` (JSONL, or a
    JSON list if it ends in .json).  `system_prompt=None` leaves conversations unchanged.  Deterministic for a
    given seed.  Returns a `CurationReport` (print `report.format_table()`)."""
    ratio_table = load_ratios(ratios)
    canon = {k.lower(): k for k in (ratio_table or {})}
    source_map = dict(source_map or {})

    # Pass 1: source and category of every record (two small int arrays; records are not kept).
    source_ids: dict[str, int] = {}
    category_ids: dict[str, int] = {}
    src_codes = array("i")  # compact: 4 bytes per record
    cat_codes = array("i")
    n_malformed = 0
    scan = ((os.path.splitext(os.path.basename(path))[0], rec) for path in inputs for rec in iter_records(path))
    for default_source, rec in _progress(scan, None, "scan", progress):
        if not isinstance(rec, dict):
            n_malformed += 1
            src_codes.append(-1)
            cat_codes.append(-1)
            continue
        source = rec.get("source") if isinstance(rec.get("source"), str) else default_source
        category = rec.get("category") if isinstance(rec.get("category"), str) else source_map.get(source)
        category = canon.get(category.lower(), category) if isinstance(category, str) else UNCATEGORISED
        src_codes.append(source_ids.setdefault(source, len(source_ids)))
        cat_codes.append(category_ids.setdefault(category, len(category_ids)))
    src = np.frombuffer(src_codes, dtype=np.int32).copy() if len(src_codes) else np.zeros(0, np.int32)
    cat = np.frombuffer(cat_codes, dtype=np.int32).copy() if len(cat_codes) else np.zeros(0, np.int32)
    source_names = list(source_ids)
    category_names = list(category_ids)

    keep_cap = cap_per_source(src, source_names, cap, seed)
    keep, _targets, shares = rebalance(cat, category_names, keep_cap, ratio_table, target_size, seed)

    # Pass 2: write the kept records in input order.
    n_prompt = 0
    n_total = len(src)
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    as_list = output.endswith(".json")
    tmp = output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        if as_list:
            out.write("[\n")
        first = True
        pos = 0
        records = (rec for path in inputs for rec in iter_records(path))
        for rec in _progress(records, n_total, "write", progress):
            k, pos = pos, pos + 1
            if not keep[k]:
                continue
            if system_prompt and is_short_answer_vqa(rec, max_answer_words) and add_system_prompt(rec, system_prompt):
                n_prompt += 1
            line = json.dumps(rec, ensure_ascii=False)
            if as_list:
                out.write(("" if first else ",\n") + line)
            else:
                out.write(line + "\n")
            first = False
        if as_list:
            out.write("\n]\n")
    os.replace(tmp, output)

    def per_code(codes: np.ndarray, mask: np.ndarray | None, n: int) -> list[int]:
        valid = codes >= 0 if mask is None else (codes >= 0) & mask
        return np.bincount(codes[valid], minlength=n).tolist()

    s_in, s_kept = per_code(src, None, len(source_names)), per_code(src, keep, len(source_names))
    sources = {name: (s_in[c], s_kept[c]) for c, name in enumerate(source_names)}
    c_avail, c_kept = per_code(cat, keep_cap, len(category_names)), per_code(cat, keep, len(category_names))
    categories = {name: (c_avail[c], c_kept[c], shares.get(name) if ratio_table is not None else None)
                  for c, name in enumerate(category_names)}
    notes = []
    ratio_sum = None
    if ratio_table is not None:
        ratio_sum = float(sum(ratio_table.values()))
        notes.append(f"target ratios sum to {ratio_sum:g}; used normalised (each divided by {ratio_sum:g})"
                     + (" over the categories present" if set(shares) != {k for k, v in ratio_table.items() if v > 0}
                        else ""))
        for name in category_names:
            if name not in shares and categories[name][0]:
                notes.append(f"category {name!r} has no target ratio: its {categories[name][0]:,} records dropped")
        if target_size is not None:
            wanted = allocate(int(target_size), shares) if shares else {}
            for name, want in wanted.items():
                if categories[name][1] < want:
                    notes.append(f"category {name!r}: wanted {want:,}, only {categories[name][1]:,} available")
        missing = [k for k, v in ratio_table.items() if v > 0 and k not in shares]
        if missing:
            notes.append(f"no records for target categories: {', '.join(missing)}")
    return CurationReport(sources=sources, categories=categories, n_in=n_total - n_malformed,
                          n_after_cap=int(keep_cap.sum()), n_out=int(keep.sum()), n_malformed=n_malformed,
                          n_system_prompt=n_prompt, ratio_sum=ratio_sum, notes=notes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cambrian.data.curation",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", nargs="+", required=True, help="JSONL / JSON files of LLaVA-format records")
    parser.add_argument("--output", required=True, help="curated file (.jsonl, or .json for a list)")
    parser.add_argument("--cap", type=int, default=DEFAULT_CAP, help="per-source cap t (0 = no cap)")
    parser.add_argument("--target-size", type=int, default=None,
                        help="total size after re-balancing (default: the largest set with the exact ratios)")
    parser.add_argument("--ratios", default="default", help="'default' (Cambrian-1 table), 'none', or a JSON file")
    parser.add_argument("--source-map", default=None, help="JSON file {source: category} for records without one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-system-prompt", action="store_true", help="do not add the short-answer prompt")
    parser.add_argument("--max-answer-words", type=int, default=3, help="short answer: at most this many words")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    source_map = None
    if args.source_map:
        with open(args.source_map, encoding="utf-8") as f:
            source_map = json.load(f)
    report = curate(args.inputs, args.output, cap=args.cap or None, target_size=args.target_size,
                    ratios=args.ratios, seed=args.seed, source_map=source_map,
                    system_prompt=None if args.no_system_prompt else SHORT_ANSWER_PROMPT,
                    max_answer_words=args.max_answer_words, progress=not args.no_progress)
    print(report.format_table())
    print(f"wrote {report.n_out:,} records to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
