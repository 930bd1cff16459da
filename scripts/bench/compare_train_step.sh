#!/usr/bin/env bash
# One LoRA training step on the CPU, ipr (candle) and PyTorch (diffusers + PEFT) side by side in one
# run, same UNet config, batch, rank-4 adapters on to_q/to_k/to_v/to_out.0, AdamW, weighted loss,
# fp32, same thread count. Prints both medians and the ratio ipr / torch (<= 1.0: ipr is faster).
#   bash scripts/bench/compare_train_step.sh [PYTHON]
# Env: UNET (a UNet folder or config; default: the shipped toy base model's UNet, 1.0 M parameters), BATCH (8),
# ITERS (5 timed steps per run), ROUNDS (3: ipr and torch alternate, the median of the per-run
# medians is reported), THREADS (default: all cores).
# On a shared machine use THREADS=1 for a stable comparison: with 2 threads on 2 busy cores, torch's
# OpenMP threads (and candle's spin-barrier pool) stall for seconds while waiting for each other
# (measured here: torch 97 ms to 5.6 s per step in consecutive runs), so a 2-thread ratio under load
# says more about the load than about the code.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-${PYTHON:-python3}}
THREADS=${THREADS:-$(nproc)}
UNET=${UNET:-models/toy-base/unet}
BATCH=${BATCH:-8}
ITERS=${ITERS:-5}
ROUNDS=${ROUNDS:-3}
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), threads $THREADS"
cargo build --release -q -p ipr
IPR=${CARGO_TARGET_DIR:-target}/release/ipr
ours=()
theirs=()
for r in $(seq "$ROUNDS"); do
  o=$(RAYON_NUM_THREADS=$THREADS "$IPR" bench train-step --unet "$UNET" --batch "$BATCH" --iters "$ITERS" --json)
  t=$(OMP_NUM_THREADS=$THREADS "$PY" scripts/bench/train_step.py --unet "$UNET" --batch "$BATCH" --iters "$ITERS" \
      --threads "$THREADS" --json)
  ours+=("$(echo "$o" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["ms_per_step"])')")
  theirs+=("$(echo "$t" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["ms_per_step"])')")
  echo "round $r: ipr ${ours[-1]} ms, torch ${theirs[-1]} ms (load $(cut -d' ' -f1 /proc/loadavg))"
done
"$PY" - "${ours[*]}" "${theirs[*]}" <<'PYEOF'
import statistics, sys
o = [float(x) for x in sys.argv[1].split()]
t = [float(x) for x in sys.argv[2].split()]
mo, mt = statistics.median(o), statistics.median(t)
print(f"ipr   {mo:8.1f} ms/step (median of {len(o)} run medians)")
print(f"torch {mt:8.1f} ms/step (median of {len(t)} run medians)")
print(f"ratio ipr/torch {mo / mt:.2f}")
PYEOF
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
