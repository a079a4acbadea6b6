#!/usr/bin/env bash
# Cambrian-1 34B -- Stage 1 (connector alignment): train the SVA connector on frozen towers and a frozen LLM.
# Released hyper-parameters: global batch 1024, lr 1e-3, SVA lr 1e-4, warmup 6%, cosine, 1 epoch, max length 2048.
#
# Required: LLM_PATH (local folder of the base LLM: Nous-Hermes-2-Yi-34B), DATA_PATH (alignment_2.5m.jsonl (Cambrian-Alignment)),
#           IMAGE_FOLDER, TOWER_PATHS (JSON {tower name: local folder or timm/open_clip file}).
# Optional: ENGINE (deepspeed | fsdp | xla | single, see launch.sh), NUM_GPUS, NNODES, PER_DEVICE_BATCH,
#           OUTPUT_DIR, CHECKPOINT_SYNC_DIR, and any extra flags after the script name (they override).
# With fewer devices the accumulation steps grow to keep the global batch; to train at another global batch,
# set GLOBAL_BATCH and (stage 2) rescale the lr: --base_batch_size 1024 applies lr*sqrt(bs/1024).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
MODEL_TAG=34b TEMPLATE=chatml_direct IMAGE_POSITION=87 SAMPLER_LAYERS=9 SAMPLER_STRIDE=7
RECIPE_BATCH=1024 FINETUNE_LR=2e-5 DS_DEFAULT=zero3.json
run_cambrian_stage pretrain "$@"
