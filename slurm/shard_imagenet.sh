#!/bin/bash
# One-time job: shard ImageNet into globally shuffled WebDataset tars + DALI indexes (train,
# then val), then re-hash and check everything with `star verify`.
#
#   mkdir -p logs && SRC=/datasets/imagenet OUT=/shared/imagenet-shards sbatch slurm/shard_imagenet.sh
#
# Why one node with many CPU workers: the work is per file (read, check the JPEG, copy it into a
# tar, hash) and needs no GPU; with 32 cores on ImageNet's 1.28M files (about 140 GB) the
# filesystem, not the CPUs, is usually the limit, so more nodes would mostly add contention
# (bench/bench_shard.py measures the rate against plain `tar` on your disk). The output does not depend on
# WORKERS, so any core count gives the same shards.
# Interrupt-safe: `star shard` writes each shard under a temporary name and records it when
# complete, so a rerun or a requeue of this job keeps every complete shard it can verify and
# writes only the rest, ending with exactly the output of an uninterrupted run.
#
# Environment (all optional except where noted):
#   SRC             ImageNet root holding train/<wnid>/*.JPEG and val/ (default /datasets/imagenet)
#   OUT             output folder on storage every training node can read (default $STAR_ROOT/data/imagenet_shards)
#   WORKERS         parallel processes (default: the CPUs SLURM gave this task)
#   SHARD_BYTES     bytes per shard (default 1e9, about 8,600 images)
#   SEED            shuffle seed (default 0)
#   VAL_LABELS      labels of a flat val/ folder: LOC_val_solution.csv, or the devkit's
#                   ILSVRC2012_validation_ground_truth.txt (then also DEVKIT_SYNSETS: wnids in devkit
#                   ID order). Leave unset when val/ is already sorted into val/<wnid>/ folders.
#   DEVKIT_SYNSETS  see VAL_LABELS
#   CHECK           decode (default, thorough) or markers (header and end-marker check only, faster)
#   STAR_ROOT, STAR_VENV, STAR_CMD  repository root, virtualenv, command (as in the other launchers)
#SBATCH --job-name=star-shard
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --mem=64G
#SBATCH --time=06:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
##SBATCH --partition=cpu
##SBATCH --account=my-project

set -euo pipefail
STAR_ROOT=${STAR_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/_common.sh
source "$STAR_ROOT/slurm/_common.sh" \
    || { echo "cannot source $STAR_ROOT/slurm/_common.sh: submit from the repository root or set STAR_ROOT" >&2; exit 2; }
star_env   # repository root, virtualenv, STAR_CMD; no requeue logic: a rerun resumes by itself
log() { star_log "$@"; }
die() { star_die "$@"; }

SRC=${SRC:-/datasets/imagenet}
OUT=${OUT:-$STAR_ROOT/data/imagenet_shards}
WORKERS=${WORKERS:-${SLURM_CPUS_PER_TASK:-$(nproc)}}
SHARD_BYTES=${SHARD_BYTES:-1000000000}
SEED=${SEED:-0}
CHECK=${CHECK:-decode}
[[ -d $SRC/train ]] || die "SRC=$SRC has no train/ folder (expected SRC/train/<wnid>/*.JPEG)"
[[ -d $SRC/val ]] || die "SRC=$SRC has no val/ folder"
[[ $WORKERS =~ ^[1-9][0-9]*$ ]] || die "WORKERS=$WORKERS is not a positive whole number"

common=(--out "$OUT" --workers "$WORKERS" --shard-bytes "$SHARD_BYTES" --seed "$SEED" --check "$CHECK")
val_args=()
if [[ -n ${VAL_LABELS:-} ]]; then
    val_args=(--val-labels "$VAL_LABELS" ${DEVKIT_SYNSETS:+--devkit-synsets "$DEVKIT_SYNSETS"})
fi

log "job ${SLURM_JOB_ID:-none} on $(hostname): SRC=$SRC OUT=$OUT WORKERS=$WORKERS SHARD_BYTES=$SHARD_BYTES SEED=$SEED CHECK=$CHECK"
log "train"
"${STAR_CMD[@]}" shard --src "$SRC/train" --split train "${common[@]}"
log "val"
"${STAR_CMD[@]}" shard --src "$SRC/val" --split val "${common[@]}" "${val_args[@]}"
log "verify"
"${STAR_CMD[@]}" verify "$OUT" --workers "$WORKERS"
log "done: $OUT"
