#!/usr/bin/env bash
# Prepare .whl/ for scripts/gpu_check.sh on the lent GPU machines (Python 3.12, x86-64, nothing reachable from there):
# the tested transformers and peft, deepspeed (published as an sdist only, so built here into a pure-Python wheel) and
# what those need that the machines' image lacks (it has torch 2.11, transformers 5.17, accelerate 1.15, tokenizers
# 0.23, huggingface-hub 1.33, safetensors 0.8). Run it here, where pip reaches an index; .whl/ is git-ignored and
# travels with the device tool's `carry` (at most 64 MiB; this set is about 28 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
target=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --only-binary=:all:)
python3 -m pip download -q --no-deps "${target[@]}" -d .whl \
  transformers==5.24.0 peft==0.21.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 hjson==3.1.0
# for --serve (the API server and the openai clients of bench.serve_random), at the versions the suite runs
python3 -m pip download -q --no-deps "${target[@]}" -d .whl \
  fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 uvicorn==0.54.0 click==8.5.1 h11==0.16.0 \
  openai==3.57.0 jiter==0.19.0 distro==1.9.0 httpx==0.28.1 httpcore==1.0.9 anyio==4.16.0 sniffio==1.3.1 \
  idna==3.20 certifi==2026.10.19.post1 pillow==12.3.0
python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
ls -1 .whl && du -ch .whl/*.whl | tail -1
