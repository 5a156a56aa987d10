#!/usr/bin/env bash
# Sourced by scripts/eval/<benchmark>.sh. Runs one benchmark of python -m llava_stf.eval over a LLaVA-1.5
# playground/data/eval, as LLaVA's scripts do: one process per GPU (CHUNKS/IDX), then one call that merges the
# chunks and scores (it loads no model when every question is answered). Reruns resume where a run stopped.
#
#   MODEL_PATH           first argument; further arguments go to python -m llava_stf.eval (e.g. --batch-size 16)
#   DATA_ROOT            default playground/data/eval
#   GPUS                 e.g. 0,1,2,3 (default: CUDA_VISIBLE_DEVICES); one process per listed GPU
#   CHUNKS               number of processes (default: the number of GPUS, else 1); set it on a CPU machine too
#   PYTHON               default python
#
# <ckpt> in the scripts' comments is the model id: the checkpoint folder's name plus the first 8 hex digits of its
# content digest (e.g. stage2-1a2b3c4d), or --model-id. Saved answers are reused only when the checkpoint, question
# file and generation settings match their provenance record; pass --overwrite (without CHUNKS) to answer again.
set -euo pipefail

run_benchmark() {
    local benchmark=$1
    local model_path=${2:?"usage: $0 MODEL_PATH [python -m llava_stf.eval arguments]"}
    shift 2
    local python=${PYTHON:-python} data_root=${DATA_ROOT:-playground/data/eval}
    local gpu_list=() pids=() failed=0
    IFS=, read -ra gpu_list <<< "${GPUS:-${CUDA_VISIBLE_DEVICES:-}}"
    local chunks=${CHUNKS:-${#gpu_list[@]}}
    (( chunks > 1 )) || chunks=1
    local args=(--benchmark "$benchmark" --model-path "$model_path" --data-root "$data_root" "$@")
    if (( chunks > 1 )); then
        for (( idx = 0; idx < chunks; idx++ )); do
            local gpu=${gpu_list[$idx]:-}
            env ${gpu:+CUDA_VISIBLE_DEVICES=$gpu} CHUNKS="$chunks" IDX="$idx" \
                "$python" -m llava_stf.eval "${args[@]}" &
            pids+=($!)
        done
        for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
        if (( failed )); then echo "a chunk failed; rerun to resume" >&2; return 1; fi
    fi
    env -u CHUNKS -u IDX "$python" -m llava_stf.eval "${args[@]}"
}
