#!/usr/bin/env bash
# The projector comparison on the generated world: python -m llava_stf.demo compare (extra arguments pass through),
# e.g. scripts/compare_projectors.sh --seeds 0 1 --projectors mlp2x_gelu mbtf_stf (default: all seven, seeds 0 1 2,
# two runs at a time; stages of 3 and 7 epochs; 38 min on a 2-core CPU, 2026-11-28). Writes playground/demo/compare/.
set -euo pipefail
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export WANDB_MODE=${WANDB_MODE:-disabled}
exec python -m llava_stf.demo compare "$@"
