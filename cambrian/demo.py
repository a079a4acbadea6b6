"""`make demo`: the built-in demo model, a tiny Cambrian trained on the project's synthetic shapes data.

With the committed checkpoint (`cambrian/assets/tiny-cambrian-shapes`) the demo scores it on the held-out split
and answers a question about an example image through the CLI.  Without it (or with `--retrain`) it first trains
one from scratch with the two-stage recipe, exactly as the committed one was made:

  1. data      `cambrian.data.synthetic`: coloured shapes on a 3×3 grid, questions about colour, shape, count,
               relative position and size; train and held-out splits with no shared image.
  2. parts     the "pretrained" inputs, random-init and written like downloaded ones would be: a SigLIP-type
               tower (48 px, 16-px patches: one token per grid cell), a 3-layer LLaMA-type LLM and a BPE tokenizer
               trained on the data's words.
  3. stage 1   `python -m cambrian.train --tune_mm_mlp_adapter True`: connector alignment, LLM and tower frozen.
  4. stage 2   `python -m cambrian.train --pretrain_mm_mlp_adapter <stage 1>`: connector + LLM.
  5. score     greedy generation on the held-out split: accuracy per question type and overall.

The model is an SVA connector (one in-LLM sampler layer) between the tower and the LLM; about 0.8 M parameters.
Training takes about 4-5 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
COMMITTED_CHECKPOINT = os.path.join(PACKAGE_DIR, "assets", "tiny-cambrian-shapes")
TOWER_NAME = "tiny/siglip-48-p16"
SCORES_FILE = "heldout_scores.json"


@dataclass
class DemoRecipe:
    """Everything that defines the demo model and its training run (the committed checkpoint used the defaults)."""

    seed: int = 0
    question_types: tuple[str, ...] = ("color", "shape", "count", "position", "size")
    n_train: int = 30_000
    n_heldout: int = 500
    image_size: int = 48            # tower input; one 16-px patch per cell of the 3×3 grid
    patch_size: int = 16
    tower_hidden: int = 32
    tower_layers: int = 2
    llm_hidden: int = 128
    llm_layers: int = 3
    llm_heads: int = 8              # 8 heads of 16 rather than 4 of 32: count questions 70% vs 52% after 2,000 steps
    vocab_size: int = 512
    vision_hidden: int = 64         # SVA hidden size
    template: str = "gemma"
    # The question comes before the image ("<question>\n<image>"; recorded as config.image_after_question): the
    # image tokens can then attend to the question.  Measured: 84% held-out after 1,500 steps against 61% with the
    # image first.
    question_first: bool = True
    batch_size: int = 32
    stage1_steps: int = 100
    stage2_steps: int = 3500
    # The connector learns at a far lower rate than the LLM.  Measured (ideal per-cell features through the SVA
    # connector, 600 steps): connector lr 1e-3 -> 54% held-out, 2e-4 -> 78%, 5e-5 -> 83%; with lr 1e-3 the
    # connector's updates scramble the per-cell features before the random-init LLM has learnt to read them.
    connector_lr: float = 5e-5
    llm_lr: float = 1e-3
    warmup_ratio: float = 0.05

    def data_config(self):
        """The synthetic data's `SyntheticConfig` (default geometry, this recipe's question types)."""
        from cambrian.data.synthetic import SyntheticConfig

        return SyntheticConfig(question_types=tuple(self.question_types))

    def splits(self):
        """(train, held-out) `SyntheticSample`s, the same as the files `write_data` writes."""
        from cambrian.data.synthetic import make_splits

        return make_splits(self.n_train, self.n_heldout, seed=self.seed, config=self.data_config())

    @property
    def grid_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def model_args(recipe: DemoRecipe) -> list[str]:
    """The multimodal arguments of `python -m cambrian.train` for the demo model."""
    n = recipe.grid_tokens
    return [
        "--version", recipe.template,
        "--vision_tower_aux_list", json.dumps([TOWER_NAME]),
        "--vision_tower_aux_token_len_list", json.dumps([n]),
        "--image_token_len", str(n), "--num_query_group", "1", "--query_num_list", json.dumps([n]),
        "--connector_depth", "1", "--vision_hidden_size", str(recipe.vision_hidden), "--connector_only", "False",
        "--num_of_vision_sampler_layers", "1", "--start_of_vision_sampler_layers", "0",
        "--stride_of_vision_sampler_layers", "1", "--mm_projector_type", "sva", "--mm_vision_select_layer", "-2",
        "--mm_connector_init", "orthogonal", "--image_aspect_ratio", "pad",
        "--image_after_question", str(recipe.question_first),
    ]


# ------------------------------------------------------------------------------------------------ 1-2: inputs
def write_data(out_dir: str, recipe: DemoRecipe, progress: bool = True) -> dict[str, str]:
    """The synthetic train / held-out splits as LLaVA JSONL + PNGs under `out_dir` (reused if already there)."""
    from cambrian.data.synthetic import write_dataset

    config = recipe.data_config()
    meta_path = os.path.join(out_dir, "meta.json")
    paths = {"train": os.path.join(out_dir, "train.jsonl"), "heldout": os.path.join(out_dir, "heldout.jsonl"),
             "meta": meta_path}
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if (meta.get("seed"), meta.get("question_first"), meta.get("counts"), meta.get("config")) == (
                recipe.seed, recipe.question_first, {"train": recipe.n_train, "heldout": recipe.n_heldout},
                json.loads(json.dumps(dataclasses.asdict(config)))):
            return paths
    return write_dataset(out_dir, recipe.n_train, recipe.n_heldout, seed=recipe.seed, config=config,
                         progress=progress, question_first=recipe.question_first)


def build_parts(out_dir: str, recipe: DemoRecipe) -> dict[str, Any]:
    """Write the random-init "pretrained" parts: `<out_dir>/llm` (LLM + tokenizer), `<out_dir>/towers/<tower>`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, SiglipVisionConfig

    from cambrian.conversation import get_template
    from cambrian.data.synthetic import NUMBER_WORDS, tokenizer_corpus
    from cambrian.model.vision_towers import build_vision_tower, tower_dir_name
    from cambrian.tokenizer_utils import train_tokenizer

    llm_dir = os.path.join(out_dir, "llm")
    tower_dir = os.path.join(out_dir, "towers", tower_dir_name(TOWER_NAME))
    torch.manual_seed(recipe.seed)
    # The tokenizer learns every question and answer word of the data, in the chat template's layout.
    corpus = tokenizer_corpus()
    for question, answer in (("What color is the circle?", "red"), ("How many shapes are there?", NUMBER_WORDS[3])):
        conv = get_template(recipe.template)
        conv.append_message(conv.roles[0], "<image>\n" + question)
        conv.append_message(conv.roles[1], answer)
        corpus.append(conv.get_prompt())
    tokenizer = train_tokenizer(corpus, vocab_size=recipe.vocab_size, template=recipe.template)
    llm_config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=recipe.llm_hidden, intermediate_size=2 * recipe.llm_hidden,
        num_hidden_layers=recipe.llm_layers, num_attention_heads=recipe.llm_heads,
        num_key_value_heads=recipe.llm_heads, max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    llm = AutoModelForCausalLM.from_config(llm_config)
    llm.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    tower = build_vision_tower("siglip", SiglipVisionConfig(
        image_size=recipe.image_size, patch_size=recipe.patch_size, hidden_size=recipe.tower_hidden,
        intermediate_size=2 * recipe.tower_hidden, num_hidden_layers=recipe.tower_layers, num_attention_heads=4),
        name=TOWER_NAME)
    tower.save_pretrained(tower_dir)
    return {"llm": llm_dir, "tower_paths": {TOWER_NAME: tower_dir}}


