#!/usr/bin/env bash
# The GPU check: 7B-shaped bf16 latency, parity, LoRA training throughput and a DeepSpeed ZeRO-2 step, one report;
# --serve: only the served load test at 7B shapes (bench.serve_random), its own report.
#   scripts/gpu_check.sh [--serve] [--dry-run] [--out DIR]
# On the GPU machine: the Python packages it lacks (transformers at the tested version, deepspeed and their needs)
# come as wheels in .whl/ (see scripts/gpu_wheels.sh and the README's Development section); they are installed into
# /tmp/site on top of the machine's own torch, and the project runs from this checkout. The report goes to $OUT when
# set (the device tool's output folder), else docs/gpu/. --dry-run: the same steps on the CPU with tiny shapes.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
if [[ " $* " != *" --dry-run "* ]] && compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m llava_stf.bench.gpu_check "$@"
