#!/usr/bin/env bash
# Fuzzes every parser of untrusted input (crates/ipr/tests/fuzz.rs) for SECONDS each (default
# 600, the issue's 10 minutes), from a random seed, in a release build, one target after another.
#
#   bash scripts/fuzz.sh                 # all 8 targets, 10 minutes each
#   SECONDS_EACH=60 bash scripts/fuzz.sh fuzz_png_input fuzz_run_toml
#
# A crash (a panic) is kept under crates/ipr/tests/fuzz_corpus/<target>/ by the harness and
# replayed by every later run (CI included); commit it with the fix. An abort (an allocation
# above the harness's 1 GiB limit) cannot be caught in the process: the input it was running is
# then copied into the corpus from target/fuzz-last/ by this script.
set -uo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH="${SECONDS_EACH:-600}"
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(fuzz_run_toml fuzz_metadata_jsonl fuzz_detections_jsonl fuzz_visor_results
                                     fuzz_prompt_tables fuzz_model_configs fuzz_safetensors_headers fuzz_png_input)
LAST="$PWD/target/fuzz-last"
mkdir -p "$LAST"
cargo test --release -p ipr --test fuzz --no-run -q || exit 1
status=0
for t in "${TARGETS[@]}"; do
  seed="${IPR_FUZZ_SEED:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}"
  echo "== $t: $SECONDS_EACH s from seed $seed"
  if ! IPR_FUZZ_SECONDS="$SECONDS_EACH" IPR_FUZZ_SEED="$seed" IPR_FUZZ_LAST="$LAST" \
       cargo test --release -p ipr --test fuzz -q "$t" -- --exact --nocapture 2>&1 | grep -E "inputs in|crash|panicked|abort|memory allocation"; then
    :
  fi
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    status=1
    name="${t#fuzz_}"
    if [ -f "$LAST/$name.bin" ] && ! ls crates/ipr/tests/fuzz_corpus/"$name"/crash-* >/dev/null 2>&1; then
      mkdir -p "crates/ipr/tests/fuzz_corpus/$name"
      cp "$LAST/$name.bin" "crates/ipr/tests/fuzz_corpus/$name/abort-seed-$seed.bin"
      echo "   the process died: its last input is crates/ipr/tests/fuzz_corpus/$name/abort-seed-$seed.bin"
    fi
  fi
done
exit $status
