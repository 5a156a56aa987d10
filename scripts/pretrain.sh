#!/usr/bin/env bash
# Stage 1: projector pretraining with the paper's defaults (configs/train/pretrain.yaml): global batch 256, lr 1e-3,
# 1 epoch, cosine, warmup 3 %, no weight decay, bf16 + TF32, gradient checkpointing, max length 2048, ZeRO-2, 8 GPUs.
#
#   scripts/pretrain.sh [--flag value ...]              # flags override the YAML, e.g. --output_dir, --preset
#
# Environment (defaults in brackets):
#   NUM_GPUS [8]          GPUs per node
#   HOSTFILE []           DeepSpeed hostfile for several nodes ("host slots=N" per line); nodes = its host lines
#   PER_DEVICE_BATCH [32] per-GPU batch; gradient accumulation = GLOBAL_BATCH / (PER_DEVICE_BATCH x GPUs x nodes)
#   GLOBAL_BATCH [256]    kept fixed whatever the hardware
#   DATA [llava15]        llava15 (blip_laion_cc_sbu_558k) | paper (LLaVA-CC3M-Pretrain-595K)
#   LAUNCHER [deepspeed]  deepspeed | torchrun (one node)
#   MASTER_PORT [29500]   DRY_RUN=1 prints the command instead of running it
set -euo pipefail
cd "$(dirname "$0")/.."

NUM_GPUS=${NUM_GPUS:-8}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-32}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}
DATA=${DATA:-llava15}
LAUNCHER=${LAUNCHER:-deepspeed}
MASTER_PORT=${MASTER_PORT:-29500}
HOSTFILE=${HOSTFILE:-}

NODES=1
if [[ -n "$HOSTFILE" ]]; then
  NODES=$(grep -cvE '^\s*(#|$)' "$HOSTFILE" || true)
  if (( NODES < 1 )); then echo "HOSTFILE=$HOSTFILE lists no host" >&2; exit 2; fi
fi
WORLD=$((NUM_GPUS * NODES))
if (( GLOBAL_BATCH % (PER_DEVICE_BATCH * WORLD) != 0 )); then
  echo "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of PER_DEVICE_BATCH=$PER_DEVICE_BATCH x $WORLD GPUs" >&2; exit 2
fi
ACCUM=$((GLOBAL_BATCH / (PER_DEVICE_BATCH * WORLD)))

CONFIGS=(--config configs/train/pretrain.yaml)
case "$DATA" in
  llava15) ;;
  paper) CONFIGS+=(--config configs/train/data-cc595k.yaml) ;;
  *) echo "DATA must be llava15 or paper, got '$DATA'" >&2; exit 2 ;;
esac

ARGS=("${CONFIGS[@]}" --per_device_train_batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$ACCUM" "$@")
case "$LAUNCHER" in
  deepspeed) CMD=(deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT"
                  --module llava_stf.train.run "${ARGS[@]}") ;;
  torchrun)
    if [[ -n "$HOSTFILE" ]]; then echo "LAUNCHER=torchrun runs one node; use deepspeed with HOSTFILE" >&2; exit 2; fi
    CMD=(torchrun --nproc_per_node "$NUM_GPUS" --master_port "$MASTER_PORT" -m llava_stf.train.run "${ARGS[@]}") ;;
  *) echo "LAUNCHER must be deepspeed or torchrun, got '$LAUNCHER'" >&2; exit 2 ;;
esac
echo "global batch $GLOBAL_BATCH = $PER_DEVICE_BATCH per GPU x $NUM_GPUS GPUs x $NODES node(s) x $ACCUM accumulation" >&2
if [[ -n "${DRY_RUN:-}" ]]; then echo "${CMD[*]}"; else exec "${CMD[@]}"; fi
