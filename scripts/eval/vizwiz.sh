#!/usr/bin/env bash
# VizWiz test: vizwiz/llava_test.jsonl -> vizwiz/answers/<ckpt>.jsonl; upload vizwiz/answers_upload/<ckpt>.json to EvalAI.
# Usage: scripts/eval/vizwiz.sh MODEL_PATH [python -m llava_stf.eval arguments]; GPUS=0,1,... runs one process per GPU.
source "$(dirname "$0")/_common.sh"
run_benchmark vizwiz "$@"
