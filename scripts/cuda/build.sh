#!/usr/bin/env bash
# Build the `ipr` binary with the `cuda` feature on a machine WITHOUT a system CUDA toolkit
# (and without a GPU): nvcc, headers and libraries come from NVIDIA's PyPI wheels installed in a
# Python venv outside the repo; a libcuda.so stub stands in for the driver at link time.
#
#   bash scripts/cuda/build.sh            # toolchain + release build -> dist/ipr-cuda (+ manifest)
#   bash scripts/cuda/build.sh --check    # only set up and verify the toolchain (nvcc compiles and
#                                         # links a tiny CUDA program against the stub); no cargo
#
# Environment (all optional):
#   IPR_CUDA_VERSION   CUDA release of the wheels: 13.0 (default), 12.9, 12.8, 12.4. Must be <= the
#                      CUDA version that the GPU machine's driver supports (nvidia-smi, top right;
#                      driver 580 -> 13.0, 575 -> 12.9, 570 -> 12.8, 550 -> 12.4), and its major
#                      version should match the CUDA libraries available at run time there (PyTorch
#                      cu130 ships libcublas.so.13 etc.; a cu12x PyTorch ships the .so.12 ones).
#   CUDA_COMPUTE_CAP   GPU architecture the kernels are built for: 90 (default; H100/H200), 89
#                      (L4/L40/4090), 80 (A100), 86 (A10/3090). PTX is JIT-compiled by the driver
#                      for newer GPUs of the same major, so build for the oldest GPU you target.
#   IPR_CUDA_VENV      the venv (default $HOME/.cache/ipr-cuda-venv); reused when present.
#   IPR_CUDA_ROOT      the assembled CUDA_ROOT-like folder (default $IPR_CUDA_VENV/cuda-root).
#   IPR_PIP_FIND_LINKS a folder of wheels: install offline from it (pip --no-index --find-links).
#   CARGO_TARGET_DIR   cargo's target folder (default /root/target-cuda, apart from the CPU build's).
#   IPR_CUDA_JOBS      cargo -j and nvcc parallelism (default: number of cores).
#   IPR_CUDA_FEATURES  cargo features (default cuda). `cuda,nccl` adds NCCL's gradient exchange
#                      (the nccl wheel is then installed for linking; at run time libnccl.so.2
#                      comes from PyTorch's wheels or the system); `cuda,nccl,mpi` for clusters
#                      (links the system's MPI: build where mpicc is, run where the same MPI is).
#                      `cudnn` adds cuDNN convolutions (linked against a generated stub; at run time
#                      libcudnn.so.9 from PyTorch's nvidia/cudnn wheel or a system cuDNN 9).
#   IPR_CUDA_NAME      the binary's name under dist/ (default ipr-cuda). The GPU check's fallback for
#                      a machine without cuDNN is `IPR_CUDA_FEATURES=cuda,nccl IPR_CUDA_NAME=ipr-cuda-nocudnn`.
#   IPR_GIT_COMMIT     commit recorded in the manifest when the tree is not a git checkout (an export).
set -euo pipefail

MODE=build
for arg in "$@"; do
  case "$arg" in
    --check) MODE=check ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $arg (use --check or nothing)" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
IPR_CUDA_VERSION="${IPR_CUDA_VERSION:-13.0}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
IPR_CUDA_VENV="${IPR_CUDA_VENV:-$HOME/.cache/ipr-cuda-venv}"
IPR_CUDA_ROOT="${IPR_CUDA_ROOT:-$IPR_CUDA_VENV/cuda-root}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/root/target-cuda}"
JOBS="${IPR_CUDA_JOBS:-$(nproc)}"
PYTHON="${PYTHON:-python3}"

log() { echo "[cuda/build $(date -u +%H:%M:%S)] $*"; }
die() { echo "[cuda/build] ERROR: $*" >&2; exit 1; }

