#!/usr/bin/env bash
# POPE: pope/llava_pope_test.jsonl -> pope/answers/<ckpt>.jsonl; per-split metrics and mean F1 from pope/coco/.
# Usage: scripts/eval/pope.sh MODEL_PATH [python -m llava_stf.eval arguments]; GPUS=0,1,... runs one process per GPU.
source "$(dirname "$0")/_common.sh"
run_benchmark pope "$@"
