"""Make the "pretrained" inputs of a tiny Cambrian training run: an LLM folder, four vision tower folders and a
small synthetic LLaVA-format data set, all random / generated locally (nothing is downloaded).

    python scripts/tiny_inputs.py OUT_DIR [--train 32] [--seed 0] [--llm llama]

writes OUT_DIR/llm (transformers LLM + tokenizer), OUT_DIR/towers/<name> (transformers tower folders),
OUT_DIR/data/train.jsonl (+ images) and OUT_DIR/tiny_args.json (the multimodal arguments and --tower_paths for
`python -m cambrian.train`; see scripts/train_tiny.sh).  Tests import `make_tiny_inputs` and `tiny_model_args`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def tiny_model_args(template: str = "llama_3") -> list[str]:
    """The multimodal arguments matching `cambrian.model.tiny.tiny_config` (4 towers, SVA with 2 in-LLM layers)."""
    from cambrian.model.tiny import TOWER_NAMES

    return [
        "--version", template,
        "--vision_tower_aux_list", json.dumps(TOWER_NAMES),
        "--vision_tower_aux_token_len_list", "[64, 64, 64, 256]",
        "--image_token_len", "16", "--num_query_group", "1", "--query_num_list", "[16]",
        "--connector_depth", "2", "--vision_hidden_size", "32", "--connector_only", "False",
        "--num_of_vision_sampler_layers", "2", "--start_of_vision_sampler_layers", "0",
        "--stride_of_vision_sampler_layers", "2", "--mm_projector_type", "sva", "--mm_vision_select_layer", "-2",
        "--image_aspect_ratio", "pad",
    ]


def make_tiny_inputs(root: str, n_train: int = 32, seed: int = 0, llm_type: str = "llama",
                     template: str = "llama_3") -> dict[str, Any]:
    """Write the inputs under `root` (idempotent: existing parts are reused); returns their paths."""
    from cambrian.data.synthetic import write_dataset
    from cambrian.model.tiny import build_tiny_model
    from cambrian.model.vision_towers import tower_dir_name

    llm_dir = os.path.join(root, "llm")
    tower_root = os.path.join(root, "towers")
    data_dir = os.path.join(root, "data")
    model = None
    tower_paths: dict[str, str] = {}
    if not os.path.isfile(os.path.join(llm_dir, "config.json")):
        model = build_tiny_model(llm_type, template=template, seed=seed)
        model.llm.save_pretrained(llm_dir)
        model.tokenizer.save_pretrained(llm_dir)
    from cambrian.model.tiny import TOWER_NAMES

    for name in TOWER_NAMES:
        path = os.path.join(tower_root, tower_dir_name(name))
        tower_paths[name] = path
    if not all(os.path.isfile(os.path.join(p, "config.json")) for p in tower_paths.values()):
        model = model or build_tiny_model(llm_type, template=template, seed=seed)
        for name, tower in zip(TOWER_NAMES, model.vision_towers):
            tower.save_pretrained(tower_paths[name])
    train_file = os.path.join(data_dir, "train.jsonl")
    if not os.path.isfile(train_file):
        write_dataset(data_dir, n_train, 4, seed=seed)
    out = {"root": root, "llm": llm_dir, "tower_paths": tower_paths, "data": train_file,
           "model_args": tiny_model_args(template)}
    with open(os.path.join(root, "tiny_args.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--llm", default="llama")
    parser.add_argument("--template", default="llama_3")
    args = parser.parse_args(argv)
    out = make_tiny_inputs(args.out_dir, args.train, args.seed, args.llm, args.template)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
