#!/usr/bin/env bash
# Toy IPR runs on the GPU with the CUDA build: `ipr run --config CONFIG` for each CONFIG (default:
# examples/toy-cuda.toml, the demo on CUDA), timed; each run's table (+ "seconds: N") and
# metrics.json go to OUT_DIR/<config name>/.
#   bash scripts/gpu_check/toy_run.sh [IPR [OUT_DIR [CONFIG ...]]]   (defaults: dist/ipr-cuda, gpu_toy_runs)
#   bash scripts/gpu_check/toy_run.sh dist/ipr-cuda OUT examples/ablations/cuda/*.toml   # the ablations
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
runs=$(mktemp -d)
for cfg in "${configs[@]}"; do
  name=$(basename "$cfg" .toml)
  mkdir -p "$OUT/$name"
  SECONDS=0
  "$IPR" run --config "$cfg" --runs-dir "$runs" --quiet > "$OUT/$name/table.txt"
  echo "seconds: $SECONDS" >> "$OUT/$name/table.txt"
  cp "$runs"/*/metrics.json "$OUT/$name/"
  rm -rf "${runs:?}"/*
  echo "== $name"; cat "$OUT/$name/table.txt"
done
