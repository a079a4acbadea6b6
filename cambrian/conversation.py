"""Chat templates: turn a list of (role, text) messages into the exact prompt string a model was trained on.

The three released Cambrian-1 templates (`llama_3` for 8B, `vicuna_v1` for 13B, `chatml_direct` for 34B) are
reproduced byte for byte (see ../shared/design/template_vectors.json), plus the standard chat formats of Phi-3,
Gemma and Mistral-Instruct, and `plain` (LLaVA pretraining: image then caption).

A conversation is rendered as a list of *segments* (`Conversation.segments()`); `get_prompt()` is their
concatenation. The segments tell `cambrian.mm_utils.build_training_example` which characters are an assistant
reply (trained) and which are template scaffolding (masked), so masking works the same way for every template.

Usage::

    conv = get_template("llama_3")
    conv.append_message("user", "<image>\\nWhat is shown?")
    conv.append_message("assistant", None)          # open turn: the model writes the reply
    prompt = conv.get_prompt()
    # generate until conv.stop_str ("<|eot_id|>")
"""
from __future__ import annotations

import copy as _copy
import dataclasses
import re
from enum import Enum
from typing import NamedTuple

__all__ = [
    "SeparatorStyle",
    "Conversation",
    "Segment",
    "TEMPLATES",
    "get_template",
    "default_template_for",
    "LLAMA3_SYSTEM",
    "VICUNA_SYSTEM",
    "CHATML_SYSTEM",
    "PHI3_SYSTEM",
]

