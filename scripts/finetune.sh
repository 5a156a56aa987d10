#!/usr/bin/env bash
# Stage 2: full fine-tuning (projector + LLM) with the paper's defaults (configs/train/finetune.yaml): global batch 128,
# lr 2e-5, 1 epoch, cosine, warmup 3 %, no weight decay, bf16 + TF32, gradient checkpointing, max length 2048, ZeRO-3,
# 8 GPUs, modality-grouped batches, from the stage-1 projector (--pretrained_projector, default the pretrain output).
#
#   scripts/finetune.sh [--flag value ...]              # flags override the YAML, e.g. --output_dir, --preset
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
launch_stage configs/train/finetune.yaml configs/train/data-instruct158k.yaml 16 128 "$@"
