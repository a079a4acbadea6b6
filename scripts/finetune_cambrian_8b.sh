#!/usr/bin/env bash
# Cambrian-1 8B -- Stage 2 (instruction tuning): train connector + LLM, towers frozen, from the stage-1 connector.
# Released hyper-parameters: global batch 512, lr 4e-5, warmup 3%, cosine, 1 epoch, max length 2048.
#
# Required: LLM_PATH (local folder of the base LLM: Meta-Llama-3-8B-Instruct), DATA_PATH (Cambrian7M_withsystemprompt.jsonl (Cambrian-10M)),
#           IMAGE_FOLDER, TOWER_PATHS (JSON {tower name: local folder or timm/open_clip file}), PRETRAIN_ADAPTER (stage-1 output folder; default checkpoints/cambrian-8b-pretrain).
# Optional: ENGINE (deepspeed | fsdp | xla | single, see launch.sh), NUM_GPUS, NNODES, PER_DEVICE_BATCH,
#           OUTPUT_DIR, CHECKPOINT_SYNC_DIR, and any extra flags after the script name (they override).
# With fewer devices the accumulation steps grow to keep the global batch; to train at another global batch,
# set GLOBAL_BATCH and (stage 2) rescale the lr: --base_batch_size 512 applies lr*sqrt(bs/512).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
MODEL_TAG=8b TEMPLATE=llama_v3 IMAGE_POSITION=91 SAMPLER_LAYERS=10 SAMPLER_STRIDE=3
RECIPE_BATCH=512 FINETUNE_LR=4e-5 DS_DEFAULT=zero2.json
run_cambrian_stage finetune "$@"