# System prompts of the released templates, copied from template_vectors.json.  The llama_3 one keeps its literal
# "\n    " runs and the trailing spaces (the released source was an indented triple-quoted string).
LLAMA3_SYSTEM = (
    "You are Cambrian, a highly intelligent multimodal AI trained by NYU Vision X. \n"
    "    As a multimodal AI, you have the ability to process and analyze images. Whenever an image is present in "
    "the conversation, very carefully examine it and consider its content when formulating your response.\n"
    "    You should give concise responses to very simple questions, but provide thorough responses to more "
    "complex and open-ended questions. "
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CHATML_SYSTEM = (
    "You are Cambrian, a highly intelligent multimodal AI trained by NYU Vision X. As a multimodal AI, you have "
    "the ability to process and analyze images. Whenever an image is present in the conversation, very carefully "
    "examine it and consider its content when formulating your response. You should give concise responses to "
    "very simple questions, but provide thorough responses to more complex and open-ended questions."
)
PHI3_SYSTEM = "You are a helpful AI assistant."  # released Cambrian phi3 template


class SeparatorStyle(Enum):
    """How turns are wrapped.  One renderer per style in `Conversation.segments`."""

    LLAMA_3 = "llama_3"    # <|start_header_id|>role<|end_header_id|>text<|eot_id|>   (no newline after the header)
    TWO = "two"            # vicuna: "SYSTEM USER: q ASSISTANT: a</s>USER: ..."  (sep after user, sep2 after assistant)
    CHATML = "chatml"      # <|im_start|>role\ntext<|im_end|>   (released "MPT" style, no newline between turns)
    PHI3 = "phi3"          # <|user|>\ntext<|end|>\n
    GEMMA = "gemma"        # <start_of_turn>user\ntext<end_of_turn>\n
    MISTRAL = "mistral"    # [INST] q [/INST] a</s>
    PLAIN = "plain"        # pretraining: user text (the image) then caption + "\n"


class Segment(NamedTuple):
    """A piece of the rendered prompt.

    kind: "prefix" | "system" | "user" | "assistant_header" | "assistant_reply" | "sep".
    turn: index into `Conversation.messages` (-1 for prefix/system).
    An "assistant_reply" segment is exactly the text the model must produce for that turn, ending with the
    template's stop string, so it is what training labels keep.
    """

    kind: str
    text: str
    turn: int


_USER_ALIASES = {"user", "human", "usr"}
_ASSISTANT_ALIASES = {"assistant", "gpt", "model", "bot"}


@dataclasses.dataclass
class Conversation:
    """A chat template plus the conversation so far.

    Attributes:
        name: template name (key of `TEMPLATES`).
        system: system text (plain text; the style adds the wrapping tokens). Empty -> no system block
            (gemma / mistral / plain have no system block: a non-empty system is prepended to the first user turn).
        roles: (user role, assistant role) strings as the released templates spell them; `append_message`
            also accepts "user"/"assistant"/"human"/"gpt".
        messages: list of [role_index, text]; role_index 0 = user, 1 = assistant; text None = open turn.
        sep_style: rendering style.
        sep / sep2: separators (meaning depends on the style, as in the released LLaVA/Cambrian code).
        stop_str: string at which generation stops; the end-of-turn marker the model learns to emit.
        prefix: text at the very start of every prompt (e.g. "<|begin_of_text|>"); most templates rely on the
            tokenizer adding BOS instead.
    """

    name: str
    system: str
    roles: tuple[str, str]
    sep_style: SeparatorStyle
    sep: str = ""
    sep2: str | None = None
    stop_str: str = "</s>"
    prefix: str = ""
    messages: list[list] = dataclasses.field(default_factory=list)

    # ------------------------------------------------------------------ building
    def role_index(self, role: str | int) -> int:
        """Map a role (template role string, 'user'/'assistant', LLaVA 'human'/'gpt', or 0/1) to 0 or 1."""
        if isinstance(role, int) and role in (0, 1):
            return role
        if not isinstance(role, str):
            raise ValueError(f"role must be a string, got {role!r}")
        if role == self.roles[0]:
            return 0
        if role == self.roles[1]:
            return 1
        # Role strings like "<|im_start|>user\n" or "USER": compare the bare lower-cased word.
        key = role.strip().lower()
        for i, r in enumerate(self.roles):
            if r and key == re.sub(r"<\|?[a-z_]*\|?>", "", r.lower()).strip():
                return i
        if key in _USER_ALIASES:
            return 0
        if key in _ASSISTANT_ALIASES:
            return 1
        raise ValueError(f"unknown role {role!r} for template {self.name!r}; use 'user'/'assistant' or {self.roles}")

    def append_message(self, role: str | int, message: str | None) -> None:
        """Append a turn.  `message=None` on an assistant turn leaves it open for generation."""
        idx = self.role_index(role)
        if message is None and idx == 0:
            raise ValueError("only an assistant turn can be left open (message=None)")
        if message is not None and not isinstance(message, str):
            if isinstance(message, tuple) and message and isinstance(message[0], str):
                message = message[0]  # released code stores (text, image, mode) tuples; keep the text
            else:
                raise TypeError(f"message must be a str or None, got {type(message).__name__}")
        self.messages.append([idx, message])

    def copy(self) -> "Conversation":
        """An independent copy (messages list copied)."""
        return dataclasses.replace(self, messages=[list(m) for m in self.messages])

    def clear(self) -> "Conversation":
        """Drop all messages (in place) and return self."""
        self.messages = []
        return self

    # ------------------------------------------------------------------ rendering
    def _split_reply(self, lead: str, text: str, end: str) -> list[tuple[str, str]]:
        """A finished assistant turn is `lead + text + end`.  The trained part runs through the first `stop_str`
        inside `end`; any separator text after it (e.g. gemma's "\\n" after <end_of_turn>) is masked."""
        k = end.find(self.stop_str) if self.stop_str else -1
        if k < 0:
            return [("assistant_reply", lead + text + end)]
        cut = k + len(self.stop_str)
        out = [("assistant_reply", lead + text + end[:cut])]
        if end[cut:]:
            out.append(("sep", end[cut:]))
        return out

    def segments(self) -> list[Segment]:
        """Render the conversation as ordered segments; `"".join(s.text for s in segments) == get_prompt()`."""
        st = self.sep_style
        segs: list[Segment] = []
        if self.prefix:
            segs.append(Segment("prefix", self.prefix, -1))

        system_block = {
            SeparatorStyle.LLAMA_3: lambda s: f"<|start_header_id|>system<|end_header_id|>{s}{self.sep}",
            SeparatorStyle.TWO: lambda s: s + self.sep,
            SeparatorStyle.CHATML: lambda s: f"<|im_start|>system\n{s}{self.sep}",
            SeparatorStyle.PHI3: lambda s: f"<|system|>\n{s}{self.sep}\n",
        }.get(st)
        # Styles without a system block fold the system text into the first user message.
        merge_system = bool(self.system) and system_block is None
        if self.system and system_block is not None:
            segs.append(Segment("system", system_block(self.system), -1))

        first_user_seen = False
        for i, (idx, text) in enumerate(self.messages):
            if idx == 0:
                if merge_system and not first_user_seen:
                    text = f"{self.system}\n\n{text}"
                first_user_seen = True
                segs.append(Segment("user", self._user_block(text), i))
                continue
            header, lead, end = self._assistant_parts()
            if header:
                segs.append(Segment("assistant_header", header, i))
            if text is None:
                continue  # open turn: the prompt ends right after the header
            for kind, piece in self._split_reply(lead, text, end):
                segs.append(Segment(kind, piece, i))
        return segs

    def _user_block(self, text: str) -> str:
        st = self.sep_style
        if st is SeparatorStyle.LLAMA_3:
            return f"<|start_header_id|>user<|end_header_id|>{text}{self.sep}"
        if st is SeparatorStyle.TWO:
            return f"{self.roles[0]}: {text}{self.sep}"
        if st in (SeparatorStyle.CHATML, SeparatorStyle.GEMMA):
            return f"{self.roles[0]}{text}{self.sep}"
        if st is SeparatorStyle.PHI3:
            return f"{self.roles[0]}{text}{self.sep}\n"
        if st is SeparatorStyle.MISTRAL:
            return f"[INST] {text} [/INST]"
        if st is SeparatorStyle.PLAIN:
            return text
        raise ValueError(f"invalid separator style {st}")

    def _assistant_parts(self) -> tuple[str, str, str]:
        """(header, lead, end): an open assistant turn renders `header`; a finished one
        `header + lead + text + end` (lead/end are part of what the model generates)."""
        st = self.sep_style
        if st is SeparatorStyle.LLAMA_3:
            return "<|start_header_id|>assistant<|end_header_id|>", "", self.sep
        if st is SeparatorStyle.TWO:
            # The space after "ASSISTANT:" belongs to the reply: an open turn ends with "ASSISTANT:".
            return f"{self.roles[1]}:", " ", self.sep2 or ""
        if st in (SeparatorStyle.CHATML, SeparatorStyle.GEMMA):
            return self.roles[1], "", self.sep
        if st is SeparatorStyle.PHI3:
            return self.roles[1], "", self.sep + "\n"
        if st is SeparatorStyle.MISTRAL:
            return "", " ", self.sep2 or ""
        if st is SeparatorStyle.PLAIN:
            return "", "", self.sep
        raise ValueError(f"invalid separator style {st}")

    def get_prompt(self, add_generation_prompt: bool = False) -> str:
        """The prompt string.

        A trailing assistant message with text None renders as an open turn (the prompt ends where the model's
        reply starts).  `add_generation_prompt=True` appends that open turn if the last message is a user turn.
        """
        conv = self
        if add_generation_prompt and (not self.messages or self.messages[-1][0] == 0):
            conv = self.copy()
            conv.messages.append([1, None])
        return "".join(s.text for s in conv.segments())

    def dict(self) -> dict:
        """Plain-data view (for logging / serving)."""
        return {
            "name": self.name,
            "system": self.system,
            "roles": list(self.roles),
            "messages": [[self.roles[i], t] for i, t in self.messages],
            "sep_style": self.sep_style.value,
            "sep": self.sep,
            "sep2": self.sep2,
            "stop_str": self.stop_str,
        }


TEMPLATES: dict[str, Conversation] = {
    # Cambrian-1 8B (Llama-3-8B-Instruct).  Released prompt has no "\n\n" after <|end_header_id|>.
    "llama_3": Conversation(
        name="llama_3", system=LLAMA3_SYSTEM, roles=("USER", "ASSISTANT"), sep_style=SeparatorStyle.LLAMA_3,
        sep="<|eot_id|>", stop_str="<|eot_id|>", prefix="<|begin_of_text|>",
    ),
    # Cambrian-1 13B (Vicuna-1.5).
    "vicuna_v1": Conversation(
        name="vicuna_v1", system=VICUNA_SYSTEM, roles=("USER", "ASSISTANT"), sep_style=SeparatorStyle.TWO,
        sep=" ", sep2="</s>", stop_str="</s>",
    ),
    # Cambrian-1 34B (Nous-Hermes-2-Yi-34B).  Released ChatML variant: no newline between turns.
    "chatml_direct": Conversation(
        name="chatml_direct", system=CHATML_SYSTEM, roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
        sep_style=SeparatorStyle.CHATML, sep="<|im_end|>", stop_str="<|im_end|>",
    ),
    # Phi-3 instruct format.
    "phi3": Conversation(
        name="phi3", system=PHI3_SYSTEM, roles=("<|user|>\n", "<|assistant|>\n"), sep_style=SeparatorStyle.PHI3,
        sep="<|end|>", stop_str="<|end|>",
    ),
    # Gemma instruct format (no system role; BOS comes from the tokenizer).
    "gemma": Conversation(
        name="gemma", system="", roles=("<start_of_turn>user\n", "<start_of_turn>model\n"),
        sep_style=SeparatorStyle.GEMMA, sep="<end_of_turn>\n", stop_str="<end_of_turn>",
    ),
    # Mistral-Instruct: "[INST] q [/INST] a</s>[INST] q2 [/INST]" (BOS <s> comes from the tokenizer).
    "mistral_instruct": Conversation(
        name="mistral_instruct", system="", roles=("USER", "ASSISTANT"), sep_style=SeparatorStyle.MISTRAL,
        sep="", sep2="</s>", stop_str="</s>",
    ),
    # LLaVA/Cambrian pretraining: "<image>" + caption + "\n"; only the caption (and "\n") is trained.
    "plain": Conversation(
        name="plain", system="", roles=("", ""), sep_style=SeparatorStyle.PLAIN, sep="\n", stop_str="\n",
    ),
}

# Released names that point at one of the above.
_ALIASES = {"llama_v3": "llama_3", "v1": "vicuna_v1", "cambrian_chatml": "chatml_direct", "conv_gemma": "gemma",
            "v0_plain": "plain"}


def get_template(name: str) -> Conversation:
    """A fresh, empty copy of template `name` (also accepts a few released aliases, e.g. 'llama_v3', 'v1').

    Raises ValueError listing the known names for an unknown one.
    """
    key = _ALIASES.get(name, name)
    if key not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; known templates: {', '.join(sorted(TEMPLATES))}")
    return _copy.deepcopy(TEMPLATES[key]).clear()


def default_template_for(model_type_or_name: str | None, vocab_size: int | None = None) -> str:
    """Best-guess template name for an LLM, from its `model_type` (e.g. "llama", "phi3") or a model name/path
    (e.g. "nyu-visionx/cambrian-8b").  Name-based; falls back to "vicuna_v1".

    Released Cambrian-1 checkpoints: 8B -> llama_3, 13B -> vicuna_v1, 34B -> chatml_direct, phi3-3B -> phi3.
    A "llama" model with Llama-3's 128256-token vocabulary maps to llama_3.
    """
    s = (model_type_or_name or "").lower().replace("\\", "/")
    base = s.rstrip("/").rsplit("/", 1)[-1]
    words = set(re.split(r"[^a-z0-9.]+", base))
    if vocab_size in (128256, 128257, 128258) or re.search(r"llama[-_ ]?3", base):
        return "llama_3"
    if re.search(r"phi[-_ ]?3", base):
        return "phi3"
    if "gemma" in base:
        return "gemma"
    if "mistral" in base or "mixtral" in base:
        return "mistral_instruct"
    if "yi" in words or "hermes" in base or "qwen" in base or "chatml" in base:
        return "chatml_direct"
    if "cambrian" in base:  # released checkpoint names carry only the size
        if "8b" in words:
            return "llama_3"
        if "34b" in words:
            return "chatml_direct"
        if "3b" in words:
            return "phi3"
    return "vicuna_v1"
