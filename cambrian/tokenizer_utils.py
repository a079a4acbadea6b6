"""Train a tiny byte-level BPE tokenizer offline (tests, demo, tiny random models).

Byte-level means every string is encodable (no <unk>) and decoding gives the text back exactly, which the
label-masking tests rely on.  The chat templates' special tokens are single tokens, split out before BPE.
"""
from __future__ import annotations

from typing import Iterable, Sequence

__all__ = ["DEFAULT_SPECIAL_TOKENS", "DEFAULT_CORPUS", "TEMPLATE_BOS_EOS", "train_tokenizer"]

# Every marker used by the templates in cambrian.conversation, plus the usual bos/eos/pad/unk.
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (
    "<unk>", "<pad>", "<s>", "</s>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",  # llama_3
    "<|im_start|>", "<|im_end|>",                                                                   # chatml
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",                                           # phi3
    "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",                                           # gemma
)

DEFAULT_CORPUS: tuple[str, ...] = (
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "You are Cambrian, a highly intelligent multimodal AI trained by NYU Vision X.",
    "Whenever an image is present in the conversation, very carefully examine it.",
    "USER: What is shown in the image? ASSISTANT: A cat sitting on a red chair.",
    "What color is the cat? The cat is black and white.",
    "Describe the picture. There are two dogs playing in the green grass near a tree.",
    "How many people are in the photo? There are three people standing by the sea.",
    "[INST] What is this? [/INST] This is a small blue car on the street.",
    "user assistant system model",
)

# (bos, eos) per chat template.  eos is the template's end-of-turn token, so a tiny model's `generate` stops
# where the template says a reply ends (as the Llama-3/Phi-3/Gemma instruct generation configs do).
TEMPLATE_BOS_EOS: dict[str, tuple[str, str]] = {
    "llama_3": ("<|begin_of_text|>", "<|eot_id|>"),
    "vicuna_v1": ("<s>", "</s>"),
    "chatml_direct": ("<s>", "<|im_end|>"),
    "phi3": ("<s>", "<|end|>"),
    "gemma": ("<bos>", "<end_of_turn>"),
    "mistral_instruct": ("<s>", "</s>"),
    "plain": ("<s>", "</s>"),
}


def train_tokenizer(
    texts: Iterable[str] | None = None,
    vocab_size: int = 384,
    special_tokens: Sequence[str] | None = None,
    *,
    template: str | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = "<pad>",
    unk_token: str | None = "<unk>",
    add_bos_token: bool = True,
    model_max_length: int = 4096,
):
    """Train a byte-level BPE tokenizer in memory and wrap it as a transformers fast tokenizer.

    Args:
        texts: training sentences (default: DEFAULT_CORPUS).  Same inputs -> same vocabulary (deterministic).
        vocab_size: total size including the 256 byte tokens and the special tokens (BPE stops early if the
            corpus runs out of merges, so the result may be smaller).
        special_tokens: atomic tokens, ids 0..n-1 in this order (default: DEFAULT_SPECIAL_TOKENS); bos/eos/pad/
            unk are appended if missing.
        template: a chat template name (cambrian.conversation): picks bos/eos from TEMPLATE_BOS_EOS and adds a
            rendered sample conversation to the training texts.
        bos_token / eos_token: default from `template`, else "<s>" / "</s>".
        pad_token / unk_token: the tokenizer's roles (None = unset).
        add_bos_token: prepend bos_token on every encode with add_special_tokens=True (like Llama tokenizers).
        model_max_length: stored in tokenizer_config.json.

    Returns a `transformers.PreTrainedTokenizerFast`; `save_pretrained` + `AutoTokenizer.from_pretrained`
    round-trips it (bos handling included, via the saved post-processor).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(DEFAULT_CORPUS if texts is None else texts)
    t_bos, t_eos = ("<s>", "</s>")
    if template is not None:
        from .conversation import get_template

        conv = get_template(template)  # unknown name -> ValueError listing the known ones
        t_bos, t_eos = TEMPLATE_BOS_EOS.get(conv.name, (t_bos, t_eos))
        for role, text in (("user", "<image>\nWhat is shown in the image?"), ("assistant", "A cat."),
                           ("user", "What color is it?"), ("assistant", "Black.")):
            conv.append_message(role, text)
        texts.append(conv.get_prompt())
    bos_token = t_bos if bos_token is None else bos_token
    eos_token = t_eos if eos_token is None else eos_token

    specials = list(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
    for t in (unk_token, pad_token, bos_token, eos_token):
        if t is not None and t not in specials:
            specials.append(t)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size {vocab_size} < 256 byte tokens + {len(specials)} special tokens")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, min_frequency=1,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if add_bos_token and bos_token is not None:
        bos_id = tok.token_to_id(bos_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos_id)]
        )

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, unk_token=unk_token,
        model_max_length=model_max_length, padding_side="right",
    )
