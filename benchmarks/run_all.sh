#!/usr/bin/env bash
# Runs every benchmark of BENCHMARKS.md and keeps each one's JSON line and summary in $OUT.
#
#   benchmarks/run_all.sh [OUT_DIR]          # default OUT_DIR: benchmarks/results/<date>
#   QUICK=1 benchmarks/run_all.sh            # tiny sizes: checks that everything runs (minutes)
#
# On a CPU the full run takes hours (ViT-B/16 at 224 px); see BENCHMARKS.md for the sizes used.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-benchmarks/results/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
lscpu > "$OUT/lscpu.txt" 2>/dev/null || true
"$PY" -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__)" \
  > "$OUT/versions.txt" 2>&1

run() {  # run NAME CMD...: stdout (the JSON line) -> NAME.json, stderr (the summary) -> NAME.log
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/commands.txt"
  "$@" > "$OUT/$name.json" 2> "$OUT/$name.log" || echo "   FAILED (see $OUT/$name.log)"
  grep -v -E "^(W|I)[0-9]{4}|Warning|warn\(" "$OUT/$name.log" | tail -n 20
}

if [ "${QUICK:-0}" = 1 ]; then
  M="--model test_tiny --image_size 16 --batch 4"
  run train_step_paired_float32 "$PY" benchmarks/train_step.py $M --steps 2 \
    --paired jax:full:float32,jax:shpeft:float32,jax:shpeft_sparse:float32,jax:lora:float32,torch:full:float32,torch:shpeft:float32,torch:lora:float32
  run train_step_separate "$PY" benchmarks/train_step.py $M --steps 1
  run memory "$PY" benchmarks/memory.py --model test_tiny
  run profile_step "$PY" benchmarks/profile_step.py --model test_tiny --trace_dir "$OUT/trace"
  run selection "$PY" benchmarks/selection.py --n 1000000 --repeats 1 --skip_sort
  run score_pass "$PY" benchmarks/score_pass.py --model test_tiny --batch 4 --num_batches 2
  run content_hash "$PY" benchmarks/content_hash.py --root "$OUT/oct_synth" --scale 0.01
  run input_pipeline "$PY" benchmarks/input_pipeline.py --num_images 16 --batch_size 4 --steps 2 \
    --workdir "$OUT/input_pipeline"
  exit 0
fi

B="--model ViT-B/16 --image_size 224 --batch 8"
ALL=jax:full:DT,jax:shpeft:DT,jax:shpeft_sparse:DT,jax:lora:DT,torch:full:DT,torch:shpeft:DT,torch:lora:DT
for DT in float32 bfloat16; do
  run "train_step_paired_$DT" "$PY" benchmarks/train_step.py $B --steps 3 --warmup 1 --paired "${ALL//DT/$DT}"
done
run train_step_separate_float32 "$PY" benchmarks/train_step.py $B --steps 1 --warmup 0 --dtypes float32
run memory "$PY" benchmarks/memory.py --model ViT-B/16 --k_percent 1
run profile_step "$PY" benchmarks/profile_step.py --model test_tiny --trace_dir "$OUT/trace"
run selection "$PY" benchmarks/selection.py
run score_pass "$PY" benchmarks/score_pass.py
run content_hash "$PY" benchmarks/content_hash.py --root "${TMPDIR:-/tmp}/shpeft_oct_synth"
run input_pipeline "$PY" benchmarks/input_pipeline.py --num_images 320
run input_pipeline_max_side "$PY" benchmarks/input_pipeline.py --num_images 320 \
  --set data.prepare_max_side=448
run end_to_end_demo "$PY" benchmarks/end_to_end.py --config configs/demo.py
run end_to_end_demo_sparse "$PY" benchmarks/end_to_end.py --config configs/demo.py -- --config.optim.sparse_state=True
