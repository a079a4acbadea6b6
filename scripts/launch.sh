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
