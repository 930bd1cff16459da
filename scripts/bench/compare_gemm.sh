#!/usr/bin/env bash
# The matrix-product kernels side by side in one run: f32 n x n products through the `gemm`
# crate (`ipr bench gemm`: the kernels of every product in ipr on the CPU), MKL (PyTorch's CPU
# build) and OpenBLAS (NumPy's wheels), best of ITERS each, same thread count. Tells whether a
# gap to PyTorch is the matrix kernel or the code around it (issue "CPU speed").
#   bash scripts/bench/compare_gemm.sh [PYTHON]
# Env: SIZES (256,512,1024,1536,2048), ITERS (6), ROUNDS (2: ipr and the Python libraries
# alternate), THREADS (default: all cores).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-${PYTHON:-python3}}
THREADS=${THREADS:-$(nproc)}
SIZES=${SIZES:-256,512,1024,1536,2048}
ITERS=${ITERS:-6}
ROUNDS=${ROUNDS:-2}
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), threads $THREADS"
cargo build --release -q -p ipr
IPR=${CARGO_TARGET_DIR:-target}/release/ipr
for r in $(seq "$ROUNDS"); do
  echo "round $r"
  RAYON_NUM_THREADS=$THREADS "$IPR" bench gemm --n "$SIZES" --iters "$ITERS" | sed 's/^/  gemm crate (ipr) /'
  # Without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, which some machines set for older OpenBLAS
  # builds and which slow a current one (this command only).
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \
    OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS \
    "$PY" scripts/bench/gemm.py --n "$SIZES" --iters "$ITERS" --threads "$THREADS" | sed 's/^/  /'
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
