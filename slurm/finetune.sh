#!/bin/bash
# Fine-tunes the 4-scan MambaMLP-B classifier from pretrained weights (config preset
# finetune_b: 1024 images per step = 128 per GPU on 8 GPUs, 100 epochs, EMA), then evaluates
# the final weights and their EMA with `star eval` (top-1 / top-5). Preemption and time limits are handled like
# pretraining: checkpoint, exit 75, requeue under the same id and RUN_DIR, resume.
#
#   INIT=runs/star-b-1600ep-123456 sbatch slurm/finetune.sh          # from the repository root
#   INIT=checkpoint-1599.pth CONFIG=finetune_l sbatch slurm/finetune.sh
#
# Environment: INIT (required: a pretraining run dir, a `star export` file or an ARM
# checkpoint), CONFIG (default finetune_b), DATA_DIR (shard directory with train and val),
# RUN_DIR (default runs/<job name>-<job id>), EXTRA ("key=value ..." config overrides; script
# arguments are appended to them), MAX_RESTARTS, DOCTOR (0: skip `star doctor` before training),
# KERNELS (model.kernels, default fused on GPUs; auto allows the slow path), STAR_ROOT,
# STAR_VENV, STAR_CMD (slurm/_common.sh).
#SBATCH --job-name=star-finetune
#SBATCH --nodes=1
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

[[ -n ${INIT:-} ]] || star_die "INIT is not set: give the pretrained weights, e.g. INIT=runs/star-b-1600ep-123456 sbatch slurm/finetune.sh"
CONFIG=${CONFIG:-finetune_b}
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
star_collect_overrides "$@"
star_kernels_override
mkdir -p "$RUN_DIR"
star_log "config $CONFIG  init $INIT  run dir $RUN_DIR  overrides: ${STAR_OVERRIDES[*]:-(none)}"

doctor_args=(--config "$CONFIG" --json "$RUN_DIR/doctor.json")
[[ -n ${DATA_DIR:-} ]] && doctor_args+=(--data "$DATA_DIR")
star_doctor "${doctor_args[@]}" "${STAR_OVERRIDES[@]}"

star_srun "${STAR_CMD[@]}" finetune --config "$CONFIG" --init "$INIT" --run-dir "$RUN_DIR" "${STAR_OVERRIDES[@]}"
rc=$?
((rc == 0)) || star_finish_or_requeue "$rc"   # stopped (requeue) or failed: no evaluation yet

# Evaluate the final weights (and the EMA's when the run keeps one) on the shards the run
# was tuned on, as recorded in its config.yaml; results also go to RUN_DIR/eval*.json.
IFS=$'\t' read -r eval_data ema < <(python -c 'import sys, yaml
c = yaml.safe_load(open(sys.argv[1]))
print(c["data"]["dir"], c["ema"]["enabled"], sep="\t")' "$RUN_DIR/config.yaml") \
    || star_die "cannot read data.dir / ema.enabled from $RUN_DIR/config.yaml"
star_srun "${STAR_CMD[@]}" eval --ckpt "$RUN_DIR" --data "$eval_data" --json "$RUN_DIR/eval.json"
rc=$?
if ((rc == 0)) && [[ $ema == True ]]; then
    star_srun "${STAR_CMD[@]}" eval --ckpt "$RUN_DIR" --data "$eval_data" --ema --json "$RUN_DIR/eval_ema.json"
    rc=$?
fi
star_finish_or_requeue "$rc"
