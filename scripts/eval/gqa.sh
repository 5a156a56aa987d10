#!/usr/bin/env bash
# GQA testdev-balanced: gqa/llava_gqa_testdev_balanced.jsonl -> gqa/answers/llava_gqa_testdev_balanced/<ckpt>/merge.jsonl;
# accuracy when gqa/data/testdev_balanced_questions.json is present, predictions for the official eval.py in gqa/data/.
# Usage: scripts/eval/gqa.sh MODEL_PATH [python -m llava_stf.eval arguments]; GPUS=0,1,... runs one process per GPU.
source "$(dirname "$0")/_common.sh"
run_benchmark gqa "$@"
