#!/usr/bin/env bash
# VQAv2 test-dev: vqav2/llava_vqav2_mscoco_test-dev2015.jsonl -> vqav2/answers/llava_vqav2_mscoco_test-dev2015/<ckpt>/merge.jsonl;
# upload vqav2/answers_upload/llava_vqav2_mscoco_test-dev2015/<ckpt>.json to EvalAI.
# Usage: scripts/eval/vqav2.sh MODEL_PATH [python -m llava_stf.eval arguments]; GPUS=0,1,... runs one process per GPU.
source "$(dirname "$0")/_common.sh"
run_benchmark vqav2 "$@"
