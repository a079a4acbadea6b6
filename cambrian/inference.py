"""Batch inference over a JSONL file of questions.

    python -m cambrian.inference --model-path P --image-folder D --questions Q.jsonl \\
        --output-file R.jsonl --batch-size 8

Each line of Q.jsonl is an object with `question_id` (or `id`), the question in `text` (or `question` /
`prompt`), and optionally `image` (a path relative to --image-folder, or a list of paths).  Each output
line has `question_id`, `prompt`, `text` (the answer) and `model_id`.  A line that cannot be answered
(malformed JSON, missing or corrupt image) is written with an `error` field instead of `text`, so the run
never stops half-way and nothing is silently dropped.  `--resume` skips ids already in the output file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Iterator, Sequence


def read_questions(path: str) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, record or None, error or None) for every non-empty line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, None, f"line {lineno}: malformed JSON ({exc.msg})"
                continue
            if not isinstance(rec, dict):
                yield lineno, None, f"line {lineno}: expected a JSON object"
                continue
            if not any(isinstance(rec.get(k), str) for k in ("text", "question", "prompt")):
                yield lineno, rec, f"line {lineno}: no question text (`text`, `question` or `prompt`)"
                continue
            yield lineno, rec, None


def question_id(rec: dict[str, Any] | None, lineno: int) -> Any:
    if rec is None:
        return f"line-{lineno}"
    return rec.get("question_id", rec.get("id", f"line-{lineno}"))


def question_text(rec: dict[str, Any]) -> str:
    for key in ("text", "question", "prompt"):
        if isinstance(rec.get(key), str):
            return rec[key]
    raise KeyError("text")


def image_paths(rec: dict[str, Any], folder: str | None) -> list[str]:
    image = rec.get("image")
    if image is None:
        return []
    paths = image if isinstance(image, list) else [image]
    return [p if os.path.isabs(p) or folder is None else os.path.join(folder, p) for p in paths]


def main(argv: Sequence[str] | None = None) -> int:
    from cambrian.serve.cli import add_model_args

    parser = argparse.ArgumentParser(prog="python -m cambrian.inference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--image-folder", default=None, help="folder the `image` paths are relative to")
    parser.add_argument("--questions", required=True, help="JSONL file of questions")
    parser.add_argument("--output-file", required=True, help="JSONL file to write answers to")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: 8)")
    parser.add_argument("--resume", action="store_true", help="skip question ids already in --output-file")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if not os.path.isfile(args.questions):
        print(f"error: questions file not found: {args.questions}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    from cambrian.model.image_processing import ImageLoadError, load_image
    from cambrian.serve.cli import load_from_args

    done: set[str] = set()
    if args.resume and os.path.isfile(args.output_file):
        with open(args.output_file, encoding="utf-8") as f:
            for line in f:
                try:
                    done.add(str(json.loads(line)["question_id"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
    records = [r for r in read_questions(args.questions) if str(question_id(r[1], r[0])) not in done]

    try:
        _tok, model, _proc, _ctx = load_from_args(args)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model_id = os.path.basename(os.path.normpath(args.model_path))
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)

    os.makedirs(os.path.dirname(os.path.abspath(args.output_file)), exist_ok=True)
    n_errors = 0
    with open(args.output_file, "a" if args.resume else "w", encoding="utf-8") as out, \
            tqdm(total=len(records), desc="answering", unit="q") as bar:
        batch: list[tuple[Any, str, list]] = []

        def flush() -> None:
            if not batch:
                return
            answers = model.generate(images=[b[2] for b in batch], prompts=[b[1] for b in batch], **gen)
            for (qid, prompt, _), answer in zip(batch, answers):
                out.write(json.dumps({"question_id": qid, "prompt": prompt, "text": answer, "model_id": model_id}) + "\n")
            out.flush()
            bar.update(len(batch))
            batch.clear()

        for lineno, rec, error in records:
            qid = question_id(rec, lineno)
            images = []
            if error is None:
                try:
                    images = [load_image(p) for p in image_paths(rec, args.image_folder)]
                except ImageLoadError as exc:
                    error = str(exc)
            if error is not None:
                n_errors += 1
                out.write(json.dumps({"question_id": qid, "error": error, "model_id": model_id}) + "\n")
                bar.update(1)
                continue
            batch.append((qid, question_text(rec), images))
            if len(batch) == args.batch_size:
                flush()
        flush()
    print(f"wrote {len(records)} answers to {args.output_file}" + (f" ({n_errors} with errors)" if n_errors else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
