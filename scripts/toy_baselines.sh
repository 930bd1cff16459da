#!/usr/bin/env bash
# The baselines table of the README: the same run (the toy demo's defaults, or CONFIG) with each
# method in the same harness (same prompts, seeds, rounds and training budget), then one Markdown
# table of the base model and each method's last round, per split.
#   bash scripts/toy_baselines.sh [CONFIG]
# Runs go to the config's runs_dir (default runs/): the ipr run is the config's own name (so with
# no CONFIG it is `ipr run`'s demo, runs/toy), the others <name>-<method>. Each run is resumable:
# rerunning the script reuses finished runs and continues unfinished ones. Prints the seconds of
# each run and writes the table to <runs_dir>/baselines.md. Env: METHODS (default
# "ipr pr filter weighted"), NAME (default toy, or the config's name: set it to match CONFIG).
set -euo pipefail
cd "$(dirname "$0")/.."
METHODS=${METHODS:-ipr pr filter weighted}
NAME=${NAME:-toy}
RUNS=${RUNS:-runs}
cargo build --release -q -p ipr
IPR=${CARGO_TARGET_DIR:-target}/release/ipr
config=()
if [ $# -ge 1 ]; then config=(--config "$1"); fi
dirs=()
for m in $METHODS; do
  name="$NAME"
  if [ "$m" != ipr ]; then name="$NAME-$m"; fi
  dir="$RUNS/$name"
  if [ -f "$dir/metrics.json" ]; then
    echo "== $m: finished before ($dir)"
  else
    resume=()
    if [ -d "$dir" ]; then resume=(--resume); fi
    start=$(date +%s)
    "$IPR" run "${config[@]}" --runs-dir "$RUNS" --name "$name" --method "$m" "${resume[@]}" --quiet >/dev/null
    echo "== $m: $(( $(date +%s) - start )) s ($dir)"
  fi
  dirs+=("$dir")
done
"$IPR" eval compare "${dirs[@]}" | tee "$RUNS/baselines.md"
