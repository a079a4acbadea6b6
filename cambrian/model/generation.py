"""Text generation for `CambrianForCausalLM.generate`: prompts + images in, strings out.

Prompts are built with the model's conversation template, tokenised with `<image>` -> -200, left-padded
into one batch, and handed to transformers' `generate` on the spliced embeddings (KV cache, greedy or
sampling, stop strings and streaming all come from transformers).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

if TYPE_CHECKING:
    from .modeling import CambrianForCausalLM


class CallbackStreamer:
    """A transformers streamer that hands each new piece of text of batch row 0 to a callback."""

    def __init__(self, tokenizer: Any, callback: Callable[[str], None]) -> None:
        self.tokenizer, self.callback = tokenizer, callback
        self.ids: list[int] = []
        self.emitted = ""
        self.started = False

    def put(self, value: torch.Tensor) -> None:
        if not self.started:  # the first call carries the prompt (empty with inputs_embeds)
            self.started = True
            return
        value = value.reshape(-1, value.shape[-1] if value.dim() > 1 else 1)
        self.ids.extend(int(t) for t in value[0])
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        if len(text) > len(self.emitted) and text.startswith(self.emitted):
            self.callback(text[len(self.emitted):])
            self.emitted = text


def build_prompt(template_name: str, question: str, num_images: int, image_after_question: bool = False) -> str:
    """One user turn (with `<image>` placeholders, see `place_images`) and an open assistant turn in the template's
    format."""
    from ..conversation import get_template
    from ..mm_utils import place_images

    conv = get_template(template_name)
    question = place_images(question, num_images, image_after_question)
    conv.append_message(conv.roles[0], question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) ids and attention mask, padded on the left (what batched decoding needs)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def _images_per_prompt(images: Sequence[Any] | None, n_prompts: int) -> list[list[Any]]:
    if images is None:
        return [[] for _ in range(n_prompts)]
    if len(images) != n_prompts:
        raise ValueError(f"got {len(images)} image entries for {n_prompts} prompts (give one entry per prompt; "
                         "use a list for several images in one prompt and None for none)")
    out = []
    for entry in images:
        if entry is None:
            out.append([])
        elif isinstance(entry, (list, tuple)):
            out.append(list(entry))
        else:
            out.append([entry])
    return out


def generate_text(model: "CambrianForCausalLM", images: Sequence[Any] | None, prompts: Sequence[str], *,
                  template: str | None = None, **kwargs: Any) -> list[str]:
    """One-turn questions: wrap each prompt in the template, then `generate_from_prompts`."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("no prompts given")
    template_name = template or model.template_name or "vicuna_v1"
    per_prompt = _images_per_prompt(images, len(prompts))
    after = model.config.image_after_question
    texts = [build_prompt(template_name, q, len(ims), after) for q, ims in zip(prompts, per_prompt)]
    return generate_from_prompts(model, texts, per_prompt, template=template_name, **kwargs)


def generate_from_prompts(model: "CambrianForCausalLM", texts: Sequence[str], images: Sequence[Sequence[Any]], *,
                          max_new_tokens: int = 128, temperature: float = 0.0, top_p: float | None = None,
                          stop: Sequence[str] | None = None, template: str | None = None,
                          stream_callback: Callable[[str], None] | None = None, seed: int | None = None) -> list[str]:
    """Continue fully formatted prompt strings (with `<image>` placeholders); `images[i]` are prompt i's images."""
    from ..conversation import get_template
    from ..mm_utils import tokenizer_image_token
    from .image_processing import load_image, process_images

    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("the model has no tokenizer attached (load it with load_pretrained_model)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    conv = get_template(template or model.template_name or "vicuna_v1")
    flat = [load_image(im) for ims in images for im in ims]
    ids = [tokenizer_image_token(t, tokenizer) for t in texts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention_mask = left_pad(ids, pad_id if pad_id is not None else 0)

    pixel_values, image_sizes = (None, None)
    if flat:
        pixel_values, image_sizes = process_images(flat, model.image_processors, model.config.image_aspect_ratio)

    stop_strings = [s for s in ([conv.stop_str] if conv.stop_str else []) + list(stop or []) if s]
    eos_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for s in stop_strings:  # stop strings that are single (special) tokens stop generation directly
        tid = tokenizer.convert_tokens_to_ids(s)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in eos_ids:
            eos_ids.append(tid)
    gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_ids or None)
    if temperature and temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=float(temperature), top_p=top_p if top_p is not None else 1.0, top_k=0)
    else:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stop_strings:
        gen_kwargs.update(stop_strings=stop_strings, tokenizer=tokenizer)
    if stream_callback is not None:
        gen_kwargs["streamer"] = CallbackStreamer(tokenizer, stream_callback)
    if seed is not None:
        torch.manual_seed(seed)

    device = model.device
    out = model.generate_ids(input_ids.to(device), pixel_values, image_sizes, attention_mask.to(device), **gen_kwargs)
    answers = []
    for row in out:
        text = tokenizer.decode(row, skip_special_tokens=True)
        for s in stop_strings:
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
        answers.append(text.strip())
    return answers
