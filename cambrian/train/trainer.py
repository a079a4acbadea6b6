"""`CambrianTrainer`: transformers.Trainer with the Cambrian recipe, and `train()`, the whole training run.

transformers.Trainer (through accelerate) drives every engine: one process, DDP / FSDP under `torchrun`, DeepSpeed
ZeRO-2/3 (`--deepspeed scripts/zero*.json`) and torch_xla (`PJRT_DEVICE=TPU|CPU`).  On top of it:

* optimizer parameter groups with per-module learning rates and the usual weight-decay split
  (`create_optimizer`, groups from `cambrian.train.builder.param_group_of`);
* `--group_by_modality_length` batching with `cambrian.data.LengthGroupedSampler` (a batch sampler, rank-aware,
  order a function of (seed, epoch) only, so HF's resume-time batch skipping lands on the exact position);
* the collator's `data_meta` is popped in `training_step`: skipped records are counted (`skipped_records` in the
  logs, a report at the end); a batch whose records were all skipped still runs a zero-weight step on a dummy
  example, so ranks never fall out of step (in multi-process runs a text-only batch of a multimodal model also
  gets a dummy image row with no labels, so every rank runs the vision path);
* the NaN/Inf guard (`cambrian.train.callbacks`);
* checkpoints in the released layout (`_save`): config.json + model*.safetensors (stage 2), mm_projector.safetensors
  (stage 1), adapter + non_lora_trainables.bin (LoRA), tokenizer, cambrian_template.txt; `_load_from_checkpoint`
  reads that layout back for `--resume_from_checkpoint` (HF restores optimizer, scheduler, RNG and data position;
  DeepSpeed and FSDP resume from their own engine checkpoints, which HF writes next to ours).
"""
from __future__ import annotations

import copy
import logging
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint, seed_worker

from cambrian.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from cambrian.data import BATCH_META_KEY, LengthGroupedSampler, SkipTracker
from cambrian.model.builder import CheckpointError, read_state_dict, weight_files
from cambrian.model.modeling import CONNECTOR_PREFIX, CambrianForCausalLM

from .arguments import DataArguments, ModelArguments, TrainingArguments, scaled_lr
from .builder import (
    PARAM_GROUPS,
    _clean_name,
    attach_activation_checkpointing,
    param_group_of,
)
from .callbacks import (
    CheckpointSyncCallback,
    LossLogCallback,
    NonFiniteLossGuard,
    sync_folder,
)

__all__ = ["CambrianTrainer", "train", "prepare", "run", "PreparedRun", "TrainResult", "save_trained_checkpoint",
           "load_trained_weights", "apply_lr_scaling", "engine_name", "MM_PROJECTOR_FILE", "NON_LORA_FILE"]

logger = logging.getLogger(__name__)

MM_PROJECTOR_FILE = "mm_projector.safetensors"
NON_LORA_FILE = "non_lora_trainables.bin"


def _is_xla() -> bool:
    from transformers.utils import is_torch_xla_available

    return is_torch_xla_available()


def engine_name(trainer: Trainer) -> str:
    """Which engine runs this trainer: deepspeed-zero{1,2,3}, fsdp, xla, ddp or single."""
    if trainer.is_deepspeed_enabled:
        stage = trainer.accelerator.state.deepspeed_plugin.zero_stage
        return f"deepspeed-zero{stage}"
    if trainer.is_fsdp_xla_enabled:
        return "xla-fsdp"
    if trainer.is_fsdp_enabled:
        return "fsdp"
    if _is_xla():
        return "xla"
    if trainer.args.world_size > 1:
        return "ddp"
    return "single"


