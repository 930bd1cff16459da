#!/usr/bin/env bash
# The toy world's methods compared under several seeds, with intervals (issue: honest toy
# science): each method (or config) is one study, `ipr run --seeds`, then `ipr eval compare`
# of them all, the first one paired against each other.
#
#   bash scripts/toy_study.sh                          # the README's table (below); seeds 0,1,2
#   SEEDS=0,1,2 bash scripts/toy_study.sh ipr examples/ablations/ipr-count-original.toml weighted
#
# An argument is a method name (the demo's settings with that method) or a run config (its own
# settings). Studies go to $RUNS (default runs/), named study-<method or config stem>; a study
# already there is resumed. Prints each study's wall time (all its seeds) and writes
# $RUNS/study-compare.md and $RUNS/study-compare.html.
set -euo pipefail
cd "$(dirname "$0")/.."
IPR="${IPR:-target/release/ipr}"
SEEDS="${SEEDS:-0,1,2}"
RUNS="${RUNS:-runs}"
[ -x "$IPR" ] || cargo build --release -q
mkdir -p "$RUNS"
ARGS=("$@")
# The README's table: the demo (ipr with its validation-chosen treatment of errors) first, then
# the paper's IPR and PR, the baselines, and DDPO with its validation-chosen learning rate.
[ ${#ARGS[@]} -gt 0 ] || ARGS=(ipr examples/ablations/ipr-paper.toml examples/ablations/pr-paper.toml filter weighted
                               ddpo examples/ablations/ddpo-lr-3e-3.toml)
STUDIES=()
for a in "${ARGS[@]}"; do
  if [ -f "$a" ]; then
    name="study-$(basename "$a" .toml)"; set_cfg=(--config "$a")
  else
    name="study-$a"; set_cfg=(--method "$a")
  fi
  resume=(); [ -d "$RUNS/$name" ] && resume=(--resume)
  start=$(date +%s)
  "$IPR" run "${set_cfg[@]}" --name "$name" --runs-dir "$RUNS" --seeds "$SEEDS" --quiet "${resume[@]}" > "$RUNS/$name.table.md"
  echo "$name: $(( $(date +%s) - start )) s for seeds $SEEDS (this call)"
  STUDIES+=("$RUNS/$name")
done
"$IPR" eval compare "${STUDIES[@]}" --report "$RUNS/study-compare.html" | tee "$RUNS/study-compare.md"
