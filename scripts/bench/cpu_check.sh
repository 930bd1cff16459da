#!/usr/bin/env bash
# Every comparison of issue "CPU speed" in one run, for checking a result on another kind of CPU
# (the README's figures come from one 2-core AMD EPYC): the toy LoRA train step at 2 threads and
# 1 thread, toy sampling, one SD-2.1-size LoRA step, the matrix-product kernels (gemm crate vs
# MKL vs OpenBLAS) and the demo, each beside its reference where it has one. Writes everything to
# one results file named after the CPU and the date (give it to scripts/bench/results/).
#   bash scripts/bench/cpu_check.sh [PYTHON]
# Env: OUT (the results file), CORES (which cores to use, for `taskset -c`; default: the first
# two, so that a larger machine is measured as the 2-core one of the issue), SKIP_SD=1 (skip the
# SD step: it needs about 9 GB of memory and a few minutes), SKIP_DEMO=1.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-${PYTHON:-python3}}
CORES=${CORES:-0,1}
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)
slug=$(echo "$cpu" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//' | cut -c1-40)
OUT=${OUT:-scripts/bench/results/cpu-check-$slug-$(date -u +%Y-%m-%d).txt}
threads=$(echo "$CORES" | tr ',' '\n' | wc -l)
cargo build --release -q -p ipr
run() { # TITLE CMD...: appends the title, the command's output and the load to $OUT
  local title=$1
  shift
  { echo "== $title ($(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg))"; taskset -c "$CORES" "$@" 2>&1; } | tee -a "$OUT"
}
{
  echo "# cpu_check.sh at $(git rev-parse --short HEAD) on $(date -u)"
  echo "# cpu: $cpu; $(nproc) cores here, measured on cores $CORES; flags: $(grep -m1 -o -w -E 'avx512f|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  echo "# python: $("$PY" -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)')"
} | tee "$OUT"
run "train step, batch 16, $threads threads, 5 rounds" env BATCH=16 THREADS="$threads" ROUNDS=5 bash scripts/bench/compare_train_step.sh "$PY"
run "train step, batch 16, 1 thread, 3 rounds of 10 steps" env BATCH=16 THREADS=1 ROUNDS=3 ITERS=10 bash scripts/bench/compare_train_step.sh "$PY"
run "sampling, batch 64, 10 DDIM steps, CFG 4, 5 rounds" env THREADS="$threads" ROUNDS=5 bash scripts/bench/compare_sampling.sh "$PY"
run "matrix products" env THREADS="$threads" bash scripts/bench/compare_gemm.sh "$PY"
if [ "${SKIP_SD:-0}" != 1 ]; then
  run "SD 2.1 LoRA step, 64x64 latents, batch 1" env THREADS="$threads" PLAIN=0 bash scripts/bench/compare_sd_train_memory.sh "$PY"
fi
if [ "${SKIP_DEMO:-0}" != 1 ]; then
  demo=$(mktemp -d)
  ipr=$(pwd)/${CARGO_TARGET_DIR:-target}/release/ipr
  run "the demo (ipr run), wall time and peak memory" bash -c "cd '$demo' && /usr/bin/time -v '$ipr' run > log 2>&1 || true; grep -E 'Elapsed|Maximum resident|Exit status' log"
  rm -rf "$demo"
fi
echo "results: $OUT"
