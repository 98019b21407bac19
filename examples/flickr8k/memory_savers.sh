#!/usr/bin/env bash
# The paper's memory savers (bf16 Adam moments, bf16 text weights with stochastic rounding) against
# float32 storage on Flickr8k: one epoch of quick.toml per run (234 steps, batch 128, bf16 autocast),
# several seeds of float32 for the run-to-run spread, then a table of the final training loss and the
# held-out retrieval. Run from the repo root with ../shared/data beside it (2 runs at a time, 1 thread each;
# about 17 minutes per pair on 2 cores):
#   bash examples/flickr8k/memory_savers.sh
set -euo pipefail
CLIPFORGE=${CLIPFORGE:-.venv/bin/clipforge}
OUT=${OUT:-runs/memory-savers}
FP32_SEEDS=${FP32_SEEDS:-"0 1 2 3"}
SAVERS_SEEDS=${SAVERS_SEEDS:-"0 1"}
run() {  # mode seed [extra options]
  local mode=$1 seed=$2; shift 2
  "$CLIPFORGE" train --config examples/flickr8k/quick.toml --output-dir "$OUT/$mode-seed$seed" --seed "$seed" \
    --epochs 1 --eval-every-steps 235 --threads 1 --progress false "$@" > "$OUT/$mode-seed$seed.log" 2>&1
}
mkdir -p "$OUT"
jobs=()
for seed in $FP32_SEEDS; do jobs+=("fp32 $seed"); done
for seed in $SAVERS_SEEDS; do jobs+=("savers $seed --optimizer-state-dtype bf16 --text-weights-dtype bf16"); done
for ((i = 0; i < ${#jobs[@]}; i += 2)); do
  run ${jobs[i]} &
  if ((i + 1 < ${#jobs[@]})); then run ${jobs[i + 1]} & fi
  wait
done
.venv/bin/python examples/flickr8k/memory_savers_table.py "$OUT"
