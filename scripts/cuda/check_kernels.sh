#!/usr/bin/env bash
# Compile-checks the project's CUDA kernels (crates/ipr-diffusion/src/*.cu) without a GPU or a CUDA
# toolkit: nvcc from the pinned PyPI wheels (the same CUDA 13.0 release as build.sh; ~5 small
# wheels in a throw-away venv), PTX for compute_80 and compute_90, warnings as errors; then ptxas
# assembles them for sm_80 (A100) and sm_90 (H100/H200), which the PTX alone does not prove: no
# register spills, shared memory within a block's 48 KiB of static shared memory (printed, with
# the most registers a kernel takes). CI runs it; the kernels' arithmetic runs in the emulator
# (`cargo test -p ipr-diffusion --features cuda-emu --test cuda_emu`) and on a GPU
# (`ipr selftest --device cuda`).
# A machine where the wheels cannot be installed (no python3 venv, no package index) is told so and
# the check is skipped; a kernel that does not compile fails.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
WHEELS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
if ! { python3 -m venv "$TMP/venv" && "$TMP/venv/bin/python" -m pip install -q --disable-pip-version-check \
         --no-deps "${WHEELS[@]}"; } >"$TMP/pip.log" 2>&1; then
  echo "check_kernels: SKIPPED, nvcc's wheels could not be installed here:"; tail -3 "$TMP/pip.log"
  exit 0
fi
NV="$("$TMP/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13"
chmod +x "$NV"/bin/* "$NV"/nvvm/bin/* 2>/dev/null || true
SRC="$REPO/crates/ipr-diffusion/src"
n=0
for cu in "$SRC"/*.cu; do
  for cap in 80 90; do
    "$NV/bin/nvcc" --ptx -O3 -std=c++17 -arch="compute_$cap" -Werror all-warnings -I"$SRC" \
      -o "$TMP/$(basename "$cu" .cu)-$cap.ptx" "$cu"
  done
  entries="$(grep -c '^\.visible \.entry' "$TMP/$(basename "$cu" .cu)-90.ptx")"
  echo "check_kernels: $(basename "$cu") compiles (compute_80, compute_90): $entries kernels"
  for cap in 80 90; do
    log="$TMP/$(basename "$cu" .cu)-sm$cap.log"
    if ! "$NV/bin/nvcc" --cubin -O3 -std=c++17 -arch="sm_$cap" -Werror all-warnings -I"$SRC" \
        -Xptxas -v,--warn-on-spills,--warning-as-error -o "$TMP/k.cubin" "$cu" >"$log" 2>&1; then
      cat "$log" >&2; exit 1
    fi
    if grep -E 'bytes spill (stores|loads)' "$log" | grep -vq ' 0 bytes spill stores, 0 bytes spill loads'; then
      echo "check_kernels: $(basename "$cu") spills registers on sm_$cap:" >&2; grep -B3 -E '[1-9][0-9]* bytes spill' "$log" >&2; exit 1
    fi
    regs="$(grep -oE 'Used [0-9]+ registers' "$log" | awk '{print $2}' | sort -n | tail -1 || true)"
    smem="$(grep -oE '[0-9]+ bytes smem' "$log" | awk '{print $1}' | sort -n | tail -1 || true)"
    if [ "${smem:-0}" -gt 49152 ]; then
      echo "check_kernels: $(basename "$cu") takes $smem bytes of static shared memory on sm_$cap (> 48 KiB)" >&2; exit 1
    fi
    echo "check_kernels: $(basename "$cu") assembles for sm_$cap: no spills, at most ${regs:-?} registers, ${smem:-0} bytes shared memory"
  done
  n=$((n + 1))
done
[ "$n" -gt 0 ] || { echo "check_kernels: no .cu files under $SRC" >&2; exit 1; }
