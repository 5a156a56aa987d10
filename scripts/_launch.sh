# Shared by pretrain.sh / finetune.sh / finetune_lora.sh (sourced, not run): derive gradient accumulation so the
# global batch stays the paper's on any hardware, pick the data mix, and launch llava_stf.train.run.
#
#   launch_stage STAGE_YAML PAPER_DATA_YAML DEFAULT_PER_DEVICE_BATCH DEFAULT_GLOBAL_BATCH [--flag value ...]
#
# Environment (defaults in brackets): NUM_GPUS [8] GPUs per node; HOSTFILE [] DeepSpeed hostfile for several nodes
# ("host slots=N" per line); PER_DEVICE_BATCH; GLOBAL_BATCH; DATA [llava15] llava15 | paper; LAUNCHER [deepspeed]
# deepspeed | torchrun (one node); MASTER_PORT [29500]; DRY_RUN=1 prints the command instead of running it.
launch_stage() {
  local stage_yaml=$1 paper_yaml=$2
  local per_device=${PER_DEVICE_BATCH:-$3} global=${GLOBAL_BATCH:-$4}
  shift 4
  local num_gpus=${NUM_GPUS:-8} data=${DATA:-llava15} launcher=${LAUNCHER:-deepspeed}
  local port=${MASTER_PORT:-29500} hostfile=${HOSTFILE:-} nodes=1
  if [[ -n "$hostfile" ]]; then
    nodes=$(grep -cvE '^\s*(#|$)' "$hostfile" || true)
    if (( nodes < 1 )); then echo "HOSTFILE=$hostfile lists no host" >&2; exit 2; fi
  fi
  local world=$((num_gpus * nodes))
  if (( global % (per_device * world) != 0 )); then
    echo "GLOBAL_BATCH=$global is not a multiple of PER_DEVICE_BATCH=$per_device x $world GPUs" >&2; exit 2
  fi
  local accum=$((global / (per_device * world)))

  local configs=(--config "$stage_yaml")
  case "$data" in
    llava15) ;;
    paper) configs+=(--config "$paper_yaml") ;;
    *) echo "DATA must be llava15 or paper, got '$data'" >&2; exit 2 ;;
  esac

  local args=("${configs[@]}" --per_device_train_batch_size "$per_device" --gradient_accumulation_steps "$accum" "$@")
  local cmd
  case "$launcher" in
    deepspeed) cmd=(deepspeed ${hostfile:+--hostfile "$hostfile"} --num_gpus "$num_gpus" --master_port "$port"
                    --module llava_stf.train.run "${args[@]}") ;;
    torchrun)
      if [[ -n "$hostfile" ]]; then echo "LAUNCHER=torchrun runs one node; use deepspeed with HOSTFILE" >&2; exit 2; fi
      cmd=(torchrun --nproc_per_node "$num_gpus" --master_port "$port" -m llava_stf.train.run "${args[@]}") ;;
    *) echo "LAUNCHER must be deepspeed or torchrun, got '$launcher'" >&2; exit 2 ;;
  esac
  echo "global batch $global = $per_device per GPU x $num_gpus GPUs x $nodes node(s) x $accum accumulation" >&2
  if [[ -n "${DRY_RUN:-}" ]]; then echo "${cmd[*]}"; else exec "${cmd[@]}"; fi
}
