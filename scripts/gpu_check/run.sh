#!/usr/bin/env bash
# GPU check: ipr (CUDA build) vs diffusers on the same GPU; writes one JSON file. See README.md.
#
#   bash scripts/gpu_check/run.sh --ipr dist/ipr-cuda --out gpu_results.json   # on a GPU machine
#   bash scripts/gpu_check/run.sh --dry-run                                     # CPU, tiny sizes
#
# Options (the rest go to gpu_check.py; `--help` lists them):
#   --ipr PATH      ipr binary. Default: dist/ipr-cuda on a GPU run; for --dry-run a CPU build
#                   (target/release/ipr, else target/debug/ipr, else `cargo build --release -p ipr`).
#   --python PATH   Python with torch (default: $PYTHON, else the first of python3, ~/venv/bin/python
#                   that imports torch).
#   --wheels DIR    offline wheels (diffusers, peft, ... ): any whose distribution is not importable
#                   is installed with --no-deps into a scratch folder put on PYTHONPATH (the system
#                   environment is left untouched). Default: scripts/gpu_check/wheels if it exists.
#   --out FILE      results JSON (default gpu_results.json, or gpu_results_dry.json with --dry-run).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
cd "$REPO"

IPR="" PY="${PYTHON:-}" WHEELS="" OUT="" DRY=0 PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --ipr) IPR="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --dry-run) DRY=1; PASS+=("$1"); shift ;;
    *) PASS+=("$1"); shift ;;
  esac
done
log() { echo "[gpu_check/run $(date -u +%H:%M:%S)] $*"; }

# ---- Python with torch
if [ -z "$PY" ]; then
  for cand in python3 "$HOME/venv/bin/python" /opt/torch/.venv/bin/python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is None)' >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
[ -n "$PY" ] || { PY=python3; log "WARNING: no python with torch found; the diffusers side will be skipped"; }
log "python: $(command -v "$PY") ($("$PY" --version 2>&1))"

# ---- offline wheels for what is missing
[ -z "$WHEELS" ] && [ -d "$HERE/wheels" ] && WHEELS="$HERE/wheels"
SCRATCH="$(mktemp -d /tmp/ipr-gpu-check-py.XXXXXX)"
trap 'rm -rf "$SCRATCH"' EXIT
if [ -n "$WHEELS" ]; then
  shopt -s nullglob
  for whl in "$WHEELS"/*.whl; do
    dist="$(basename "$whl" | cut -d- -f1)"
    if "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" >/dev/null 2>&1; then
      continue
    fi
    log "installing $(basename "$whl") (offline, --no-deps) into $SCRATCH/site"
    "$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check --target "$SCRATCH/site" "$whl" \
      || log "WARNING: could not install $(basename "$whl")"
  done
  export PYTHONPATH="$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'EOF' || true
import importlib.util
missing = [m for m in ("torch", "diffusers", "transformers", "peft", "safetensors") if importlib.util.find_spec(m) is None]
if missing:
    print(f"[gpu_check/run] NOTE: python modules missing: {missing}; the parts needing them are skipped (give --wheels DIR)")
EOF

# $1, from $1.xz when only that was carried (the PTX text makes the binary ~8x larger).
unpack() {
  if [ ! -e "$1" ] && [ -f "$1.xz" ]; then
    log "unpacking $1.xz"
    { xz -dc "$1.xz" 2>/dev/null || "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$1.xz"; } > "$1"
    chmod +x "$1"
  fi
}

# The binary $1 needs the CUDA runtime libraries of the CUDA major it was built with (see its
# manifest): look in PyTorch's nvidia wheels and the system toolkit, and add their folders to
# LD_LIBRARY_PATH.
find_libraries() {
  if [ ! -x "$1" ]; then
    log "WARNING: no executable $1 (copy dist/ipr-cuda from the build machine); the ipr side will be skipped"
    return 0
  fi
  local missing dirs add lib d
  missing="$(ldd "$1" 2>/dev/null | awk '/not found/ {print $1}' || true)"
  if [ -n "$missing" ]; then
    dirs="$("$PY" - <<'EOF' 2>/dev/null || true
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
seen = []
for r in roots:
    for d in glob.glob(os.path.join(r, "nvidia", "*", "lib")) + glob.glob(os.path.join(r, "torch", "lib")):
        if os.path.isdir(d) and d not in seen:
            seen.append(d)
print("\n".join(seen))
EOF
)"
    dirs="$dirs"$'\n'"$(ls -d /usr/local/cuda/lib64 /usr/local/cuda*/targets/x86_64-linux/lib /usr/local/cuda*/lib64 2>/dev/null || true)"
    add=""
    for lib in $missing; do
      for d in $dirs; do
        if [ -e "$d/$lib" ]; then case ":$add:" in *":$d:"*) ;; *) add="${add:+$add:}$d" ;; esac; break; fi
      done
    done
    export LD_LIBRARY_PATH="${add}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    log "LD_LIBRARY_PATH += $add"
  fi
  if ldd "$1" 2>/dev/null | grep -q "not found"; then
    log "ERROR: $1 still misses libraries:"; ldd "$1" | grep "not found"
  fi
  return 0
}

# ---- the ipr binary
if [ "$DRY" = 1 ]; then
  OUT="${OUT:-gpu_results_dry.json}"
  if [ -z "$IPR" ]; then
    for cand in "${CARGO_TARGET_DIR:-$REPO/target}/release/ipr" "${CARGO_TARGET_DIR:-$REPO/target}/debug/ipr"; do
      [ -x "$cand" ] && { IPR="$cand"; break; }
    done
  fi
  if [ -z "$IPR" ] && command -v cargo >/dev/null; then
    log "building a CPU ipr (cargo build --release -p ipr)"
    cargo build --release -q -p ipr && IPR="${CARGO_TARGET_DIR:-$REPO/target}/release/ipr"
  fi
else
  OUT="${OUT:-gpu_results.json}"
  IPR="${IPR:-dist/ipr-cuda}"
  unpack "$IPR"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  find_libraries "$IPR"
  # A binary built with cuDNN that cannot load (no libcudnn.so.9 here): the one built without it,
  # when carried (IPR_CUDA_FEATURES=cuda,nccl IPR_CUDA_NAME=ipr-cuda-nocudnn scripts/cuda/build.sh).
  if [ -x "$IPR" ] && ! "$IPR" --help >/dev/null 2>&1; then
    FALLBACK="${IPR_FALLBACK:-$(dirname "$IPR")/ipr-cuda-nocudnn}"
    unpack "$FALLBACK"
    if [ -x "$FALLBACK" ]; then
      log "WARNING: $IPR does not start here (missing: $(ldd "$IPR" 2>/dev/null | awk '/not found/ {print $1}' | tr '\n' ' ' || true)); using $FALLBACK"
      IPR="$FALLBACK"
      find_libraries "$IPR"
    fi
  fi
fi
[ -n "$IPR" ] && PASS+=(--ipr "$IPR")

log "running gpu_check.py ${PASS[*]} --out $OUT"
T0=$(date +%s)
set +e
"$PY" "$HERE/gpu_check.py" "${PASS[@]}" --out "$OUT"
rc=$?
set -e
log "done in $(( $(date +%s) - T0 )) s, exit $rc, results in $OUT"
exit $rc