case "$IPR_CUDA_VENV/" in "$REPO"/*) die "IPR_CUDA_VENV must be outside the repo ($IPR_CUDA_VENV)";; esac

# ---- 1. pinned wheels ---------------------------------------------------------------------------
# Versions are those of one CUDA release (the ones PyTorch's cuXYZ builds pin, where it has one).
# CUDA 13 wheels are unsuffixed and install into site-packages/nvidia/cu13/; CUDA 12 wheels are
# "-cu12" and install one folder per component (nvidia/cuda_nvcc, nvidia/cublas, ...).
case "$IPR_CUDA_VERSION" in
  13.0) WHEELS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
                nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.1.0.3
                nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88) ;;
  12.9) WHEELS=(nvidia-cuda-nvcc-cu12==12.9.86 nvidia-cuda-runtime-cu12==12.9.79
                nvidia-cublas-cu12==12.9.1.4 nvidia-curand-cu12==10.3.10.19 nvidia-cuda-nvrtc-cu12==12.9.86) ;;
  12.8) WHEELS=(nvidia-cuda-nvcc-cu12==12.8.93 nvidia-cuda-runtime-cu12==12.8.90
                nvidia-cublas-cu12==12.8.4.1 nvidia-curand-cu12==10.3.9.90 nvidia-cuda-nvrtc-cu12==12.8.93) ;;
  12.4) WHEELS=(nvidia-cuda-nvcc-cu12==12.4.131 nvidia-cuda-runtime-cu12==12.4.127
                nvidia-cublas-cu12==12.4.5.8 nvidia-curand-cu12==10.3.5.147 nvidia-cuda-nvrtc-cu12==12.4.127) ;;
  *) die "IPR_CUDA_VERSION=$IPR_CUDA_VERSION not pinned here (13.0, 12.9, 12.8, 12.4); add a row" ;;
esac
CUDA_MAJOR="${IPR_CUDA_VERSION%%.*}"
IPR_CUDA_FEATURES="${IPR_CUDA_FEATURES:-cuda}"
NAME="${IPR_CUDA_NAME:-ipr-cuda}"
case "$NAME" in *[!A-Za-z0-9._-]*|"") die "IPR_CUDA_NAME=$NAME: letters, digits, . _ - only";; esac
case ",$IPR_CUDA_FEATURES," in *,cuda,*|*,nccl,*) ;; *) die "IPR_CUDA_FEATURES=$IPR_CUDA_FEATURES has no cuda";; esac
if [[ ",$IPR_CUDA_FEATURES," == *,nccl,* ]]; then
  # The NCCL that PyTorch pins for the same CUDA release (cudarc links -lnccl).
  case "$IPR_CUDA_VERSION" in
    13.0) WHEELS+=(nvidia-nccl-cu13==2.27.7) ;;
    12.9|12.8) WHEELS+=(nvidia-nccl-cu12==2.27.3) ;;
    12.4) WHEELS+=(nvidia-nccl-cu12==2.21.5) ;;
  esac
fi

STAMP="$IPR_CUDA_VENV/.ipr-wheels"
WANT="${WHEELS[*]}"
if [ ! -x "$IPR_CUDA_VENV/bin/python" ]; then
  log "creating venv $IPR_CUDA_VENV"
  "$PYTHON" -m venv "$IPR_CUDA_VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  log "installing CUDA $IPR_CUDA_VERSION wheels: $WANT"
  PIP_ARGS=(--disable-pip-version-check --no-deps)
  [ -n "${IPR_PIP_FIND_LINKS:-}" ] && PIP_ARGS+=(--no-index --find-links "$IPR_PIP_FIND_LINKS")
  # --no-deps: the wheels above are the complete set (their only dependencies are each other);
  # this keeps pip from pulling a newer nvidia-cuda-runtime behind the pins' back.
  "$IPR_CUDA_VENV/bin/python" -m pip install -q "${PIP_ARGS[@]}" "${WHEELS[@]}"
  echo "$WANT" > "$STAMP"
  rm -rf "$IPR_CUDA_ROOT"
else
  log "wheels already installed in $IPR_CUDA_VENV"
fi
SITE="$("$IPR_CUDA_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
NV="$SITE/nvidia"
[ -d "$NV" ] || die "no $NV after pip install"

# A link-time stub lib64/stubs/<name>.so with SONAME $1 defining every function (pattern $2) that
# cudarc's bindings under src/$3/sys declare (so the list follows the cudarc version); $4, $5 name
# the library in the stub's comment and the log. Used for libraries the binary needs only at run
# time (see 3. and 3b.).
make_stub() {
  local soname="$1" pattern="$2" sys="$3" what="$4" kind="$5" src stub
  src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-* 2>/dev/null | sort -V | tail -1)"
  if [ -z "$src" ]; then
    (cd "$REPO" && cargo fetch -q) || die "cargo fetch failed (needed to read cudarc's $kind symbols)"
    src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-* | sort -V | tail -1)"
  fi
  mkdir -p "$IPR_CUDA_ROOT/lib64/stubs"
  stub="$IPR_CUDA_ROOT/lib64/stubs/${soname%%.so*}_stub.c"
  { echo "/* generated by scripts/cuda/build.sh from $src: link-time stand-in for $what */"
    grep -ohE "$pattern" "$src"/src/"$sys"/sys/*.rs \
      | sed 's/^pub unsafe fn //' | sort -u | sed 's/.*/int &(void) { return 999; }/'
  } > "$stub"
  local n_sym; n_sym="$(grep -c '^int ' "$stub")"
  [ "$n_sym" -gt 100 ] || die "only $n_sym $kind symbols found in $src"
  cc -shared -fPIC -O0 -Wl,-soname,"$soname" -o "$IPR_CUDA_ROOT/lib64/stubs/${soname%%.so*}.so" "$stub"
  log "${soname%%.so*}.so stub: $n_sym $kind symbols"
}

