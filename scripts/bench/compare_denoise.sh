#!/usr/bin/env bash
# Denoising steps per second on the CPU, ipr (candle) and diffusers side by side in one run, on the
# same configs (the tiny SD1.5-like fixture and the toy size) and the same thread count.
#   bash scripts/bench/compare_denoise.sh [PYTHON]     # PYTHON: a venv with torch + diffusers
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-${PYTHON:-python3}}
THREADS=${THREADS:-$(nproc)}
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), threads $THREADS"
cargo build --release -q -p ipr-diffusion --example bench_unet
echo "== ipr (candle)"
RAYON_NUM_THREADS=$THREADS cargo run --release -q -p ipr-diffusion --example bench_unet
echo "== diffusers (torch $("$PY" -c 'import torch; print(torch.__version__)'))"
OMP_NUM_THREADS=$THREADS "$PY" crates/ipr-diffusion/examples/bench_unet.py --threads "$THREADS"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
