#!/usr/bin/env bash
# Train on all GPUs of ONE host.
#
# Default: one process drives every GPU (JAX's single-controller mode; no jax.distributed, no
# coordinator). The trainer's mesh spans all local GPUs: ('data', 'fsdp') = (num_gpus / fsdp,
# fsdp); train.batch_size is global and must be divisible by the number of GPUs.
#
# Usage:
#   launch/multi_gpu.sh [-G GPU_IDS] [-P] -- MAIN_ARGS...
#
#   -G  GPUs to use, e.g. 0,1,2,3 (sets CUDA_VISIBLE_DEVICES; default: all)
#   -P  one process per GPU instead (multi-process on one host via launch/local_multiprocess.sh
#       -g): the same code path as several hosts, useful to rehearse a SLURM job on one machine
#   MAIN_ARGS go to `python -m shpeft_jax.main`, e.g.
#
#   launch/multi_gpu.sh -- --config configs/busi.py --workdir /data/runs/busi \
#       --config.model.init_checkpoint=/data/clip_b16 --config.data.data_dir=/data/tfds
#   launch/multi_gpu.sh -- --config configs/busi.py --workdir /data/runs/busi_fsdp \
#       --config.mesh.fsdp=2        # params + optimizer state sharded over pairs of GPUs
#
# Data: one process reads the dataset from local disk (data.data_dir, prepared once with
#   `python -m shpeft_jax.data.prepare`); TensorFlow only feeds data and never sees the GPUs.
# Checkpoints: --workdir on a local disk (orbax writes from this one process); copy it anywhere
#   afterwards. Memory: XLA preallocates 75% of each GPU; set XLA_PYTHON_CLIENT_MEM_FRACTION or
#   XLA_PYTHON_CLIENT_PREALLOCATE=false to share GPUs with other jobs.
# Environment: PYTHON (default python3).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

gpus="" per_gpu=0
while getopts "G:Ph" opt; do
  case "$opt" in
    G) gpus="$OPTARG" ;;
    P) per_gpu=1 ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
if [[ $# -eq 0 ]]; then
  echo "error: no arguments for shpeft_jax.main (e.g. -- --config configs/busi.py --workdir DIR)" >&2
  usage >&2
  exit 2
fi
if [[ -n "$gpus" ]]; then
  if ! [[ "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    echo "error: -G takes a comma-separated list of GPU numbers, e.g. 0,1 (got '$gpus')" >&2
    exit 2
  fi
  export CUDA_VISIBLE_DEVICES="$gpus"
fi

if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  num_gpus=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES")
elif command -v nvidia-smi >/dev/null 2>&1; then
  num_gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
else
  num_gpus=0
fi
if [[ "$num_gpus" -eq 0 ]]; then
  echo "warning: no GPU found (no nvidia-smi, CUDA_VISIBLE_DEVICES unset); JAX will pick its" \
       "default backend" >&2
fi
echo "Using $num_gpus GPU(s)${CUDA_VISIBLE_DEVICES:+ (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES)}" >&2

if [[ "$per_gpu" == 1 ]]; then
  if [[ "$num_gpus" -lt 1 ]]; then
    echo "error: -P needs GPUs" >&2
    exit 2
  fi
  # local_multiprocess.sh -g gives process i the i-th visible GPU.
  exec "$(dirname "$0")/local_multiprocess.sh" -g -n "$num_gpus" -- "$@"
fi

export SHPEFT_DISTRIBUTED=off   # One process: never wait for a coordinator.
exec ${PYTHON:-python3} -m shpeft_jax.main "$@"
