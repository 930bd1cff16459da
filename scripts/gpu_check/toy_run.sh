#!/usr/bin/env bash
# Toy IPR runs on the GPU with the CUDA build: `ipr run --config CONFIG` for each CONFIG (default:
# examples/toy-cuda.toml, the demo on CUDA), timed; each run's table (+ "seconds: N") and
# metrics.json go to OUT_DIR/<config name>/.
#   bash scripts/gpu_check/toy_run.sh [IPR [OUT_DIR [CONFIG ...]]]   (defaults: dist/ipr-cuda, gpu_toy_runs)
#   bash scripts/gpu_check/toy_run.sh dist/ipr-cuda OUT examples/ablations/cuda/*.toml   # the ablations
#   JOBS=6 bash scripts/gpu_check/toy_run.sh dist/ipr-cuda OUT examples/sweeps/heldout/*.toml  # 6 at once
# With JOBS > 1 each run gets RAYON_NUM_THREADS = cores / JOBS; the runs share the GPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
IPR=${1:-dist/ipr-cuda}
OUT=${2:-gpu_toy_runs}
shift $(( $# < 2 ? $# : 2 ))
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(examples/toy-cuda.toml)
if [ ! -e "$IPR" ] && [ -f "$IPR.xz" ]; then xz -dc "$IPR.xz" > "$IPR"; fi
chmod +x "$IPR"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
JOBS=${JOBS:-1}
threads=$(( $(nproc) / JOBS )); [ "$threads" -ge 1 ] || threads=1
run_one() {
  local cfg=$1 name runs
  name=$(basename "$cfg" .toml)
  runs=$(mktemp -d)
  mkdir -p "$OUT/$name"
  local start=$SECONDS
  if RAYON_NUM_THREADS=$threads "$IPR" run --config "$cfg" --runs-dir "$runs" --quiet > "$OUT/$name/table.txt" 2> "$OUT/$name/stderr.txt"; then
    echo "seconds: $(( SECONDS - start ))" >> "$OUT/$name/table.txt"
    cp "$runs"/*/metrics.json "$OUT/$name/"
    echo "== $name"; cat "$OUT/$name/table.txt"
  else
    echo "== $name FAILED"; tail -5 "$OUT/$name/stderr.txt"
  fi
  rm -rf "$runs"
}
for cfg in "${configs[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  run_one "$cfg" &
done
wait
