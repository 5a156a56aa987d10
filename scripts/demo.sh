#!/usr/bin/env bash
# The README's main job: python -m llava_stf.demo (extra arguments are passed through).
set -euo pipefail
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec python -m llava_stf.demo "$@"
