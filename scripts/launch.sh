#!/usr/bin/env bash
# Shared launcher of the training scripts: `launch ARGS...` runs `python -m cambrian.train ARGS...` on the engine
# named by $ENGINE.  Sourced by the *_cambrian_*.sh scripts; every variable below can be set from outside.
#
#   ENGINE=deepspeed  torchrun, one process per GPU, DeepSpeed ZeRO (DS_CONFIG, default scripts/zero2.json;
#                     zero3.json for 34B, zero3_offload.json to move optimizer + parameters to CPU RAM)
#   ENGINE=fsdp       torchrun, one process per GPU, torch FSDP (scripts/fsdp_config.json: LLaMA decoder layers)
#   ENGINE=xla        PJRT_DEVICE=TPU (default) single process per host, SPMD FSDPv2 (scripts/fsdp_xla.json);
#                     FSDP_CONFIG=none: one XLA device without sharding (PJRT_DEVICE=CPU tests)
#   ENGINE=single     one process (CPU or one GPU), no sharding
#
#   PYTHON (default: the repository's .venv/bin/python, else python)
#   NUM_GPUS (default: all visible), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500)
#   The global batch is per_device_train_batch_size x gradient_accumulation_steps x NUM_GPUS x NNODES: the
#   scripts pass --batch_size so a mismatch stops the run before it starts, and GRAD_ACC (default: computed from
#   the other numbers) keeps the recipe's global batch on fewer GPUs.
set -euo pipefail
SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ENGINE=${ENGINE:-deepspeed}
REPO_DIR="$(dirname "$SCRIPTS_DIR")"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO_DIR/.venv/bin/python" ]; then PYTHON="$REPO_DIR/.venv/bin/python"; else PYTHON=python; fi
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${NUM_GPUS:-}" ]; then
    NUM_GPUS=$($PYTHON -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi

# grad_acc GLOBAL_BATCH PER_DEVICE: the accumulation steps that keep the recipe's global batch size.
grad_acc() {
    local world=$(( NUM_GPUS * NNODES ))
    if [ "$ENGINE" = xla ] || [ "$ENGINE" = single ]; then world=${NUM_DEVICES:-1}; fi
    local per_step=$(( $2 * world ))
    if [ $(( $1 % per_step )) -ne 0 ]; then
        echo "global batch $1 is not a multiple of per-device batch $2 x $world devices" >&2; exit 2
    fi
    echo $(( $1 / per_step ))
}

launch() {
    local torchrun=($PYTHON -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NUM_GPUS"
                    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
    case "$ENGINE" in
        deepspeed)
            "${torchrun[@]}" -m cambrian.train --deepspeed "${DS_CONFIG:-$SCRIPTS_DIR/zero2.json}" "$@" ;;
        fsdp)
            "${torchrun[@]}" -m cambrian.train --fsdp "full_shard auto_wrap" \
                --fsdp_config "${FSDP_CONFIG:-$SCRIPTS_DIR/fsdp_config.json}" "$@" ;;
        xla)
            if [ "${FSDP_CONFIG:-}" = none ]; then  # one XLA device, no sharding (e.g. PJRT_DEVICE=CPU)
                PJRT_DEVICE=${PJRT_DEVICE:-TPU} $PYTHON -m cambrian.train "$@"
            else
                PJRT_DEVICE=${PJRT_DEVICE:-TPU} XLA_USE_SPMD=1 $PYTHON -m cambrian.train --fsdp full_shard \
                    --fsdp_config "${FSDP_CONFIG:-$SCRIPTS_DIR/fsdp_xla.json}" "$@"
            fi ;;
        single)
            $PYTHON -m cambrian.train "$@" ;;
        *)
            echo "unknown ENGINE=$ENGINE (deepspeed, fsdp, xla, single)" >&2; exit 2 ;;
    esac
}

