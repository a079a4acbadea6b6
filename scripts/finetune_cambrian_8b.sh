#!/usr/bin/env bash
# Cambrian-1 8B -- Stage 2 (instruction tuning): train connector + LLM, towers frozen, from the stage-1 connector.
# Hyper-parameters of the release (README 'Hyperparameters'): global batch 512, lr 4e-5, warmup 3%, cosine, 1 epoch, max length 2048.
#
# Required: LLM_PATH (local folder of the base LLM: Meta-Llama-3-8B-Instruct), DATA_PATH (Cambrian7M_withsystemprompt.jsonl (Cambrian-10M)),
#           IMAGE_FOLDER, TOWER_PATHS (JSON {tower name: local folder or timm/open_clip file}), PRETRAIN_ADAPTER (stage-1 output folder or its mm_projector.safetensors).
# Optional: ENGINE (deepspeed | fsdp | xla | single, see launch.sh), NUM_GPUS, NNODES, PER_DEVICE_BATCH,
#           OUTPUT_DIR, CHECKPOINT_SYNC_DIR, and any extra flags after the script name (they override).
# With fewer devices the accumulation steps grow to keep the global batch; to train at another global batch,
# set GLOBAL_BATCH and (stage 2) rescale the lr: --base_batch_size 512 applies lr*sqrt(bs/512).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
: "${LLM_PATH:?set LLM_PATH}" "${DATA_PATH:?set DATA_PATH}" "${IMAGE_FOLDER:?set IMAGE_FOLDER}" "${TOWER_PATHS:?set TOWER_PATHS}"
: "${PRETRAIN_ADAPTER:=checkpoints/cambrian-8b-pretrain}"
DS_CONFIG=${DS_CONFIG:-$SCRIPTS_DIR/zero2.json}
CKPT_NAME=${CKPT_NAME:-cambrian-8b-finetune}
OUTPUT_DIR=${OUTPUT_DIR:-checkpoints/$CKPT_NAME}
GLOBAL_BATCH=${GLOBAL_BATCH:-512}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-8}
GRAD_ACC=${GRAD_ACC:-$(grad_acc "$GLOBAL_BATCH" "$PER_DEVICE_BATCH")}
SYNC_ARGS=()
if [ -n "${CHECKPOINT_SYNC_DIR:-}" ]; then SYNC_ARGS=(--checkpoint_sync_dir "$CHECKPOINT_SYNC_DIR"); fi

launch \
    --model_name_or_path "$LLM_PATH" \
    --version llama_v3 \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    --pretrain_mm_mlp_adapter "$PRETRAIN_ADAPTER" \
    --vision_tower_aux_list '["siglip/CLIP-ViT-SO400M-14-384", "openai/clip-vit-large-patch14-336", "facebook/dinov2-giant-res378", "clip-convnext-XXL-multi-stage"]' \
    --vision_tower_aux_token_len_list '[576, 576, 576, 9216]' \
    --tower_paths "$TOWER_PATHS" \
    --image_token_len 576 \
    --num_query_group 1 \
    --query_num_list '[576]' \
    --connector_depth 3 \
    --image_position 91 \
    --vision_hidden_size 1024 \
    --connector_only False \
    --num_of_vision_sampler_layers 10 \
    --start_of_vision_sampler_layers 0 \
    --stride_of_vision_sampler_layers 3 \
    --mm_projector_type sva \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --image_aspect_ratio pad \
    --unfreeze_mm_vision_tower False \
    --group_by_modality_length True \
    --learning_rate 4e-5 \
    --warmup_ratio 0.03 \
    --save_steps 2000 \
    --bf16 "${BF16:-True}" \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs 1 \
    --per_device_train_batch_size "$PER_DEVICE_BATCH" \
    --gradient_accumulation_steps "$GRAD_ACC" \
    --batch_size "$GLOBAL_BATCH" \
    --eval_strategy "no" \
    --save_strategy "steps" \
    --save_total_limit 1 \
    --weight_decay 0. \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --report_to "${REPORT_TO:-none}" \
    --run_name "$CKPT_NAME" \
    --resume_from_checkpoint auto \
    "${SYNC_ARGS[@]}" \
    "$@"
