#!/usr/bin/env bash
# N processes of the trainer on this machine, joined into one JAX world on 127.0.0.1.
#
# The same code path as a TPU pod or a SLURM job (jax.distributed + one process per host), on
# CPU (gloo collectives) or on the GPUs of one host (one process per GPU). Use it to test
# multi-process behaviour before paying for a cluster.
#
# Usage:
#   launch/local_multiprocess.sh [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT]
#                                [-g] [-l LOG_DIR] [-t INIT_TIMEOUT] -- MAIN_ARGS...
#
#   -n  processes (default 2)
#   -d  CPU devices per process (default 1; XLA_FLAGS=--xla_force_host_platform_device_count)
#   -g  GPU mode: process i sees only GPU i (SHPEFT_LOCAL_DEVICE_IDS=i); -d is ignored
#   -p  coordinator port on 127.0.0.1 (default: a free one)
#   -l  per-process logs (default ./shpeft_logs/local_<time>); process 0 is also echoed
#   -t  seconds to wait for every process to arrive (default 60)
#   MAIN_ARGS go to `python -m shpeft_jax.main`, e.g.
#
#   launch/local_multiprocess.sh -n 2 -- --config configs/demo.py --workdir /tmp/demo_2proc
#
# Data: all processes read the same data_dir on this machine; each keeps its own slice of every
#   global batch (train.batch_size is global and must divide by the total device count). Prepare
#   tfds datasets once beforehand (python -m shpeft_jax.data.prepare ...): several processes must
#   not build the same data_dir at once.
# Checkpoints: --workdir is shared by all processes (same filesystem); orbax writes one
#   checkpoint from all of them, process 0 writes logs, metrics, best/ and export/.
# A failing process lingers up to SHPEFT_SHUTDOWN_TIMEOUT (here 120 s) at JAX's shutdown barrier
#   before the world stops; this script then stops the others and shows each log's tail.
# Environment: PYTHON (default python3), SHPEFT_SHUTDOWN_TIMEOUT.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

num=2 devices=1 port="" gpu=0 logdir="" timeout=60
while getopts "n:d:p:gl:t:h" opt; do
  case "$opt" in
    n) num="$OPTARG" ;;
    d) devices="$OPTARG" ;;
    p) port="$OPTARG" ;;
    g) gpu=1 ;;
    l) logdir="$OPTARG" ;;
    t) timeout="$OPTARG" ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
if [[ $# -eq 0 ]]; then
  echo "error: no arguments for shpeft_jax.main (e.g. -- --config configs/demo.py --workdir DIR)" >&2
  usage >&2
  exit 2
fi
if ! [[ "$num" =~ ^[1-9][0-9]*$ && "$devices" =~ ^[1-9][0-9]*$ && "$timeout" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: -n, -d and -t take positive integers (got -n '$num' -d '$devices' -t '$timeout')" >&2
  exit 2
fi
PYTHON="${PYTHON:-python3}"
if [[ -z "$port" ]]; then
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
logdir="${logdir:-./shpeft_logs/local_$(date +%Y%m%d_%H%M%S)}"
mkdir -p "$logdir"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM

echo "Starting $num processes (coordinator 127.0.0.1:$port); logs in $logdir" >&2
for ((i = 0; i < num; i++)); do
  (
    export SHPEFT_COORDINATOR="127.0.0.1:$port" SHPEFT_NUM_PROCESSES="$num" \
           SHPEFT_PROCESS_ID="$i" SHPEFT_INIT_TIMEOUT="$timeout" \
           SHPEFT_SHUTDOWN_TIMEOUT="${SHPEFT_SHUTDOWN_TIMEOUT:-120}"
    if [[ "$gpu" == 1 ]]; then
      export SHPEFT_LOCAL_DEVICE_IDS="$i"
    else
      export JAX_PLATFORMS=cpu
      export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
    fi
    exec $PYTHON -m shpeft_jax.main "$@"
  ) >"$logdir/process_$i.log" 2>&1 &
  pids+=("$!")
done
tail -n +1 -f "$logdir/process_0.log" --pid="${pids[0]}" >&2 &
tail_pid=$!

# Wait for all; the first failure stops the others (they would otherwise wait in a collective
# until the heartbeat timeout).
status=0
running=("${!pids[@]}")
while [[ ${#running[@]} -gt 0 && "$status" == 0 ]]; do
  still=()
  for i in "${running[@]}"; do
    if kill -0 "${pids[$i]}" 2>/dev/null; then
      still+=("$i")
    elif ! wait "${pids[$i]}"; then
      status=1
      echo "Process $i failed; stopping the others. Logs: $logdir" >&2
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  [[ ${#running[@]} -gt 0 && "$status" == 0 ]] && sleep 0.5
done
if [[ "$status" != 0 ]]; then
  cleanup
fi
wait "${pids[@]}" 2>/dev/null || true
wait "$tail_pid" 2>/dev/null || true
trap - EXIT
if [[ "$status" != 0 ]]; then
  for ((i = 0; i < num; i++)); do
    echo "--- process $i (last lines of $logdir/process_$i.log)" >&2
    tail -n 5 "$logdir/process_$i.log" >&2
  done
  exit 1
fi
echo "All $num processes finished; logs in $logdir" >&2