# ------------------------------------------------------------------------------------------------ checkpoint layout
def _split_state(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict, dict[int, dict]]:
    """Module names of `CambrianForCausalLM` -> (LLM state, connector state under checkpoint names, tower states)."""
    llm, conn, towers = {}, {}, {}
    for k, v in state_dict.items():
        k = _clean_name(k)
        if k.startswith("llm."):
            llm[k[len("llm."):]] = v
        elif k.startswith("connector."):
            conn[CONNECTOR_PREFIX + k[len("connector."):]] = v
        elif k.startswith("vision_towers."):
            i, _, rest = k[len("vision_towers."):].partition(".")
            if rest.startswith("model."):
                towers.setdefault(int(i), {})[rest[len("model."):]] = v
    return llm, conn, towers


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_trained_checkpoint(model: CambrianForCausalLM, output_dir: str, state_dict: dict[str, torch.Tensor] | None,
                            *, stage: int, lora: bool, tokenizer: Any = None, template: str | None = None,
                            max_shard_size: str | int = "5GB") -> list[str]:
    """Write a training checkpoint in the released layout; returns the files written.

    state_dict: the model's state dict (module names, possibly gathered by an engine); None = `model.state_dict()`.
    stage 1: config.json + mm_projector.safetensors (connector only; load with model_base=<LLM>).
    stage 2: config.json + model.safetensors (or shards + index), LLM keys plus the connector under `model.`.
    lora: config.json + adapter_config.json / adapter_model.safetensors + non_lora_trainables.bin (the connector),
        loadable with model_base=<LLM> (merged at load time).
    Trainable towers are written as transformers folders under vision_towers/ (found there at load time).
    """
    from safetensors.torch import save_file

    from cambrian.model.builder import SAFE_INDEX, write_tokenizer_and_template, write_weights
    from cambrian.model.vision_towers import tower_dir_name

    os.makedirs(output_dir, exist_ok=True)
    state_dict = model.state_dict() if state_dict is None else state_dict
    llm_state, conn_state, tower_states = _split_state(state_dict)
    config = copy.deepcopy(model.config)
    config.llm_config.use_cache = True  # training turned the KV cache off; inference wants it
    config.save_pretrained(output_dir)
    written = ["config.json"]

    for old in os.listdir(output_dir):  # weights of an earlier save in this folder would be read back by mistake
        if (old.startswith("model") and (old.endswith(".safetensors") or old == SAFE_INDEX)) or old in (
                MM_PROJECTOR_FILE, NON_LORA_FILE, "adapter_model.safetensors"):
            os.remove(os.path.join(output_dir, old))

    if lora:
        with _quiet():
            model.llm.save_pretrained(output_dir, state_dict=_cpu(llm_state), safe_serialization=True)
        torch.save(_cpu(conn_state), os.path.join(output_dir, NON_LORA_FILE))
        written += ["adapter_config.json", "adapter_model.safetensors", NON_LORA_FILE]
    elif stage == 1:
        save_file(_cpu(conn_state), os.path.join(output_dir, MM_PROJECTOR_FILE), metadata={"format": "pt"})
        written.append(MM_PROJECTOR_FILE)
    else:
        state = {**llm_state, **conn_state}
        if getattr(model.config.llm_config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        written += write_weights(state, output_dir, max_shard_size)

    for i, tower in enumerate(model.vision_towers):
        if not getattr(tower, "trainable", False) or i not in tower_states:
            continue
        name = model.config.mm_vision_tower_aux_list[i]
        tower.save_pretrained(os.path.join(output_dir, "vision_towers", tower_dir_name(name)), _cpu(tower_states[i]))
        written.append(os.path.join("vision_towers", tower_dir_name(name)))

    write_tokenizer_and_template(output_dir, tokenizer if tokenizer is not None else model.tokenizer,
                                 template or model.template_name)
    return written


def _quiet():
    from cambrian.utils import quiet_transformers

    return quiet_transformers()


def load_trained_weights(model: CambrianForCausalLM, folder: str) -> str:
    """Load the weights of a checkpoint written by `save_trained_checkpoint` into `model` (same architecture,
    e.g. rebuilt from the same arguments) — what `--resume_from_checkpoint` needs.  Returns the layout found:
    "connector" (stage 1), "lora" or "full"."""
    if model.connector is None:
        raise ValueError("the model has no connector")
    expected_conn = set(model.connector.state_dict())

    def load_connector(state: dict[str, torch.Tensor], source: str) -> None:
        state = {k[len(CONNECTOR_PREFIX):] if k.startswith(CONNECTOR_PREFIX) else k: v for k, v in state.items()}
        missing, unexpected = expected_conn - set(state), set(state) - expected_conn
        if missing or unexpected:
            raise CheckpointError(f"{source}: connector tensors missing {sorted(missing)[:10]}, "
                                  f"unexpected {sorted(unexpected)[:10]}")
        model.connector.load_state_dict(state)

    layout = "full"
    mm = os.path.join(folder, MM_PROJECTOR_FILE)
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):
        from peft import set_peft_model_state_dict

        adapter = read_state_dict(os.path.join(folder, "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model.llm, adapter)
        if getattr(result, "unexpected_keys", None):
            raise CheckpointError(f"{folder}: unexpected adapter tensors {result.unexpected_keys[:10]}")
        load_connector(read_state_dict(os.path.join(folder, NON_LORA_FILE)), os.path.join(folder, NON_LORA_FILE))
        layout = "lora"
    elif os.path.isfile(mm):
        load_connector(read_state_dict(mm), mm)
        layout = "connector"
    else:
        files = weight_files(folder)
        state = read_state_dict(files)
        conn_keys, llm_keys = model.split_checkpoint_keys(list(state))
        load_connector({k: state[k] for k in conn_keys}, folder)
        result = model.llm.load_state_dict({k: state[k] for k in llm_keys}, strict=False)
        missing = [k for k in result.missing_keys
                   if not (k == "lm_head.weight" and getattr(model.config.llm_config, "tie_word_embeddings", False))]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"{folder}: LLM tensors missing {missing[:10]}, unexpected "
                                  f"{result.unexpected_keys[:10]}")
    from cambrian.model.vision_towers import tower_dir_name

    for name, tower in zip(model.config.mm_vision_tower_aux_list, model.vision_towers):
        tdir = os.path.join(folder, "vision_towers", tower_dir_name(name))
        if getattr(tower, "trainable", False) and os.path.isdir(tdir):
            tower.model.load_state_dict(read_state_dict(weight_files(tdir)))
    return layout


# ------------------------------------------------------------------------------------------------ the trainer
class CambrianTrainer(Trainer):
    """transformers.Trainer for `CambrianForCausalLM` (see the module docstring).

    Extra constructor arguments: `stage` (1 or 2), `tokenizer` and `template` (saved with every checkpoint; not
    passed to HF as `processing_class`, whose special-token alignment expects a transformers config).
    """

    def __init__(self, model: nn.Module, args: TrainingArguments, *, stage: int = 2, tokenizer: Any = None,
                 template: str | None = None, callbacks: list | None = None, **kwargs: Any) -> None:
        self.stage = int(stage)
        self.cambrian_tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.cambrian_template = template or getattr(model, "template_name", None)
        self.skip_tracker = SkipTracker()
        self.nan_guard = NonFiniteLossGuard(getattr(args, "nan_policy", "stop"), any_rank=self._any_rank,
                                            gather=self._gather_float)
        self._train_batch_sampler: LengthGroupedSampler | None = None
        self._micro_step, self._micro_step_of = 0, -1
        self._step_loss: torch.Tensor | None = None
        callbacks = list(callbacks or []) + [self.nan_guard]
        sync_dir = getattr(args, "checkpoint_sync_dir", None)
        self.sync_callback = CheckpointSyncCallback(sync_dir) if sync_dir else None
        if self.sync_callback is not None:
            callbacks.append(self.sync_callback)
        loss_file = getattr(args, "loss_log_file", None)
        self.loss_log = LossLogCallback(loss_file, self._pop_step_loss) if loss_file else None
        if self.loss_log is not None:
            callbacks.append(self.loss_log)
        if isinstance(model, CambrianForCausalLM):
            attach_activation_checkpointing(model)
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)
        # The wrapper's loss is a causal-LM loss (labels shifted inside the LLM): count targets like HF does for one.
        self._loss_shifts_labels = True
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            # ZeRO-3 gathers a module's parameters only around that module's own forward; the connector's fused
            # path reads its K/V sub-layers' weights from the parent module (folded LayerNorm + Linear), which
            # would see empty partitions.  The unfused path is the same math through each sub-layer's forward.
            connector = getattr(model, "connector", None)
            if connector is not None and hasattr(connector, "set_fused"):
                connector.set_fused(False)
            if connector is not None:
                # The connector returns a dataclass, which ZeRO-3 cannot hook for the backward pass, so its own
                # tensors (vision_query, image_newline) would not be re-gathered for backward: make them
                # external parameters of the root module, whose output (a ModelOutput) it does hook.
                from deepspeed.runtime.zero.partition_parameters import (
                    register_external_parameter,
                )

                for p in connector.parameters(recurse=False):
                    register_external_parameter(model, p)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        from accelerate.utils import DistributedType

        if (self.args.fsdp and not self.is_fsdp_enabled and not _is_xla()
                and self.accelerator.distributed_type == DistributedType.MULTI_CPU):
            # accelerate only turns `--fsdp` on for accelerator devices; torch FSDP itself also runs on CPU with the
            # gloo backend (multi-process CPU runs and tests).  Enable the same FSDP plugin for MULTI_CPU.
            from accelerate.utils import FullyShardedDataParallelPlugin

            plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            state = self.accelerator.state
            if state.mixed_precision != "no":
                plugin.set_mixed_precision(state.mixed_precision)
            state.fsdp_plugin = plugin
            state.distributed_type = DistributedType.FSDP
            # AcceleratorState copies the process state (PartialState) when it is created again: set it there too
            from accelerate.state import PartialState

            PartialState().distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True

    # ------------------------------------------------------------------ distributed helpers
    def _any_rank(self, flag: bool) -> bool:
        if self.args.world_size <= 1:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.args.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def _gather_float(self, value: float) -> list[float]:
        if self.args.world_size <= 1:
            return [value]
        t = torch.tensor([value], device=self.args.device, dtype=torch.float32)
        return [float(x) for x in self.accelerator.gather(t).cpu().tolist()]

    def _sum_over_ranks(self, value: float) -> float:
        if self.args.world_size <= 1:
            return float(value)
        t = torch.tensor([float(value)], device=self.args.device, dtype=torch.float32)
        return float(self.accelerator.reduce(t, reduction="sum").item())

    @property
    def unwrapped_model(self) -> CambrianForCausalLM:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    # ------------------------------------------------------------------ optimizer
    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer groups: (base | projector | sampler | tower) x (decay | no decay), trainable parameters
        only, empty groups dropped.  Each group carries its `lr` and a `name` such as "projector/no_decay"."""
        args = self.args
        lrs = {"base": args.learning_rate, "projector": args.mm_projector_lr, "sampler": args.mm_vision_sampler_lr,
               "tower": args.mm_vision_tower_lr}
        decay = set(self.get_decay_parameter_names(model))
        buckets: dict[tuple[str, bool], list] = {}
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            group = param_group_of(n)
            if lrs[group] is None:  # no separate lr for this part: it trains at the base lr
                group = "base"
            buckets.setdefault((group, n in decay), []).append(p)
        groups = []
        for group in PARAM_GROUPS:
            for with_decay in (True, False):
                params = buckets.get((group, with_decay))
                if params:
                    groups.append({"params": params, "lr": lrs[group],
                                   "weight_decay": args.weight_decay if with_decay else 0.0,
                                   "name": f"{group}/{'decay' if with_decay else 'no_decay'}"})
        if not groups:
            raise ValueError("no trainable parameters: check --tune_mm_mlp_adapter / --freeze_mm_mlp_adapter")
        return groups

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            groups = self.parameter_groups(opt_model)
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k not in ("params", "model")}
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            for g in groups:
                logger.info("optimizer group %-20s %6d tensors %12d params lr %.3g wd %.3g", g["name"],
                            len(g["params"]), sum(p.numel() for p in g["params"]), g["lr"], g["weight_decay"])
        return self.optimizer

    # ------------------------------------------------------------------ data
    def get_train_dataloader(self) -> DataLoader:
        if not getattr(self.args, "group_by_modality_length", False):
            self._train_batch_sampler = None
            return super().get_train_dataloader()
        dataset = self.train_dataset
        args = self.args
        sampler = LengthGroupedSampler(dataset.modality_lengths, batch_size=self._train_batch_size,
                                       world_size=args.world_size, rank=args.process_index,
                                       seed=args.data_seed if args.data_seed is not None else args.seed,
                                       group_by_modality=True, drop_last=args.dataloader_drop_last)
        self._train_batch_sampler = sampler
        params: dict[str, Any] = {
            "batch_sampler": sampler, "collate_fn": self.data_collator, "num_workers": args.dataloader_num_workers,
            "pin_memory": args.dataloader_pin_memory, "persistent_workers": args.dataloader_persistent_workers,
            "worker_init_fn": partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index),
        }
        if args.dataloader_num_workers > 0:
            params["prefetch_factor"] = args.dataloader_prefetch_factor
            if args.dataloader_multiprocessing_context:
                params["multiprocessing_context"] = args.dataloader_multiprocessing_context
        loader = self.accelerator.prepare(DataLoader(dataset, **params))
        # The sampler already gives this rank its own batches (padded so every rank takes the same number of
        # steps); accelerate's BatchSamplerShard would shard them again: make it a pass-through (as HF does for its
        # own rank-aware BatchRebalanceSampler).
        wrapper = getattr(loader, "batch_sampler", None)
        if wrapper is not None and getattr(wrapper, "batch_sampler", None) is sampler:
            wrapper.num_processes = 1
            wrapper.process_index = 0
        return loader

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        # The batch order of an epoch is a function of (seed, epoch): select it before the epoch's iterator is
        # built (accelerate's set_epoch does not reach a batch sampler behind its skip / shard wrappers).
        epoch = kwargs["epoch"] if "epoch" in kwargs else args[1]
        if self._train_batch_sampler is not None:
            self._train_batch_sampler.set_epoch(int(epoch))
        return super()._run_epoch(*args, **kwargs)

    # ------------------------------------------------------------------ dummy examples (keep ranks in step)
    def _pad_id(self) -> int:
        tok = self.cambrian_tokenizer
        pad = getattr(tok, "pad_token_id", None)
        return int(pad if pad is not None else (getattr(tok, "eos_token_id", None) or 0))

    def _dummy_row(self, length: int, with_label: bool) -> dict[str, Any]:
        """One padded row `[pad, <image>, pad]` (no image placeholder for a text-only model), with a blank image per
        tower; its only label (if any) is the last pad token."""
        pad = self._pad_id()
        towers = list(self.unwrapped_model.vision_towers)
        ids = [pad] + ([IMAGE_TOKEN_INDEX] if towers else []) + [pad]
        labels = [IGNORE_INDEX] * (len(ids) - 1) + ([pad] if with_label else [IGNORE_INDEX])
        length = max(length, len(ids))
        row_ids = torch.full((length,), pad, dtype=torch.long)
        row_labels = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(length, dtype=torch.long)
        row_ids[:len(ids)] = torch.tensor(ids)
        row_labels[:len(ids)] = torch.tensor(labels)
        mask[:len(ids)] = 1
        images = [torch.zeros(1, 3, t.image_size, t.image_size) for t in towers] if towers else None
        sizes = [(towers[0].image_size, towers[0].image_size)] if towers else []
        return {"input_ids": row_ids, "labels": row_labels, "attention_mask": mask, "images": images,
                "image_sizes": sizes}

    def _dummy_batch(self) -> dict[str, Any]:
        row = self._dummy_row(0, with_label=True)
        return {"input_ids": row["input_ids"][None], "labels": row["labels"][None],
                "attention_mask": row["attention_mask"][None], "images": row["images"],
                "image_sizes": row["image_sizes"]}

    def _with_dummy_image_row(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """A text-only batch of a multimodal model, in a multi-process run: add a row holding one blank image and
        no training target, so this rank runs the towers and connector like the others (ZeRO-3 gathers and
        gradient reductions are collective).  The loss is unchanged: the row has no label tokens."""
        S = inputs["input_ids"].shape[1]
        row = self._dummy_row(S, with_label=False)
        L = row["input_ids"].shape[0]

        def pad_to(t: torch.Tensor, value: int) -> torch.Tensor:
            return t if t.shape[1] == L else torch.cat([t, t.new_full((t.shape[0], L - t.shape[1]), value)], dim=1)

        pad = self._pad_id()
        out = dict(inputs)
        out["input_ids"] = torch.cat([pad_to(inputs["input_ids"], pad), row["input_ids"][None]])
        out["labels"] = torch.cat([pad_to(inputs["labels"], IGNORE_INDEX), row["labels"][None]])
        out["attention_mask"] = torch.cat([pad_to(inputs["attention_mask"], 0), row["attention_mask"][None]])
        out["images"], out["image_sizes"] = row["images"], row["image_sizes"]
        return out

    # ------------------------------------------------------------------ the step
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        meta = inputs.pop(BATCH_META_KEY, None)
        ids: list = []
        empty = False
        if meta is not None:
            self.skip_tracker.update_from_batch(meta)
            ids = list(meta.get("ids", []))
            empty = int(meta.get("num_samples", 1)) == 0
            if meta.get("num_skipped"):
                logger.info("step %d: %d record(s) skipped in this batch: %s", self.state.global_step + 1,
                            meta["num_skipped"], "; ".join(str(r) for r in meta.get("skipped", [])[:3]))
        unwrapped = self.unwrapped_model
        has_towers = isinstance(unwrapped, CambrianForCausalLM) and len(unwrapped.vision_towers) > 0
        if empty:
            # Every record of this batch was bad: run a zero-weight step on a dummy example so the collectives
            # (gradient reduction, ZeRO-3 / FSDP gathers) and DeepSpeed's micro-step count stay in step.
            inputs = self._dummy_batch()
            num_items_in_batch = None
        elif has_towers and self.args.world_size > 1 and inputs.get("images") is None:
            inputs = self._with_dummy_image_row(inputs)

        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        del inputs
        if self.args.n_gpu > 1:
            loss = loss.mean()
        if empty:
            loss = loss * 0.0

        if self._micro_step_of != self.state.global_step:
            self._micro_step, self._micro_step_of = 0, self.state.global_step
        micro = self._micro_step
        self._micro_step += 1
        # Raises NonFiniteLossError (policy stop) before any backward, on every rank alike.
        bad = self.nan_guard.check(loss, ids, self.state.global_step, micro, rank=self.args.process_index)

        if self.loss_is_scaled_for_ga is not None:
            scaled = self.loss_is_scaled_for_ga
        else:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        if not scaled:
            loss = loss / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        kwargs: dict[str, Any] = {}
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            kwargs["scale_wrt_gas"] = False
        if self.is_deepspeed_enabled and (bad or self.nan_guard.pending_skip):
            self._deepspeed_skip_backward(model, bad, loss, kwargs)
        else:
            self.accelerator.backward(loss, **kwargs)  # with `bad`, the guard clears the gradients before the step
        out = torch.zeros((), device=self.args.device) if bad else loss.detach()
        if self.loss_log is not None:
            self._step_loss = out.float() if self._step_loss is None else self._step_loss + out.float()
        return out

    def _deepspeed_skip_backward(self, model: nn.Module, bad: bool, loss: torch.Tensor, kwargs: dict) -> None:
        """`--nan_policy skip` under DeepSpeed, whose engine steps inside `backward` on the last micro-step.

        The bad micro-batch back-propagates an exact zero instead of its loss (nothing non-finite reaches the
        engine's gradient buffers; its micro-step count stays right): under ZeRO-1/2 a zero that reaches every
        trainable parameter (a bucket without any gradient breaks its reduction), under ZeRO-3 a zero that reaches
        none (its parameters are partitioned outside forward).  The optimizer step of that window then runs with
        every learning rate at 0: the weights do not move (Adam's moments do decay once)."""
        if bad:
            zero = torch.zeros((), device=self.args.device, requires_grad=True) * 1.0  # DeepSpeed wants a grad_fn
            if self.accelerator.state.deepspeed_plugin.zero_stage != 3:
                for p in model.parameters():
                    if p.requires_grad:
                        zero = zero + p.sum() * 0.0
            loss = zero
        if not self.accelerator.sync_gradients:
            self.accelerator.backward(loss, **kwargs)
            return
        groups = self.optimizer.param_groups
        saved = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = 0.0
        try:
            self.accelerator.backward(loss, **kwargs)
        finally:
            for g, lr in zip(groups, saved):
                g["lr"] = lr
        self.nan_guard.pending_skip = False

    def _pop_step_loss(self) -> float | None:
        """The finished optimizer step's loss (sum of its micro-steps' scaled losses, mean over ranks); called by
        LossLogCallback on every rank at `on_step_end`."""
        value, self._step_loss = self._step_loss, None
        if value is None:
            value = torch.zeros((), device=self.args.device)
        if self.args.world_size > 1:
            value = self.accelerator.reduce(value.reshape(1), reduction="mean")
        return float(value.reshape(-1)[0].item())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs or "train_loss" in logs:
            logs["skipped_records"] = self._sum_over_ranks(self.skip_tracker.total)
            if self.nan_guard.skipped_steps:
                logs["nan_skipped"] = len(self.nan_guard.skipped_steps)
        super().log(logs, start_time)

    # ------------------------------------------------------------------ saving / loading
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if _is_xla() and not self.is_fsdp_xla_v1_enabled:
            # HF's TPU path writes a raw state dict; gather to CPU and write the released layout instead.
            import torch_xla.core.xla_model as xm

            output_dir = output_dir or self.args.output_dir
            xm.mark_step()
            xm.rendezvous("cambrian_saving_checkpoint")
            state = xm._maybe_convert_to_cpu(self.model.state_dict())
            if self.args.should_save:
                self._save(output_dir, state_dict=state)
            return
        super().save_model(output_dir, _internal_call=_internal_call)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.unwrapped_model
        if state_dict is not None and len(state_dict) == 0:
            # DeepSpeed ZeRO-3 without stage3_gather_16bit_weights_on_model_save: the engine checkpoint (written
            # next to this) holds the weights; recover them with DeepSpeed's zero_to_fp32.py.
            logger.warning("no gathered weights to save in %s (set stage3_gather_16bit_weights_on_model_save: true "
                           "in the DeepSpeed config for the released layout)", output_dir)
            model.config.save_pretrained(output_dir)
            return
        lora = bool(getattr(self.args, "lora_enable", False))
        save_trained_checkpoint(model, output_dir, state_dict, stage=self.stage, lora=lora,
                                tokenizer=self.cambrian_tokenizer, template=self.cambrian_template)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # their own engine checkpoints
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        layout = load_trained_weights(target, resume_from_checkpoint)
        logger.info("resumed %s weights from %s", layout, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    # ------------------------------------------------------------------ reporting
    def skip_report(self) -> str:
        return self.skip_tracker.report("training data")


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class TrainResult:
    output_dir: str
    global_step: int
    train_loss: float
    skipped_records: int
    engine: str
    seconds: float


def reports(args: TrainingArguments) -> bool:
    """Whether this process prints the run's messages: HF's `should_log`, or process 0 (under torch_xla 2.9 HF's
    local process index is -1 in a single-process run, which turns `should_log` off)."""
    return bool(args.should_log or args.process_index == 0)


def _setup_logging(training_args: TrainingArguments) -> None:
    import transformers

    level = training_args.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], level=logging.WARNING)
    logging.getLogger("cambrian").setLevel(logging.INFO if reports(training_args) else logging.WARNING)
    transformers.utils.logging.set_verbosity(level)


def _resolve_resume(value: Any, output_dir: str) -> str | None:
    if value in (None, "", False, "False", "false", "no"):
        return None
    if value in (True, "True", "true", "last", "auto"):
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            if value == "auto":
                return None
            raise ValueError(f"--resume_from_checkpoint {value}: no checkpoint-* folder in {output_dir}")
        return last
    if not os.path.isdir(str(value)):
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: not a folder")
    return str(value)


def apply_lr_scaling(training_args: TrainingArguments) -> float | None:
    """With --base_batch_size, rescale every learning rate given by sqrt(global batch / base batch)."""
    base = training_args.base_batch_size
    if not base:
        return None
    bs = training_args.global_batch_size
    factor = scaled_lr(1.0, bs, base)
    training_args.learning_rate *= factor
    for name in ("mm_projector_lr", "mm_vision_sampler_lr", "mm_vision_tower_lr"):
        if getattr(training_args, name) is not None:
            setattr(training_args, name, getattr(training_args, name) * factor)
    logger.info("learning rates scaled by sqrt(%d / %d) = %.4f", bs, base, factor)
    return factor


@dataclass
class PreparedRun:
    """Everything `prepare` builds; `run` trains it."""

    trainer: CambrianTrainer
    resume_from_checkpoint: str | None
    stage: int
    num_records: int


def prepare(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> PreparedRun:
    """Check the arguments and build model, data set and trainer (errors here are configuration errors)."""
    from transformers import set_seed

    from cambrian.data import DataCollatorForSupervisedDataset, LazySupervisedDataset

    from .builder import build_model

    _setup_logging(training_args)
    if training_args.batch_size is not None and training_args.batch_size != training_args.global_batch_size:
        raise ValueError(f"--batch_size {training_args.batch_size} but per_device_train_batch_size x "
                         f"gradient_accumulation_steps x world size = {training_args.global_batch_size}")
    if not data_args.data_path:
        raise ValueError("--data_path is required")
    if not os.path.exists(data_args.data_path):
        raise FileNotFoundError(f"--data_path {data_args.data_path} does not exist")
    apply_lr_scaling(training_args)
    resume = _resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)

    set_seed(training_args.seed)
    built = build_model(model_args, data_args, training_args)
    model = built.model
    side = model.config.final_grid_side
    dataset = LazySupervisedDataset(
        data_args.data_path, built.tokenizer, list(model.vision_towers) or None, template=built.template,
        image_folder=data_args.image_folder, model_max_length=training_args.model_max_length,
        image_aspect_ratio=data_args.image_aspect_ratio, image_token_len=side * (side + 1))
    collator = DataCollatorForSupervisedDataset(built.tokenizer)
    trainer = CambrianTrainer(model, training_args, stage=built.stage, tokenizer=built.tokenizer,
                              template=built.template, train_dataset=dataset, data_collator=collator)
    return PreparedRun(trainer, resume, built.stage, len(dataset))


def run(prepared: PreparedRun) -> TrainResult:
    """Train, then save the final model (released layout) to output_dir and sync it if asked."""
    from .builder import trainable_summary

    t0 = time.time()
    trainer, args = prepared.trainer, prepared.trainer.args
    if reports(args):
        logger.info("stage %d on %s: %d records, template %s, trainable %s", prepared.stage, engine_name(trainer),
                    prepared.num_records, trainer.cambrian_template, trainable_summary(trainer.model))
    result = trainer.train(resume_from_checkpoint=prepared.resume_from_checkpoint)
    trainer.save_state()
    trainer.save_model(args.output_dir)
    if trainer.sync_callback is not None and args.should_save:
        sync_folder(args.output_dir, args.checkpoint_sync_dir, name="final")
    skipped = int(trainer._sum_over_ranks(trainer.skip_tracker.total))
    if reports(args) and trainer.skip_tracker.total:
        logger.warning("%s", trainer.skip_report())
    return TrainResult(args.output_dir, trainer.state.global_step, float(result.training_loss), skipped,
                       engine_name(trainer), time.time() - t0)


def train(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> TrainResult:
    """One training run (stage 1 or 2): `prepare` then `run`."""
    return run(prepare(model_args, data_args, training_args))
