#!/bin/bash
# STAR-B pretraining, the paper's 1600-epoch recipe (config preset star_b_1600ep), on
# 4 nodes x 8 GPUs. It survives time limits and preemption: SLURM sends SIGUSR1 to this shell
# 10 minutes before the limit, every rank checkpoints and exits 75, and the job requeues
# itself under the same id and RUN_DIR, resuming exactly where it stopped.
#
#   mkdir -p logs && sbatch slurm/pretrain_1600ep.sh                 # from the repository root
#   DATA_DIR=/data/imagenet-wds sbatch slurm/pretrain_1600ep.sh
#   CONFIG=arm_b_1600ep MICRO_IMAGES=128 sbatch --nodes=2 slurm/pretrain_1600ep.sh
#   RUN_DIR=runs/star-b-1600ep-123456 EXTRA="schedule.epochs=1800" sbatch slurm/pretrain_1600ep.sh
#   sbatch slurm/pretrain_1600ep.sh key=value ...                    # overrides as arguments
#
# Environment overrides: CONFIG (preset name or YAML path), DATA_DIR (shard directory),
# RUN_DIR (default runs/<job name>-<job id>: the same across requeues), EXTRA (config
# overrides "key=value ..."), MICRO_IMAGES (images per GPU per forward, default 64: see
# below), MAX_RESTARTS (requeue cap, default 50), DOCTOR (0: skip `star doctor` before
# training), KERNELS (model.kernels, default fused on GPUs: KERNELS=auto allows the slow path),
# STAR_ROOT, STAR_VENV, STAR_CMD (see slurm/_common.sh). Options given to sbatch override these headers.
#SBATCH --job-name=star-b-1600ep
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem-per-cpu=8G
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
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
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
star_collect_overrides "$@"
# The preset's 2048 images per step are 256 per GPU on 8 GPUs; on these 4 x 8 GPUs each rank
# takes 64. With another task count set MICRO_IMAGES (a divisor of 2048 / tasks; gradient
# accumulation makes up the rest), or MICRO_IMAGES= (empty) to keep the config's value.
MICRO_IMAGES=${MICRO_IMAGES-64}
[[ -n $MICRO_IMAGES ]] && STAR_OVERRIDES=("batch.micro_images=$MICRO_IMAGES" "${STAR_OVERRIDES[@]}")
star_kernels_override
mkdir -p "$RUN_DIR"
star_log "config $CONFIG  run dir $RUN_DIR  overrides: ${STAR_OVERRIDES[*]:-(none)}"

# Every start (requeues too: the node set may differ) checks the nodes before training.
doctor_args=(--config "$CONFIG" --json "$RUN_DIR/doctor.json")
[[ -n ${DATA_DIR:-} ]] && doctor_args+=(--data "$DATA_DIR")
star_doctor "${doctor_args[@]}" "${STAR_OVERRIDES[@]}"

star_srun "${STAR_CMD[@]}" pretrain --config "$CONFIG" --run-dir "$RUN_DIR" "${STAR_OVERRIDES[@]}"
star_finish_or_requeue $?
