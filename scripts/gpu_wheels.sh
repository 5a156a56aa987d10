#!/usr/bin/env bash
# Prepare .whl/ for scripts/gpu_check.sh on the lent GPU machines (Python 3.12, x86-64, nothing reachable from there):
# the tested transformers and peft, deepspeed (published as an sdist only, so built here into a pure-Python wheel) and
# what those need that the machines' image lacks (it has torch 2.11, transformers 5.17, accelerate 1.15, tokenizers
# 0.23, huggingface-hub 1.33, safetensors 0.8). Run it here, where pip reaches an index; .whl/ is git-ignored and
# travels with the device tool's `carry` (at most 64 MiB; this set is about 20 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
target=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --only-binary=:all:)
python3 -m pip download -q --no-deps "${target[@]}" -d .whl \
  transformers==5.24.0 peft==0.21.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 hjson==3.1.0
python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
ls -1 .whl && du -ch .whl/*.whl | tail -1
