#!/usr/bin/env bash
# The GPU check as one command, from the repository root, on the machine's own Python:
#   bash benchmarks/gpu_check.sh OUT_DIR [gpu_check.py flags...]
# Runs from the source tree (no install), keeps the whole log beside the JSON and markdown even if
# the run is cut short, and returns gpu_check.py's exit status (2: no GPU visible).
set -o pipefail
out="${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [flags]}"
shift
mkdir -p "$out"
cd "$(dirname "$0")/.." || exit 1
PYTHONPATH=. PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 \
  "${PYTHON:-python3}" benchmarks/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
