#!/usr/bin/env bash
# Toy-loop ablations on the GPU (each ~1-2 min on an H200): every config under
# examples/ablations/cuda/, tables and metrics.json to OUT_DIR/<config name>/.
#   bash scripts/gpu_check/toy_ablations.sh [IPR] [OUT_DIR]   (defaults: dist/ipr-cuda, gpu_toy_ablations)
set -euo pipefail
cd "$(dirname "$0")/../.."
IPR=${1:-dist/ipr-cuda}
OUT=${2:-gpu_toy_ablations}
if [ ! -e "$IPR" ] && [ -f "$IPR.xz" ]; then xz -dc "$IPR.xz" > "$IPR"; fi
chmod +x "$IPR"
runs=$(mktemp -d)
for cfg in examples/ablations/cuda/*.toml; do
  name=$(basename "$cfg" .toml)
  mkdir -p "$OUT/$name"
  SECONDS=0
  "$IPR" run --config "$cfg" --runs-dir "$runs" --quiet > "$OUT/$name/table.txt"
  echo "seconds: $SECONDS" >> "$OUT/$name/table.txt"
  cp "$runs"/*/metrics.json "$OUT/$name/" 2>/dev/null || true
  rm -rf "${runs:?}"/*
  echo "== $name"; cat "$OUT/$name/table.txt"
done