# ---- 2. a CUDA_ROOT-like folder ------------------------------------------------------------------
# nvcc finds its helpers (cicc in nvvm/bin, ptxas, fatbinary, crt headers) relative to the *real*
# path of bin/nvcc (nvcc.profile: TOP = bin/..), so the wheels' bin/, nvvm/, include/ and lib/ are
# merged into ONE tree of hard links (copies when hard links fail), not symlinked.
if [ ! -f "$IPR_CUDA_ROOT/.ipr-ok" ]; then
  log "assembling $IPR_CUDA_ROOT"
  rm -rf "$IPR_CUDA_ROOT"; mkdir -p "$IPR_CUDA_ROOT"/{bin,include,lib64,nvvm}
  for comp in "$NV"/*/; do
    for sub in bin include nvvm; do
      [ -d "$comp/$sub" ] && { cp -rlf "$comp/$sub/." "$IPR_CUDA_ROOT/$sub/" 2>/dev/null \
                               || cp -rf "$comp/$sub/." "$IPR_CUDA_ROOT/$sub/"; }
    done
    for sub in lib lib64; do
      [ -d "$comp/$sub" ] && { cp -rlf "$comp/$sub/." "$IPR_CUDA_ROOT/lib64/" 2>/dev/null \
                               || cp -rf "$comp/$sub/." "$IPR_CUDA_ROOT/lib64/"; }
    done
  done
  ln -sfn lib64 "$IPR_CUDA_ROOT/lib"
  chmod +x "$IPR_CUDA_ROOT"/bin/* "$IPR_CUDA_ROOT"/nvvm/bin/* 2>/dev/null || true
  # The wheels ship only versioned sonames (libcublas.so.13); the linker's -lcublas needs libcublas.so.
  ( cd "$IPR_CUDA_ROOT/lib64"
    for f in lib*.so.*; do
      [ -e "$f" ] || continue
      base="${f%%.so.*}.so"
      # link to the shortest versioned name (libfoo.so.13 rather than libfoo.so.13.1.0.3)
      [ -e "$base" ] || ln -s "$(ls -1 "$base".* | awk '{print length, $0}' | sort -n | head -1 | cut -d' ' -f2-)" "$base"
    done )
  [ -x "$IPR_CUDA_ROOT/bin/nvcc" ] || die "no bin/nvcc in the assembled root"

  # ---- 3. libcuda.so stub ----------------------------------------------------------------------
  # cudarc (candle's CUDA layer) links libcuda *dynamically* (feature dynamic-linking), and the
  # wheels have no driver library. Option taken: compile a stub libcuda.so whose SONAME is
  # libcuda.so.1 and which defines every driver-API function that cudarc declares (names read
  # from cudarc's own bindings, so the list follows the cudarc version). The binary then records
  # DT_NEEDED libcuda.so.1 and resolves the symbols against the real driver at run time, exactly
  # as with the toolkit's own lib64/stubs/libcuda.so. The alternative (linking with unresolved
  # symbols allowed) hides real link errors and leaves no DT_NEEDED entry, so it is not used.
  # The stub lives in lib64/stubs and is never copied next to the binary.
  make_stub libcuda.so.1 '^pub unsafe fn cu[A-Za-z0-9_]+' driver "the driver" driver-API
  touch "$IPR_CUDA_ROOT/.ipr-ok"
fi

# ---- 3b. libcudnn.so stub (feature cudnn) ------------------------------------------------------------
# candle's `cudnn` feature (convolutions through cuDNN) makes cudarc link -lcudnn. cuDNN's wheel is
# ~700 MB, and the binary needs it only at run time (PyTorch's nvidia/cudnn wheel has it), so the
# link uses a stub like the driver's: every function cudarc's cuDNN bindings declare, SONAME
# libcudnn.so.9. The cuDNN symbols the binary really imports go into the manifest.
if [[ ",$IPR_CUDA_FEATURES," == *,cudnn,* ]] && [ ! -f "$IPR_CUDA_ROOT/lib64/stubs/libcudnn.so" ]; then
  make_stub libcudnn.so.9 'pub unsafe fn cudnn[A-Za-z0-9_]+' cudnn "cuDNN 9" cuDNN
fi

export CUDA_ROOT="$IPR_CUDA_ROOT" CUDA_PATH="$IPR_CUDA_ROOT" CUDA_HOME="$IPR_CUDA_ROOT"
export PATH="$IPR_CUDA_ROOT/bin:$PATH"
export LIBRARY_PATH="$IPR_CUDA_ROOT/lib64:$IPR_CUDA_ROOT/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export NVCC="$IPR_CUDA_ROOT/bin/nvcc"
export CUDAFORGE_THREADS="$JOBS" RAYON_NUM_THREADS="$JOBS"
export CUDARC_CUDA_VERSION="${CUDA_MAJOR}0${IPR_CUDA_VERSION#*.}0"

# ---- 4. toolchain check ---------------------------------------------------------------------------
NVCC_VER="$(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
[ "$NVCC_VER" = "$IPR_CUDA_VERSION" ] || die "nvcc reports $NVCC_VER, expected $IPR_CUDA_VERSION"
log "nvcc $NVCC_VER at $(command -v nvcc); CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP; CUDA_ROOT=$CUDA_ROOT"
CHK="$(mktemp -d)"; trap 'rm -rf "$CHK"' EXIT
cat > "$CHK/t.cu" <<'EOF'
#include <cuda.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cublas_v2.h>
#include <curand.h>
#include <nvrtc.h>
#include <mma.h>
#include <cstdio>
__global__ void axpy(float a, const __nv_bfloat16 *x, float *y) {
  int i = threadIdx.x; y[i] += a * __bfloat162float(x[i]);
}
int main() {
  int v = 0; cuDriverGetVersion(&v); cudaRuntimeGetVersion(&v);
  cublasHandle_t h; cublasCreate(&h); curandGenerator_t g; curandCreateGenerator(&g, CURAND_RNG_PSEUDO_DEFAULT);
  int maj, min; nvrtcVersion(&maj, &min); printf("%d %d.%d\n", v, maj, min); return 0;
}
EOF
nvcc -std=c++17 -O2 -arch="sm_$CUDA_COMPUTE_CAP" -c "$CHK/t.cu" -o "$CHK/t.o" \
  || die "nvcc could not compile a test kernel for sm_$CUDA_COMPUTE_CAP"
nvcc -arch="sm_$CUDA_COMPUTE_CAP" "$CHK/t.o" -o "$CHK/t" -L"$CUDA_ROOT/lib64" -L"$CUDA_ROOT/lib64/stubs" \
  -lcuda -lcublas -lcublasLt -lcurand -lnvrtc -lcudart \
  || die "linking a test program against the wheels' libraries and the libcuda stub failed"
nvcc --ptx -arch="sm_$CUDA_COMPUTE_CAP" "$CHK/t.cu" -o "$CHK/t.ptx" || die "nvcc --ptx failed"
log "toolchain OK: compiled (sm_$CUDA_COMPUTE_CAP, bf16, PTX) and linked (cuda stub, cublas, cublasLt, curand, nvrtc, cudart)"
[ "$MODE" = check ] && { log "--check: done"; exit 0; }

# ---- 5. cargo build ---------------------------------------------------------------------------------
command -v cargo >/dev/null || die "cargo not found"
cd "$REPO"
log "cargo build --release -p ipr --features $IPR_CUDA_FEATURES (CARGO_TARGET_DIR=$CARGO_TARGET_DIR, -j $JOBS); the CUDA kernels take a while"
T0=$(date +%s)
cargo build --release -p ipr --features "$IPR_CUDA_FEATURES" -j "$JOBS"
T1=$(date +%s)
log "cargo build took $((T1 - T0)) s"

# ---- 6. strip, copy, manifest ---------------------------------------------------------------------
BIN="$CARGO_TARGET_DIR/release/ipr"
mkdir -p "$REPO/dist"
[ -f "$REPO/dist/.gitignore" ] || echo "*" > "$REPO/dist/.gitignore"   # dist/ is build output, never committed
cp -f "$BIN" "$REPO/dist/$NAME"
strip --strip-all "$REPO/dist/$NAME" 2>/dev/null || strip "$REPO/dist/$NAME"
# Smoke test without a driver: load the binary against the stub (as libcuda.so.1) and the wheels'
# libraries. Rust links with -z now, so every symbol must resolve at load time: this proves that
# the stub and the libraries cover everything the binary imports.
SMOKE="$CHK/smoke"; mkdir -p "$SMOKE"; ln -sf "$CUDA_ROOT/lib64/stubs/libcuda.so" "$SMOKE/libcuda.so.1"
[ -f "$CUDA_ROOT/lib64/stubs/libcudnn.so" ] && ln -sf "$CUDA_ROOT/lib64/stubs/libcudnn.so" "$SMOKE/libcudnn.so.9"
LD_LIBRARY_PATH="$SMOKE:$CUDA_ROOT/lib64" "$REPO/dist/$NAME" --help >/dev/null \
  || die "dist/$NAME does not load against the stub and the wheels' libraries"
log "smoke test: dist/$NAME --help runs (all symbols resolved at load)"
NEEDED="$(readelf -d "$REPO/dist/$NAME" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')"
CUDNN_SYMS="$(nm -D --undefined-only "$REPO/dist/$NAME" | awk '{print $NF}' | grep '^cudnn' | tr '\n' ' ' || true)"
GLIBC_MAX="$(objdump -T "$REPO/dist/$NAME" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)"
MIN_DRIVER="$(case "$IPR_CUDA_VERSION" in 13.0) echo 580;; 12.9) echo 575;; 12.8) echo 570;; 12.4) echo 550;; esac)"
"$IPR_CUDA_VENV/bin/python" - "$REPO/dist/$NAME.manifest.json" <<EOF
import json, sys, os, hashlib
path = "$REPO/dist/$NAME"
needed = """$NEEDED""".split()
json.dump({
  "binary": "$NAME",
  "bytes": os.path.getsize(path),
  "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest(),
  "git_commit": os.environ.get("IPR_GIT_COMMIT") or os.popen("git -C '$REPO' rev-parse HEAD 2>/dev/null").read().strip() or None,
  "git_dirty": bool(os.popen("git -C '$REPO' status --porcelain -uno 2>/dev/null").read().strip()),
  "built_utc": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "cargo_features": "$IPR_CUDA_FEATURES".split(","),
  "cuda_toolkit": "$NVCC_VER (PyPI wheels: $WANT)",
  "compute_cap": int("$CUDA_COMPUTE_CAP"),
  "kernels": "PTX for sm_$CUDA_COMPUTE_CAP (JIT by the driver) + a static SASS library (libmoe) for sm_$CUDA_COMPUTE_CAP",
  "min_driver": "$MIN_DRIVER (any driver supporting CUDA >= $IPR_CUDA_VERSION)",
  "glibc_min": "${GLIBC_MAX#GLIBC_}",
  "needed_shared_libs": needed,
  "cudnn_symbols_imported": """$CUDNN_SYMS""".split(),
  "runtime_libs_from": {
    "libcuda.so.1": "the NVIDIA driver",
    "libcudnn.so.9": "with the cudnn feature: cuDNN 9 (PyTorch's nvidia/cudnn/lib wheel, or a system cuDNN 9)",
    "others": "CUDA $CUDA_MAJOR runtime libraries: a CUDA $CUDA_MAJOR toolkit's lib64, or PyTorch's nvidia wheels "
              "(site-packages/nvidia/cu13/lib for CUDA 13; nvidia/{cublas,cuda_runtime,curand,cuda_nvrtc}/lib for CUDA 12); "
              "put the folder on LD_LIBRARY_PATH (scripts/gpu_check/run.sh does this)"
  },
  "build_seconds": $((T1 - T0)),
}, open(sys.argv[1], "w"), indent=2)
EOF
# A compressed copy (the PTX text shrinks ~8x: 60 MB -> 7.5 MB) for carrying to a GPU machine under a
# size limit; scripts/gpu_check/run.sh unpacks dist/ipr-cuda.xz when dist/ipr-cuda is absent.
if command -v xz >/dev/null; then
  xz -T0 -6 -kfc "$REPO/dist/$NAME" > "$REPO/dist/$NAME.xz"
  log "dist/$NAME.xz ($(du -h "$REPO/dist/$NAME.xz" | cut -f1))"
fi
log "dist/$NAME ($(du -h "$REPO/dist/$NAME" | cut -f1)) and dist/$NAME.manifest.json written"
log "needs at run time: $(echo $NEEDED)"
