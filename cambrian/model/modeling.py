"""`CambrianForCausalLM`: vision towers -> connector -> any transformers causal LM.

One generic wrapper instead of a copy per backend: the LLM is whatever `AutoModelForCausalLM` builds
from the config (LLaMA, Mistral, Phi-3, Gemma, Cohere, Qwen2, ...).  The wrapper

1. runs every vision tower on its own pre-processed pixels and resizes its features to the tower's token
   grid (`cambrian.kernels` does the resize),
2. runs the connector, which returns each image's tokens (h·(w+1), hidden), newline tokens included,
3. splices them into the text embeddings where the prompt has `<image>` (id -200), and
4. calls the LLM on `inputs_embeds`.  The in-LLM vision sampler layers (`connector_only: false`) run as
   forward hooks after decoder layers `start + k*stride`, on prefill only, at the actual positions of the
   image tokens in each sequence.

Checkpoint names are those of the released models: the LLM keeps its transformers names
(`model.layers.N...`, `lm_head.weight`) and the connector's live under `model.` (`model.vision_query`,
`model.mm_projector_aux_0.0.weight`, ...).  Vision tower weights are not part of the checkpoint.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from .config import CambrianConfig
from .connector import ConnectorOutput, build_connector
from .vision_towers import VisionTower, to_token_grid

CONNECTOR_PREFIX = "model."


@dataclass
class SplicedInputs:
    """Text embeddings with the image tokens written in, ready for the LLM."""

    inputs_embeds: torch.Tensor          # (B, S, hidden)
    attention_mask: torch.Tensor         # (B, S) long, 0 on padding
    position_ids: torch.Tensor           # (B, S)
    labels: torch.Tensor | None          # (B, S), IGNORE_INDEX on image tokens and padding
    image_starts: list[tuple[int, int]]  # (row, start) of each image's tokens, in image order
    connector_output: ConnectorOutput | None


class CambrianForCausalLM(nn.Module):
    """A Cambrian model: `vision_towers`, `connector`, and `llm` (a transformers causal LM).

    Build a fresh model with `CambrianForCausalLM(config, towers)`; load a released checkpoint with
    `cambrian.load_pretrained_model`.  `forward` behaves like a transformers causal LM (returns logits and,
    with labels, the loss); `generate` takes images and prompt strings and returns strings.
    """

    def __init__(self, config: CambrianConfig, vision_towers: Sequence[VisionTower] = (),
                 llm: nn.Module | None = None, attn_implementation: str | None = "sdpa") -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.config = config
        if llm is None:
            kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
            llm = AutoModelForCausalLM.from_config(config.llm_config, **kwargs)
        self.llm = llm
        towers = list(vision_towers)
        if towers and len(towers) != len(config.mm_vision_tower_aux_list):
            raise ValueError(f"config names {len(config.mm_vision_tower_aux_list)} vision towers "
                             f"({config.mm_vision_tower_aux_list}) but {len(towers)} were given")
        self.vision_towers = nn.ModuleList(towers)
        self.connector = build_connector(config, [t.hidden_size for t in towers]) if towers else None
        self.tokenizer = None  # attached by the loader / demo; needed by `generate`
        self.template_name: str | None = None
        self._sampler_context: dict[str, Any] | None = None
        self._warned_image_position = False
        self._hook_handles = []
        if self.connector is not None and config.sampler_layer_indices:
            layers = self.decoder_layers
            for k, layer_idx in enumerate(config.sampler_layer_indices):
                self._hook_handles.append(layers[layer_idx].register_forward_hook(self._make_sampler_hook(k)))

    # ------------------------------------------------------------------ parts
    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.llm.get_decoder().layers

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    @property
    def image_processors(self) -> list:
        return [t.processor for t in self.vision_towers]

    # ------------------------------------------------------------------ checkpoint names
    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict under the released checkpoint names (towers excluded, tied weights once)."""
        state = dict(self.llm.state_dict())
        if getattr(self.config.llm_config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        if self.connector is not None:
            for k, v in self.connector.state_dict().items():
                state[CONNECTOR_PREFIX + k] = v
        return state

    def connector_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the connector (a stage-1 `mm_projector.bin`), under checkpoint names."""
        if self.connector is None:
            return {}
        return {CONNECTOR_PREFIX + k: v for k, v in self.connector.state_dict().items()}

    def split_checkpoint_keys(self, keys: Sequence[str]) -> tuple[list[str], list[str]]:
        """Which checkpoint keys are the connector's and which the LLM's."""
        connector_keys = set(self.connector.state_dict()) if self.connector is not None else set()
        conn, llm = [], []
        for k in keys:
            if k.startswith(CONNECTOR_PREFIX) and k[len(CONNECTOR_PREFIX):] in connector_keys:
                conn.append(k)
            else:
                llm.append(k)
        return conn, llm

    # ------------------------------------------------------------------ vision
    def encode_images(self, images: Sequence[torch.Tensor], image_sizes: Sequence[tuple[int, int]] | None,
                      keep_full_grid: bool | None = None) -> ConnectorOutput:
        """Towers + connector.

        images: one (N, 3, R_i, R_i) tensor per tower (from `process_images`), N images in total.
        image_sizes: N original (width, height) for unpadding / masking, or None.
        ViT features are resized to their token grid here; a multi-stage (ConvNeXt) tower's stage list is
        handed to the connector as is (it resizes the stages fused with its first projection).
        """
        if self.connector is None:
            raise ValueError("this model has no vision towers: it cannot take images")
        if len(images) != len(self.vision_towers):
            raise ValueError(f"expected pixel tensors for {len(self.vision_towers)} towers, got {len(images)}")
        if self.config.image_aspect_ratio != "pad":
            image_sizes = None  # nothing was padded, so nothing is unpadded
        features = []
        for tower, pixels, side in zip(self.vision_towers, images, self.config.tower_grid_sides):
            tower_param = next(tower.parameters(), None)
            if tower_param is not None:
                pixels = pixels.to(device=tower_param.device, dtype=tower_param.dtype)
            with torch.set_grad_enabled(torch.is_grad_enabled() and tower_param is not None and tower_param.requires_grad):
                feats = tower(pixels)
            if isinstance(feats, torch.Tensor):
                features.append(to_token_grid(feats, side))  # ViT: (N, side*side, C_i)
            else:
                # multi-stage (ConvNeXt): the stage maps (N, C_k, h_k, w_k) go to the connector as they are; it
                # resizes them to the tower grid itself, fused with its first projection (no (N, side², ΣC_k) concat)
                features.append(list(feats))
        dtype = next(self.connector.parameters()).dtype
        features = [f.to(dtype) if isinstance(f, torch.Tensor) else [m.to(dtype) for m in f] for f in features]
        return self.connector(features, image_sizes=image_sizes, keep_full_grid=keep_full_grid)

    # ------------------------------------------------------------------ splicing
    def splice_image_tokens(self, input_ids: torch.Tensor, images: Sequence[torch.Tensor] | None = None,
                            image_sizes: Sequence[tuple[int, int]] | None = None,
                            attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                            padding_side: str = "right") -> SplicedInputs:
        """Replace each `<image>` (id -200) in `input_ids` by that image's tokens.

        input_ids: (B, S) possibly padded (attention_mask 0 there).  Images are taken in reading order:
        row 0's images first, left to right, then row 1's, ...  Rows are re-padded on `padding_side`.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.long)
        attention_mask = attention_mask.to(input_ids.device).bool()
        n_placeholders = int((input_ids == IMAGE_TOKEN_INDEX).sum())
        output = None
        image_tokens: list[torch.Tensor] = []
        if n_placeholders:
            if images is None:
                raise ValueError(f"the prompt has {n_placeholders} <image> placeholders but no images were given")
            output = self.encode_images(images, image_sizes)
            image_tokens = output.image_tokens
            if len(image_tokens) != n_placeholders:
                raise ValueError(f"the prompts have {n_placeholders} <image> placeholders but {len(image_tokens)} images were given")
        elif images is not None and len(images) and images[0].shape[0] > 0:
            raise ValueError(f"{images[0].shape[0]} images were given but the prompts have no <image> placeholder")

        embed = self.llm.get_input_embeddings()
        rows_embeds, rows_labels, image_starts = [], [], []
        next_image = 0
        for b in range(input_ids.shape[0]):
            ids = input_ids[b][attention_mask[b]]
            lab = labels[b][attention_mask[b]] if labels is not None else None
            cut = [-1] + torch.nonzero(ids == IMAGE_TOKEN_INDEX).flatten().tolist() + [ids.shape[0]]
            text_ids = ids.clone()
            text_ids[text_ids == IMAGE_TOKEN_INDEX] = 0
            text_embeds = embed(text_ids)  # one lookup per row
            pieces, piece_labels, pos = [], [], 0
            for j in range(len(cut) - 1):
                lo, hi = cut[j] + 1, cut[j + 1]
                pieces.append(text_embeds[lo:hi])
                if lab is not None:
                    piece_labels.append(lab[lo:hi])
                pos += hi - lo
                if j < len(cut) - 2:  # an image follows this text piece
                    tok = image_tokens[next_image].to(text_embeds.dtype)
                    image_starts.append((b, pos))
                    pieces.append(tok)
                    if lab is not None:
                        piece_labels.append(torch.full((tok.shape[0],), IGNORE_INDEX, dtype=lab.dtype, device=lab.device))
                    pos += tok.shape[0]
                    next_image += 1
            rows_embeds.append(torch.cat(pieces))
            if lab is not None:
                rows_labels.append(torch.cat(piece_labels))

        max_len = max(r.shape[0] for r in rows_embeds)
        B, hidden = len(rows_embeds), rows_embeds[0].shape[-1]
        dev, dt = rows_embeds[0].device, rows_embeds[0].dtype
        inputs_embeds = torch.zeros(B, max_len, hidden, device=dev, dtype=dt)
        mask = torch.zeros(B, max_len, dtype=torch.long, device=dev)
        out_labels = torch.full((B, max_len), IGNORE_INDEX, dtype=torch.long, device=dev) if labels is not None else None
        offsets = []
        for b, row in enumerate(rows_embeds):
            n = row.shape[0]
            off = max_len - n if padding_side == "left" else 0
            offsets.append(off)
            inputs_embeds[b, off:off + n] = row
            mask[b, off:off + n] = 1
            if out_labels is not None:
                out_labels[b, off:off + n] = rows_labels[b]
        image_starts = [(b, s + offsets[b]) for b, s in image_starts]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        self._check_image_position(image_starts)
        return SplicedInputs(inputs_embeds, mask, position_ids, out_labels, image_starts, output)

    def _check_image_position(self, image_starts: list[tuple[int, int]]) -> None:
        pos = self.config.image_position
        if pos is None or not self.config.sampler_layer_indices or self._warned_image_position:
            return
        if any(s != pos for _, s in image_starts):
            self._warned_image_position = True
            warnings.warn(f"config.image_position is {pos} but the image tokens start at "
                          f"{sorted({s for _, s in image_starts})}; the vision sampler layers use the actual "
                          "positions (the original code always used config.image_position)", stacklevel=3)

    # ------------------------------------------------------------------ in-LLM sampler layers
    def _make_sampler_hook(self, k: int) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            ctx = self._sampler_context
            hidden = output[0] if isinstance(output, tuple) else output
            if ctx is None or hidden.shape[1] != ctx["seq_len"]:
                return output  # decoding step (KV cache) or text-only call: nothing to do
            new = self.connector.apply_sampler_layer(k, hidden, ctx["image_starts"], ctx["output"])
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return hook

    def _run_llm(self, spliced: SplicedInputs, fn: Callable, **kwargs: Any) -> Any:
        """Call `fn` (llm forward or generate) with the sampler-layer context set for the prefill."""
        use_hooks = spliced.connector_output is not None and bool(self.config.sampler_layer_indices)
        self._sampler_context = ({"seq_len": spliced.inputs_embeds.shape[1], "image_starts": spliced.image_starts,
                                  "output": spliced.connector_output} if use_hooks else None)
        try:
            return fn(inputs_embeds=spliced.inputs_embeds, attention_mask=spliced.attention_mask, **kwargs)
        finally:
            self._sampler_context = None

    # ------------------------------------------------------------------ forward / generate
    def forward(self, input_ids: torch.Tensor, images: Sequence[torch.Tensor] | None = None,
                image_sizes: Sequence[tuple[int, int]] | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **llm_kwargs: Any):
        """Logits (and loss with `labels`) like a transformers causal LM.

        input_ids: (B, S) with -200 where images go; images: one (N, 3, R_i, R_i) tensor per tower;
        image_sizes: N original (width, height).  Returns the LLM's `CausalLMOutputWithPast`.
        """
        spliced = self.splice_image_tokens(input_ids, images, image_sizes, attention_mask, labels,
                                           padding_side=self.config.tokenizer_padding_side)
        return self._run_llm(spliced, self.llm, position_ids=spliced.position_ids, labels=spliced.labels,
                             **llm_kwargs)

    @torch.no_grad()
    def generate_ids(self, input_ids: torch.Tensor, images: Sequence[torch.Tensor] | None = None,
                     image_sizes: Sequence[tuple[int, int]] | None = None,
                     attention_mask: torch.Tensor | None = None, **generate_kwargs: Any) -> torch.Tensor:
        """Token ids of the continuation (new tokens only), batched with left padding."""
        spliced = self.splice_image_tokens(input_ids, images, image_sizes, attention_mask, padding_side="left")
        return self._run_llm(spliced, self.llm.generate, **generate_kwargs)

    @torch.no_grad()
    def generate(self, images: Sequence[Any] | None = None, prompts: Sequence[str] = (), *,
                 max_new_tokens: int = 128, temperature: float = 0.0, top_p: float | None = None,
                 stop: Sequence[str] | None = None, template: str | None = None,
                 stream_callback: Callable[[str], None] | None = None, seed: int | None = None) -> list[str]:
        """Answer `prompts` about `images`; returns one string per prompt.

        images: one entry per prompt, each a PIL image, a path, a list of those (several images in one
        prompt), or None (text only).  A prompt without `<image>` gets one `<image>\\n` prefix per image.
        temperature 0 is greedy; otherwise sampling with `temperature` and `top_p`.  Generation stops at
        the template's stop string, any of `stop`, or `max_new_tokens`.  `stream_callback` receives the
        text of prompt 0 as it is produced (batch size 1 streaming, like the CLI).
        """
        from .generation import generate_text

        return generate_text(self, images, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, stop=stop, template=template, stream_callback=stream_callback, seed=seed)
