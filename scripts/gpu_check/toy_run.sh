#!/usr/bin/env bash
# The toy IPR demo on the GPU with the CUDA build: `ipr run --config examples/toy-cuda.toml`,
# timed, its table printed and metrics.json + report.html copied to OUT_DIR.
#   bash scripts/gpu_check/toy_run.sh [IPR] [OUT_DIR]     (defaults: dist/ipr-cuda, gpu_toy_run)
set -euo pipefail
cd "$(dirname "$0")/../.."
IPR=${1:-dist/ipr-cuda}
OUT=${2:-gpu_toy_run}
if [ ! -e "$IPR" ] && [ -f "$IPR.xz" ]; then xz -dc "$IPR.xz" > "$IPR"; fi
chmod +x "$IPR"
mkdir -p "$OUT"
runs=$(mktemp -d)
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
SECONDS=0
"$IPR" run --config examples/toy-cuda.toml --runs-dir "$runs" --quiet | tee "$OUT/table.txt"
echo "seconds: $SECONDS" | tee -a "$OUT/table.txt"
cp "$runs/toy-cuda/metrics.json" "$runs/toy-cuda/report.html" "$OUT/"
