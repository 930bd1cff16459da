#!/usr/bin/env bash
# OWL-ViT forward throughput (base-patch32 shape, VISOR's evaluator; random weights, CPU), ipr
# (candle) and transformers side by side in one run with the same thread count.
#   bash scripts/bench/compare_owlvit.sh [PYTHON]      # PYTHON: a venv with torch + transformers
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-${PYTHON:-python3}}
THREADS=${THREADS:-$(nproc)}
ITERS=${ITERS:-3}
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), threads $THREADS"
cargo build --release -q -p ipr
echo "== ipr (candle)"
RAYON_NUM_THREADS=$THREADS target/release/ipr bench owlvit --batch 1 --queries 2 --iters "$ITERS" --json
echo "== transformers"
OMP_NUM_THREADS=$THREADS "$PY" scripts/fixtures/owlvit/bench_owlvit.py --batch 1 --queries 2 --iters "$ITERS"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
