#!/usr/bin/env bash
# Peak memory and time of one LoRA training step at Stable Diffusion 2.1's UNet size (865 M
# parameters, random weights) on the CPU: ipr with blockwise attention (the default), ipr with
# plain attention (--attention-block-mib 0) and PyTorch (diffusers + PEFT, its default SDPA), one
# after the other in one run. Batch 1, f32, rank-4 adapters on to_q/to_k/to_v/to_out.0.
#   bash scripts/bench/compare_sd_train_memory.sh [PYTHON]
# Env: SIZE (latent side, default 64 = 512 px images; 96 is SD 2.1's 768 px), THREADS (all cores),
# PLAIN (1: also run ipr with plain attention; default 1). Peak memory is the process's maximum
# resident set (GNU time's %M). Needs ~17 GB free at SIZE=64 with PLAIN=1.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-${PYTHON:-python3}}
SIZE=${SIZE:-64}
THREADS=${THREADS:-$(nproc)}
PLAIN=${PLAIN:-1}
cargo build --release -q -p ipr
IPR=${CARGO_TARGET_DIR:-target}/release/ipr
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" - "$SIZE" "$work/unet.json" <<'PYEOF'
import json, sys
c = json.load(open("scripts/gpu_check/sd21_unet_config.json"))
c["sample_size"] = int(sys.argv[1])
json.dump(c, open(sys.argv[2], "w"))
PYEOF
echo "machine: $(nproc) cores, threads $THREADS, SD 2.1 UNet at ${SIZE}x${SIZE} latents, batch 1, f32"
measure() { # NAME CMD...: prints NAME, ms/step and peak RSS
  local name=$1
  shift
  /usr/bin/time -f "%M" -o "$work/rss" "$@" > "$work/out.json"
  "$PY" - "$name" "$work/out.json" "$work/rss" <<'PYEOF'
import json, sys
ms = json.load(open(sys.argv[2]))["ms_per_step"]
rss = int(open(sys.argv[3]).read().split()[-1]) / 2**20
print(f"{sys.argv[1]:<24} {ms / 1e3:7.1f} s/step   peak RSS {rss:5.1f} GiB")
PYEOF
}
common=(bench train-step --unet "$work/unet.json" --batch 1 --iters 1 --shards 1 --json)
RAYON_NUM_THREADS=$THREADS measure "ipr (blockwise)" "$IPR" "${common[@]}"
if [ "$PLAIN" = 1 ]; then
  RAYON_NUM_THREADS=$THREADS measure "ipr (plain attention)" "$IPR" --attention-block-mib 0 "${common[@]}"
fi
OMP_NUM_THREADS=$THREADS measure "torch (diffusers+peft)" "$PY" scripts/bench/train_step.py --unet "$work/unet.json" \
  --batch 1 --iters 1 --threads "$THREADS" --json
