#!/usr/bin/env bash
# Submits VISOR's benchmark as three chained Slurm jobs (visor.sbatch: sample array, detect
# array, score), each starting only when the previous one succeeded.
#
#   MODEL=/models/sd21 LORA=runs/sd21-lora/round-2/lora bash scripts/launch/slurm/submit_visor.sh 32
#
# The argument is the array size (default 16); the environment is visor.sbatch's and is passed
# to the jobs (sbatch exports the submitting shell's environment by default). DETECT_SBATCH_ARGS
# adds sbatch options to the detect array, e.g. to run it on CPU nodes:
#   DETECT_DEVICE=cpu DETECT_SBATCH_ARGS="--partition=cpu --gres=none" bash submit_visor.sh 32
set -euo pipefail
N="${1:-16}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
J1=$(sbatch --parsable --array=0-$((N - 1)) "$HERE/visor.sbatch" sample)
# shellcheck disable=SC2086  # the extra options are words
J2=$(sbatch --parsable --array=0-$((N - 1)) --dependency=afterok:"$J1" ${DETECT_SBATCH_ARGS:-} "$HERE/visor.sbatch" detect)
J3=$(sbatch --parsable --dependency=afterok:"$J2" "$HERE/visor.sbatch" score)
echo "sample: job $J1 (array of $N), detect: job $J2, score: job $J3"
