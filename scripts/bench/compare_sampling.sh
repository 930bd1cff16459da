#!/usr/bin/env bash
# Text-to-image denoising on the CPU, ipr and diffusers side by side in one run: the shipped toy
# base model (models/toy-base), 64 images, 10 DDIM steps, classifier-free guidance 4 (the toy
# demo's sampling), f32, same thread count. Prints both medians and the ratio of steps per second
# ipr / diffusers (>= 1: ipr is faster), and ipr's FLOP/s against the machine's measured peak.
#   bash scripts/bench/compare_sampling.sh [PYTHON]
# Env: BATCH (64), STEPS (10), ITERS (3 timed runs per round), ROUNDS (3: ipr and diffusers
# alternate, the median of the per-round medians is reported), THREADS (default: all cores).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-${PYTHON:-python3}}
THREADS=${THREADS:-$(nproc)}
BATCH=${BATCH:-64}
STEPS=${STEPS:-10}
ITERS=${ITERS:-3}
ROUNDS=${ROUNDS:-3}
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), threads $THREADS"
cargo build --release -q -p ipr
IPR=${CARGO_TARGET_DIR:-target}/release/ipr
ours=()
theirs=()
last=""
for r in $(seq "$ROUNDS"); do
  last=$(RAYON_NUM_THREADS=$THREADS "$IPR" bench sample --batch "$BATCH" --steps "$STEPS" --iters "$ITERS" --json)
  t=$(OMP_NUM_THREADS=$THREADS "$PY" scripts/bench/sample.py --batch "$BATCH" --steps "$STEPS" --iters "$ITERS" \
      --threads "$THREADS" --json)
  ours+=("$(echo "$last" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["steps_per_s"])')")
  theirs+=("$(echo "$t" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["steps_per_s"])')")
  echo "round $r: ipr ${ours[-1]} steps/s, diffusers ${theirs[-1]} steps/s (load $(cut -d' ' -f1 /proc/loadavg))"
done
"$PY" - "${ours[*]}" "${theirs[*]}" "$last" <<'PYEOF'
import json, statistics, sys
o = [float(x) for x in sys.argv[1].split()]
t = [float(x) for x in sys.argv[2].split()]
last = json.loads(sys.argv[3])
mo, mt = statistics.median(o), statistics.median(t)
print(f"ipr       {mo:8.3f} steps/s (median of {len(o)} round medians)")
print(f"diffusers {mt:8.3f} steps/s (median of {len(t)} round medians)")
print(f"ratio ipr/diffusers {mo / mt:.2f}")
print(f"ipr: {last['gflop_per_step']:.1f} GFLOP/step, {last['gflop_per_s']:.0f} GFLOP/s "
      f"= {100 * last['gflop_per_s'] / last['peak_gflop_per_s']:.0f}% of the measured "
      f"{last['peak_gflop_per_s']:.0f} GFLOP/s matrix-product peak (last round)")
PYEOF
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
