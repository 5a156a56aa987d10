#!/usr/bin/env bash
# The README's main job: python -m llava_stf.demo (extra arguments are passed through, e.g. --out DIR --seed 1).
set -euo pipefail
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export WANDB_MODE=${WANDB_MODE:-disabled}
exec python -m llava_stf.demo "$@"
