#!/usr/bin/env bash
# MMBench dev: mmbench/mmbench_dev_20230712.tsv -> mmbench/answers/mmbench_dev_20230712/<ckpt>.jsonl; upload
# mmbench/answers_upload/mmbench_dev_20230712/<ckpt>.xlsx (add --all-rounds for a local CircularEval).
# Usage: scripts/eval/mmbench.sh MODEL_PATH [python -m llava_stf.eval arguments]; GPUS=0,1,... runs one process per GPU.
source "$(dirname "$0")/_common.sh"
run_benchmark mmbench "$@"