# ------------------------------------------------------------------------------------------------ 3-4: training
def stage_argv(stage: int, parts: dict[str, Any], data: dict[str, str], out: str, recipe: DemoRecipe,
               stage1_dir: str | None = None) -> list[str]:
    """The `python -m cambrian.train` command line of one stage."""
    steps = recipe.stage1_steps if stage == 1 else recipe.stage2_steps
    argv = ["--model_name_or_path", parts["llm"], *model_args(recipe),
            "--tower_paths", json.dumps(parts["tower_paths"]), "--data_path", data["train"],
            "--output_dir", out, "--per_device_train_batch_size", str(recipe.batch_size), "--max_steps", str(steps),
            "--lr_scheduler_type", "cosine", "--warmup_ratio", str(recipe.warmup_ratio), "--weight_decay", "0",
            "--adam_beta2", "0.98", "--max_grad_norm", "1.0", "--model_max_length", "128", "--seed", str(recipe.seed),
            "--data_seed", str(recipe.seed), "--dataloader_num_workers", "0", "--report_to", "none",
            "--save_strategy", "no", "--logging_steps", "500", "--disable_tqdm", "False"]
    connector_lrs = ["--mm_projector_lr", str(recipe.connector_lr), "--mm_vision_sampler_lr", str(recipe.connector_lr)]
    if stage == 1:
        argv += ["--tune_mm_mlp_adapter", "True", "--learning_rate", str(recipe.connector_lr), *connector_lrs]
    else:
        argv += ["--learning_rate", str(recipe.llm_lr), *connector_lrs]
        if stage1_dir:
            argv += ["--pretrain_mm_mlp_adapter", stage1_dir]
    return argv


