#!/usr/bin/env bash
# Run on a machine WITH network: downloads the pure-Python wheels that the GPU machine's image
# lacks into scripts/gpu_check/wheels/ (git-ignored; carry it to the GPU machine with the repo).
# The device image has torch, transformers, peft, safetensors, huggingface-hub and nvidia-ml-py,
# but not diffusers (and not importlib_metadata, which diffusers imports). run.sh installs, with
# --no-deps into a scratch folder, only the wheels whose distribution is not already importable.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
mkdir -p "$HERE/wheels"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$HERE/wheels" \
  "diffusers==${DIFFUSERS_VERSION:-0.42.1}" "importlib_metadata==${IMPORTLIB_METADATA_VERSION:-8.7.0}" \
  "zipp==${ZIPP_VERSION:-3.23.0}" "nvidia-ml-py==${NVML_VERSION:-13.580.82}" "${@}"
ls -l "$HERE/wheels"
