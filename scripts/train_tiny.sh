#!/usr/bin/env bash
# The two-stage recipe on a tiny random Cambrian model (4 small towers, SVA with in-LLM sampler layers, a 4-layer
# LLaMA) and a generated shapes data set: runs in about a minute on a CPU.  Useful to try an engine end to end:
#
#   scripts/train_tiny.sh                          # one process (CPU)
#   ENGINE=deepspeed NUM_GPUS=1 scripts/train_tiny.sh   # DeepSpeed ZeRO-2 (DS_CONFIG=scripts/zero3.json for ZeRO-3)
#   ENGINE=fsdp NUM_GPUS=2 scripts/train_tiny.sh   # FSDP, 2 processes (CPU: gloo)
#   ENGINE=xla PJRT_DEVICE=CPU PYTHON=.venv-xla/bin/python scripts/train_tiny.sh   # torch_xla (`make test-xla` venv)
#
# WORK (default /tmp/cambrian-tiny) receives the inputs (llm/, towers/, data/) and the outputs (stage1/, stage2/).
# STEPS (default 20) optimizer steps per stage.  Extra flags are passed to both stages.
set -euo pipefail
export ENGINE=${ENGINE:-single}
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
WORK=${WORK:-/tmp/cambrian-tiny}
STEPS=${STEPS:-20}
if [ "$ENGINE" = xla ]; then FSDP_CONFIG=${FSDP_CONFIG:-none}; fi
$PYTHON "$SCRIPTS_DIR/tiny_inputs.py" "$WORK" --train 64 > /dev/null
MM_ARGS=$($PYTHON -c "import json, shlex; d = json.load(open('$WORK/tiny_args.json')); print(' '.join(shlex.quote(a) for a in d['model_args']))")
TOWER_PATHS=$($PYTHON -c "import json; print(json.dumps(json.load(open('$WORK/tiny_args.json'))['tower_paths']))")
COMMON=(--data_path "$WORK/data/train.jsonl" --tower_paths "$TOWER_PATHS" --per_device_train_batch_size 4
        --max_steps "$STEPS" --logging_steps 5 --save_steps 10 --save_total_limit 1 --lr_scheduler_type cosine
        --report_to none --dataloader_num_workers 0 --model_max_length 320)

echo "== stage 1: connector alignment ($ENGINE)"
eval launch --model_name_or_path "$WORK/llm" $MM_ARGS '"${COMMON[@]}"' --tune_mm_mlp_adapter True \
    --learning_rate 1e-3 --mm_vision_sampler_lr 1e-4 --warmup_ratio 0.06 --output_dir "$WORK/stage1" '"$@"'
echo "== stage 2: instruction tuning ($ENGINE)"
eval launch --model_name_or_path "$WORK/llm" $MM_ARGS '"${COMMON[@]}"' --pretrain_mm_mlp_adapter "$WORK/stage1" \
    --learning_rate 4e-5 --warmup_ratio 0.03 --group_by_modality_length True --output_dir "$WORK/stage2" '"$@"'
echo "== outputs: $WORK/stage1 (mm_projector.safetensors), $WORK/stage2 (released layout)"
