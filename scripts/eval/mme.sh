#!/usr/bin/env bash
# MME: MME/llava_mme.jsonl -> MME/answers/<ckpt>.jsonl; Perception/Cognition from MME/MME_Benchmark_release_version,
# converted files in MME/eval_tool/answers/<ckpt>/ for the official calculation.py.
# Usage: scripts/eval/mme.sh MODEL_PATH [python -m llava_stf.eval arguments]; GPUS=0,1,... runs one process per GPU.
source "$(dirname "$0")/_common.sh"
run_benchmark mme "$@"
