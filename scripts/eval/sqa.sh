#!/usr/bin/env bash
# ScienceQA-IMG: scienceqa/llava_test_CQM-A.json -> scienceqa/answers/<ckpt>.jsonl; IMG-Accuracy from
# scienceqa/problems.json + pid_splits.json.
# Usage: scripts/eval/sqa.sh MODEL_PATH [python -m llava_stf.eval arguments]; GPUS=0,1,... runs one process per GPU.
source "$(dirname "$0")/_common.sh"
run_benchmark sqa "$@"
