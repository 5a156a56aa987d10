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
source scripts/_launch.sh
launch_stage configs/train/pretrain.yaml configs/train/data-cc595k.yaml 32 256 "$@"
