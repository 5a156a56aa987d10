#!/usr/bin/env bash
# Stage 2 with LoRA (configs/train/finetune_lora.yaml): rank 128, alpha 256, lr 2e-4 (projector 2e-5), global batch 128,
# 1 epoch, cosine, warmup 3 %, no weight decay, bf16 + TF32, gradient checkpointing, max length 2048, ZeRO-3,
# 8 GPUs, modality-grouped batches, from the stage-1 projector; saves the adapter and the merged model.
#
#   scripts/finetune_lora.sh [--flag value ...]         # flags override the YAML, e.g. --output_dir, --preset
#
# Environment (defaults in brackets):
#   NUM_GPUS [8]          GPUs per node
#   HOSTFILE []           DeepSpeed hostfile for several nodes ("host slots=N" per line); nodes = its host lines
#   PER_DEVICE_BATCH [16] per-GPU batch; gradient accumulation = GLOBAL_BATCH / (PER_DEVICE_BATCH x GPUs x nodes)
#   GLOBAL_BATCH [128]    kept fixed whatever the hardware
#   DATA [llava15]        llava15 (llava_v1_5_mix665k) | paper (llava_instruct_158k)
#   LAUNCHER [deepspeed]  deepspeed | torchrun (one node)
#   MASTER_PORT [29500]   DRY_RUN=1 prints the command instead of running it
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_launch.sh
launch_stage configs/train/finetune_lora.yaml configs/train/data-instruct158k.yaml 16 128 "$@"
