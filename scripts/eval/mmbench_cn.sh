#!/usr/bin/env bash
# MMBench-CN dev: mmbench_cn/mmbench_dev_cn_20231003.tsv -> mmbench_cn/answers/mmbench_dev_cn_20231003/<ckpt>.jsonl;
# upload mmbench_cn/answers_upload/mmbench_dev_cn_20231003/<ckpt>.xlsx.
# Usage: scripts/eval/mmbench_cn.sh MODEL_PATH [python -m llava_stf.eval arguments]; GPUS=0,1,... runs one process per GPU.
source "$(dirname "$0")/_common.sh"
run_benchmark mmbench_cn "$@"
