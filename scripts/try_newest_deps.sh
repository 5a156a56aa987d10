#!/usr/bin/env bash
# The first step of moving a tested dependency range up: in a throw-away venv, install the project as pinned, then
# upgrade the fast-moving dependencies past their caps to the newest releases, and run the fence and the test suite.
# If everything passes, raise the caps in pyproject.toml to the next untested minor and update the README's table.
#   scripts/try_newest_deps.sh [VENV_DIR]        (default /tmp/llava-stf-newest; deleted and made afresh)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/llava-stf-newest}
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q -e ".[test]"
# pip warns that these break the project's caps: that is the point.
"$venv/bin/python" -m pip install -q --upgrade transformers tokenizers accelerate peft deepspeed datasets
"$venv/bin/python" -m pip list 2>/dev/null | grep -iE '^(torch|transformers|tokenizers|accelerate|peft|deepspeed|datasets) '
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
"$venv/bin/python" tests/test_transformers_fence.py | grep "NOT ALLOWED" || true
"$venv/bin/python" -m pytest -q
