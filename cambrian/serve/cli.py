"""Chat with a Cambrian model from the terminal.

One-shot:    python -m cambrian.serve.cli --model-path P --image-file F --query "What is shown?"
Interactive: python -m cambrian.serve.cli --model-path P --image-file F
             (type questions; an empty line or Ctrl-D ends; the conversation keeps its history)
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def parse_tower_paths(items: Sequence[str]) -> dict[str, str]:
    """`NAME=PATH` pairs -> mapping (tower names contain '/', so split on the last '=')."""
    out = {}
    for item in items or []:
        name, sep, path = item.rpartition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--tower-path expects NAME=PATH, got {item!r}")
        out[name] = path
    return out


def role_label(role: str) -> str:
    """A template role as the terminal shows it: markup tokens dropped ("<start_of_turn>model\\n" -> "model",
    "<|im_start|>assistant" -> "assistant"), plain names ("USER", "ASSISTANT") unchanged."""
    import re

    label = re.sub(r"<[^<>]*>", " ", role).strip()
    return label or re.sub(r"[<|>]", "", role).strip()  # phi3's roles are nothing but markup: "<|user|>" -> "user"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by the CLI and batch inference."""
    parser.add_argument("--model-path", required=True, help="checkpoint folder (config.json + safetensors + tokenizer)")
    parser.add_argument("--model-base", default=None, help="base LLM folder, for LoRA or connector-only checkpoints")
    parser.add_argument("--tower-path", action="append", default=[], metavar="NAME=PATH",
                        help="where a vision tower named in config.json lives locally (transformers folder or "
                             "timm/open_clip file); repeatable. Default: <model-path>/vision_towers/ or $CAMBRIAN_TOWER_DIR")
    parser.add_argument("--conv-mode", default=None, help="conversation template (default: the checkpoint's)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weights dtype (default: as stored)")
    parser.add_argument("--load-8bit", action="store_true", help="8-bit weights via bitsandbytes (CUDA only)")
    parser.add_argument("--load-4bit", action="store_true", help="4-bit weights via bitsandbytes (CUDA only)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (with --temperature > 0)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default: 256)")


def load_from_args(args: argparse.Namespace):
    from cambrian.model.builder import load_pretrained_model

    loaded = load_pretrained_model(args.model_path, model_base=args.model_base,
                                   tower_paths=parse_tower_paths(args.tower_path), load_8bit=args.load_8bit,
                                   load_4bit=args.load_4bit, device=args.device, dtype=args.dtype)
    if args.conv_mode:
        from cambrian.conversation import get_template

        get_template(args.conv_mode)  # unknown names fail here, with the list of known ones
        loaded.model.template_name = args.conv_mode
    return loaded


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cambrian.serve.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--image-file", action="append", default=[],
                        help="image to ask about (repeatable for several images); omit for text-only chat")
    parser.add_argument("--query", default=None, help="ask this one question and exit (else interactive)")
    parser.add_argument("--no-stream", action="store_true", help="print the answer at the end instead of streaming")
    args = parser.parse_args(argv)

    from cambrian.model.image_processing import ImageLoadError, load_image

    try:
        images = [load_image(path) for path in args.image_file]
    except ImageLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        _tokenizer, model, _proc, _ctx = load_from_args(args)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from cambrian.conversation import get_template
    from cambrian.mm_utils import place_images
    from cambrian.model.generation import generate_from_prompts

    conv = get_template(model.template_name or "vicuna_v1")
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
               template=model.template_name)

    def ask(question: str, first: bool) -> str:
        if first:
            question = place_images(question, len(images), model.config.image_after_question)
        conv.append_message(conv.roles[0], question)
        conv.append_message(conv.roles[1], None)
        stream = None if args.no_stream else (lambda piece: print(piece, end="", flush=True))
        answer = generate_from_prompts(model, [conv.get_prompt()], [images], stream_callback=stream, **gen)[0]
        print(answer if args.no_stream else "", flush=True)
        conv.messages[-1][1] = answer
        return answer

    if args.query is not None:
        if not args.no_stream:
            print(f"{role_label(conv.roles[1])}: ", end="", flush=True)
        ask(args.query, first=True)
        return 0

    print(f"Chatting with {args.model_path} (template {model.template_name}). Empty line or Ctrl-D to quit.")
    first = True
    while True:
        try:
            question = input(f"{role_label(conv.roles[0])}: ")
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not question.strip():
            break
        print(f"{role_label(conv.roles[1])}: ", end="", flush=True)
        ask(question, first)
        first = False
    return 0


if __name__ == "__main__":
    sys.exit(main())