# run_cambrian_stage pretrain|finetune ARGS...: one stage of the released recipe.  The model scripts set
# MODEL_TAG, TEMPLATE, IMAGE_POSITION, SAMPLER_LAYERS, SAMPLER_STRIDE, RECIPE_BATCH, FINETUNE_LR and DS_DEFAULT;
# the user sets LLM_PATH, DATA_PATH, IMAGE_FOLDER, TOWER_PATHS (+ PRETRAIN_ADAPTER for finetune).
# Stage 1 (pretrain): connector alignment, towers + LLM frozen, lr 1e-3, SVA lr 1e-4, warmup 6%.
# Stage 2 (finetune): connector + LLM from the stage-1 connector, towers frozen, modality-grouped, warmup 3%.
run_cambrian_stage() {
    local stage=$1; shift
    : "${LLM_PATH:?set LLM_PATH}" "${DATA_PATH:?set DATA_PATH}" "${IMAGE_FOLDER:?set IMAGE_FOLDER}" "${TOWER_PATHS:?set TOWER_PATHS}"
    DS_CONFIG=${DS_CONFIG:-$SCRIPTS_DIR/$DS_DEFAULT}
    local name=${CKPT_NAME:-cambrian-$MODEL_TAG-$stage}
    local out=${OUTPUT_DIR:-checkpoints/$name}
    local global=${GLOBAL_BATCH:-$RECIPE_BATCH}
    local per_device=${PER_DEVICE_BATCH:-8}
    local acc=${GRAD_ACC:-$(grad_acc "$global" "$per_device")}
    local stage_args
    if [ "$stage" = pretrain ]; then
        stage_args=(--tune_mm_mlp_adapter True --mm_vision_sampler_lr 1e-4 --learning_rate 1e-3
                    --warmup_ratio 0.06 --save_steps 1000)
    else
        stage_args=(--pretrain_mm_mlp_adapter "${PRETRAIN_ADAPTER:-checkpoints/cambrian-$MODEL_TAG-pretrain}"
                    --unfreeze_mm_vision_tower False --group_by_modality_length True
                    --learning_rate "$FINETUNE_LR" --warmup_ratio 0.03 --save_steps 2000)
    fi
    local sync_args=()
    if [ -n "${CHECKPOINT_SYNC_DIR:-}" ]; then sync_args=(--checkpoint_sync_dir "$CHECKPOINT_SYNC_DIR"); fi
    launch \
        --model_name_or_path "$LLM_PATH" --version "$TEMPLATE" \
        --data_path "$DATA_PATH" --image_folder "$IMAGE_FOLDER" \
        --vision_tower_aux_list '["siglip/CLIP-ViT-SO400M-14-384", "openai/clip-vit-large-patch14-336", "facebook/dinov2-giant-res378", "clip-convnext-XXL-multi-stage"]' \
        --vision_tower_aux_token_len_list '[576, 576, 576, 9216]' \
        --tower_paths "$TOWER_PATHS" \
        --image_token_len 576 --num_query_group 1 --query_num_list '[576]' --connector_depth 3 \
        --image_position "$IMAGE_POSITION" --vision_hidden_size 1024 --connector_only False \
        --num_of_vision_sampler_layers "$SAMPLER_LAYERS" --start_of_vision_sampler_layers 0 \
        --stride_of_vision_sampler_layers "$SAMPLER_STRIDE" \
        --mm_projector_type sva --mm_vision_select_layer -2 --mm_use_im_start_end False \
        --mm_use_im_patch_token False --image_aspect_ratio pad \
        "${stage_args[@]}" \
        --bf16 "${BF16:-True}" --output_dir "$out" --num_train_epochs 1 \
        --per_device_train_batch_size "$per_device" --gradient_accumulation_steps "$acc" --batch_size "$global" \
        --eval_strategy "no" --save_strategy "steps" --save_total_limit 1 --weight_decay 0. \
        --lr_scheduler_type "cosine" --logging_steps 1 --model_max_length 2048 --gradient_checkpointing True \
        --dataloader_num_workers 4 --lazy_preprocess True --report_to "${REPORT_TO:-none}" --run_name "$name" \
        --resume_from_checkpoint auto \
        "${sync_args[@]}" \
        "$@"
}