def run_stage(argv: list[str]) -> None:
    from cambrian.train.__main__ import main as train_main

    rc = train_main(argv)
    if rc != 0:
        raise RuntimeError(f"training stage failed (exit code {rc}): python -m cambrian.train {' '.join(argv)}")


def train_demo_model(out_dir: str, recipe: DemoRecipe | None = None, log=print) -> str:
    """Run steps 1-4 under `out_dir`; returns the self-contained checkpoint folder (`<out_dir>/model`)."""
    recipe = recipe or DemoRecipe()
    t0 = time.time()
    log("[1/5] synthetic data (coloured shapes; color / shape / count / position / size questions) ...")
    data = write_data(os.path.join(out_dir, "data"), recipe)
    log(f"[2/5] random-init parts: SigLIP-type tower {recipe.image_size} px, {recipe.llm_layers}-layer LLaMA-type "
        f"LLM (hidden {recipe.llm_hidden}), BPE tokenizer ...")
    parts = build_parts(os.path.join(out_dir, "init"), recipe)
    stage1_dir = None
    if recipe.stage1_steps > 0:
        log(f"[3/5] stage 1, connector alignment: {recipe.stage1_steps} steps ...")
        stage1_dir = os.path.join(out_dir, "stage1")
        run_stage(stage_argv(1, parts, data, stage1_dir, recipe))
    else:
        log("[3/5] stage 1 skipped (--stage1-steps 0)")
    log(f"[4/5] stage 2, instruction tuning: {recipe.stage2_steps} steps ...")
    stage2_dir = os.path.join(out_dir, "stage2")
    run_stage(stage_argv(2, parts, data, stage2_dir, recipe, stage1_dir))
    # Released checkpoints do not carry their towers; the demo's random tower exists nowhere else, so it goes
    # into the checkpoint (vision_towers/, where load_pretrained_model looks first).
    model_dir = os.path.join(out_dir, "model")
    if os.path.isdir(model_dir):
        shutil.rmtree(model_dir)
    # training_args.bin is a pickle (transformers writes it): not part of a checkpoint anyone should load
    shutil.copytree(stage2_dir, model_dir,
                    ignore=shutil.ignore_patterns("checkpoint-*", "runs", "*.log", "training_args.bin"))
    for name, path in parts["tower_paths"].items():
        from cambrian.model.vision_towers import tower_dir_name

        shutil.copytree(path, os.path.join(model_dir, "vision_towers", tower_dir_name(name)), dirs_exist_ok=True)
    with open(os.path.join(model_dir, "demo_recipe.json"), "w", encoding="utf-8") as f:
        import torch

        json.dump({**dataclasses.asdict(recipe), "train_seconds": round(time.time() - t0, 1),
                   "torch_threads": torch.get_num_threads(), "torch": torch.__version__}, f, indent=2)
    return model_dir


# ------------------------------------------------------------------------------------------------ 5: scoring
def evaluate(model_dir: str, heldout: Sequence[Any], batch_size: int = 100, progress: bool = True) -> dict[str, float]:
    """Held-out accuracy per question type: greedy generation of each answer, compared on its first word.
    heldout: `SyntheticSample`s (`cambrian.data.synthetic.make_splits`)."""
    import torch

    from cambrian.data.synthetic import score
    from cambrian.model.builder import load_pretrained_model

    model = load_pretrained_model(model_dir, dtype=torch.float32).model.eval()
    predictions: list[str] = []
    batches = range(0, len(heldout), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="held-out", unit=" batch", file=sys.stderr)
    with torch.inference_mode():
        for i in batches:
            chunk = heldout[i:i + batch_size]
            predictions += model.generate([s.image for s in chunk], [s.question for s in chunk],
                                      max_new_tokens=3)
    return score(predictions, heldout)


def draw_example_image(path: str, seed: int = 0) -> tuple[str, str]:
    """An example scene from the held-out distribution; returns (a question about it, its answer)."""
    from cambrian.data.synthetic import SyntheticConfig, generate

    sample = generate(1, seed=seed, split="example", config=SyntheticConfig(question_types=("color",)))[0]
    sample.image.save(path)
    return sample.question, sample.answer


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat (Linux), or None."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])


