"""`make demo`: build a tiny Cambrian checkpoint with the project's own code and chat with it.

The model is RANDOMLY INITIALISED AND UNTRAINED (the training issue replaces it with a trained built-in
model): its answers are meaningless token soup.  What the demo shows is the whole path working end to
end: four vision towers of the released kinds -> SVA connector with in-LLM sampler layers -> LLaMA-style
LLM, saved in the released checkpoint layout, loaded back with `load_pretrained_model`, and queried
through the CLI on a generated image.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

BANNER = "NOTE: this demo model is randomly initialised and UNTRAINED - its answers are meaningless."


def draw_example_image(path: str) -> None:
    """A small picture of coloured shapes (what the future built-in model is trained on)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 72), (235, 235, 235))
    d = ImageDraw.Draw(img)
    d.ellipse((8, 10, 38, 40), fill=(220, 30, 30))
    d.rectangle((52, 24, 84, 56), fill=(30, 60, 220))
    d.polygon([(20, 66), (34, 44), (48, 66)], fill=(40, 170, 60))
    img.save(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cambrian.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="demo_output", help="where the checkpoint and image go")
    parser.add_argument("--llm", default="llama", help="tiny LLM backend: llama, mistral, phi3, gemma, cohere, qwen2")
    parser.add_argument("--query", default="What color is the circle?")
    args = parser.parse_args(argv)

    print(BANNER, flush=True)
    t0 = time.time()
    from cambrian.model.builder import save_pretrained
    from cambrian.model.tiny import build_tiny_model
    from cambrian.serve import cli

    ckpt = os.path.join(args.output_dir, f"tiny-cambrian-{args.llm}-untrained")
    image = os.path.join(args.output_dir, "example.png")
    os.makedirs(args.output_dir, exist_ok=True)
    print(f"[1/3] building a tiny random Cambrian model ({args.llm} LLM, SVA connector, 4 towers) ...", flush=True)
    model = build_tiny_model(args.llm)
    n_params = sum(p.numel() for p in model.parameters())
    save_pretrained(model, ckpt, save_towers=True)
    print(f"      {n_params:,} parameters, saved to {ckpt} (released layout + vision_towers/)", flush=True)
    draw_example_image(image)
    print(f"[2/3] drew an example image: {image}", flush=True)
    print(f"[3/3] python -m cambrian.serve.cli --model-path {ckpt} --image-file {image} --query {args.query!r}",
          flush=True)
    print(f"USER: {args.query}")
    rc = cli.main(["--model-path", ckpt, "--image-file", image, "--query", args.query, "--max-new-tokens", "12"])
    print(f"done in {time.time() - t0:.1f}s. {BANNER}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
