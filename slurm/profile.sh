#!/bin/bash
# Throughput of the data pipeline, the model and the whole training step (images/s, MFU) on
# one GPU node, one task per GPU: `star profile all`. Short, so it is not requeued.
#
#   sbatch slurm/profile.sh                                   # from the repository root
#   CONFIG=arm_b_300ep PROFILE_ARGS="--batches 50" sbatch slurm/profile.sh
#
# Environment: CONFIG (default star_b_1600ep), DATA_DIR (shard directory), PROFILE_WHAT
# (default all: data | model | step | all), PROFILE_ARGS (more options for `star profile`;
# script arguments are appended), STAR_ROOT, STAR_VENV, STAR_CMD (slurm/_common.sh).
#SBATCH --job-name=star-profile
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem-per-cpu=8G
#SBATCH --time=01:00:00
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
##SBATCH --partition=gpu
##SBATCH --account=my-project

set -uo pipefail
STAR_ROOT=${STAR_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/_common.sh
source "$STAR_ROOT/slurm/_common.sh" \
    || { echo "cannot source $STAR_ROOT/slurm/_common.sh: submit from the repository root or set STAR_ROOT" >&2; exit 2; }
star_setup

CONFIG=${CONFIG:-star_b_1600ep}
read -r -a profile_args <<<"${PROFILE_ARGS:-}"
args=(--config "$CONFIG" ${DATA_DIR:+--data "$DATA_DIR"} "${profile_args[@]}" "$@")
star_srun "${STAR_CMD[@]}" profile "${PROFILE_WHAT:-all}" "${args[@]}"
rc=$?
star_log "profile finished with exit code $rc"
exit "$rc"