def idle_cores(sample_seconds: float = 0.5) -> int:
    """CPU cores not taken by other work right now (measured over `sample_seconds` from /proc/stat; all cores
    where that is not available), at least 1.

    Why: a tiny model's steps are many small parallel regions; with 2 OpenMP threads and another process busy
    on one of 2 cores, every region waits for a time slice and a step took 4 s instead of 0.1 s (measured).
    One thread per idle core avoids that.  (The load average lags by a minute, so it is not used.)"""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    before = _cpu_times()
    if before is None:
        return cores
    time.sleep(sample_seconds)
    after = _cpu_times()
    idle, total = after[0] - before[0], after[1] - before[1]
    if total <= 0:
        return cores
    all_cpus = os.cpu_count() or cores  # /proc/stat counts every CPU, not only this process's
    free = idle / total * all_cpus
    return max(1, min(cores, int(free + 0.3)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cambrian.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="demo_output", help="data, training runs, example image")
    parser.add_argument("--checkpoint", default=COMMITTED_CHECKPOINT,
                        help="trained demo checkpoint to use (default: the committed one)")
    parser.add_argument("--retrain", action="store_true",
                        help="train a new model into <output-dir>/model even if the checkpoint exists")
    parser.add_argument("--stage1-steps", type=int, default=DemoRecipe.stage1_steps)
    parser.add_argument("--stage2-steps", type=int, default=DemoRecipe.stage2_steps)
    parser.add_argument("--train-samples", type=int, default=DemoRecipe.n_train)
    parser.add_argument("--heldout-samples", type=int, default=DemoRecipe.n_heldout)
    parser.add_argument("--save-checkpoint", default=None, metavar="DIR",
                        help="after --retrain, also copy the trained model to DIR (`make demo-model` replaces the "
                             "committed checkpoint this way)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: $OMP_NUM_THREADS if set, else the idle cores when training)")
    parser.add_argument("--query", default=None, help="question about the example image (default: one that fits it)")
    args = parser.parse_args(argv)
    recipe = DemoRecipe(stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps, n_train=args.train_samples,
                        n_heldout=args.heldout_samples)
    t0 = time.time()
    import torch

    os.makedirs(args.output_dir, exist_ok=True)
    model_dir = args.checkpoint
    trained = args.retrain or not os.path.isfile(os.path.join(model_dir, "config.json"))
    threads = args.threads or (int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit()
                               else idle_cores() if trained else None)  # scoring alone takes a second: no sampling
    if threads:
        torch.set_num_threads(threads)
    if trained:
        if not args.retrain:
            print(f"no trained demo model at {model_dir}: training one (about 5 minutes on 2 cores)", flush=True)
        print(f"      {threads} torch thread(s)", flush=True)
        model_dir = train_demo_model(args.output_dir, recipe)
        print(f"      trained in {time.time() - t0:.0f}s -> {model_dir}", flush=True)
        if args.save_checkpoint:
            if os.path.isdir(args.save_checkpoint):
                shutil.rmtree(args.save_checkpoint)
            shutil.copytree(model_dir, args.save_checkpoint)
            model_dir = args.save_checkpoint
            print(f"      copied to {model_dir}", flush=True)
    else:
        print(f"[1-4/5] using the trained demo model {model_dir} (--retrain trains a new one)", flush=True)

    from cambrian.data.synthetic import format_scores

    print(f"[5/5] scoring {recipe.n_heldout} held-out questions ...", flush=True)
    _, heldout = recipe.splits()
    try:
        scores = evaluate(model_dir, heldout)
    except (OSError, ValueError) as exc:  # a damaged checkpoint folder: say so instead of a traceback
        print(f"error: cannot load the demo model at {model_dir}: {exc}\n"
              f"(python -m cambrian.demo --retrain trains a new one)", file=sys.stderr)
        return 2
    print(format_scores(scores), flush=True)
    if trained:  # recorded with the checkpoint (tests/test_demo.py checks the committed one still scores this)
        with open(os.path.join(model_dir, SCORES_FILE), "w", encoding="utf-8") as f:
            json.dump({"n_heldout": len(heldout), "scores": scores}, f, indent=2)

    from cambrian.serve import cli

    image = os.path.join(args.output_dir, "example.png")
    question, answer = draw_example_image(image)
    query = args.query or question
    print(f"\npython -m cambrian.serve.cli --model-path {model_dir} --image-file {image} --query {query!r}", flush=True)
    print(f"USER: {query}" + ("" if args.query else f"   (expected: {answer})"), flush=True)
    rc = cli.main(["--model-path", model_dir, "--image-file", image, "--query", query, "--max-new-tokens", "8"])
    print(f"done in {time.time() - t0:.1f}s", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
