#!/usr/bin/env bash
# TextVQA val (with OCR tokens): textvqa/llava_textvqa_val_v051_ocr.jsonl -> textvqa/answers/<ckpt>.jsonl;
# accuracy from textvqa/TextVQA_0.5.1_val.json.
# Usage: scripts/eval/textvqa.sh MODEL_PATH [python -m llava_stf.eval arguments]; GPUS=0,1,... runs one process per GPU.
source "$(dirname "$0")/_common.sh"
run_benchmark textvqa "$@"
