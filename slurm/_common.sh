# shellcheck shell=bash
# Shared by the STAR sbatch launchers (sourced, never run). It owns the three things every
# launcher must get right on a cluster that preempts and time-limits jobs:
#   1. the environment: repository root, virtualenv, trainer command, rendezvous address;
#   2. the signal path: SLURM signals only the batch shell (`--signal=B:USR1@secs`), so the
#      tasks run under `srun ... &` + `wait` and a trap forwards the signal to them;
#   3. the exit-code contract of `star pretrain` / `star finetune`:
#        0  finished            -> the job ends;
#        75 stopped early       -> `scontrol requeue` (the job keeps its id and RUN_DIR and
#                                  resumes from the newest checkpoint), up to MAX_RESTARTS;
#        anything else: failure -> the job ends with that code, never requeued.
#
# Environment read here (all optional):
#   STAR_ROOT     repository root (default: the sbatch submit directory)
#   STAR_VENV     virtualenv to activate (default: $STAR_ROOT/.venv when it exists)
#   STAR_CMD      trainer command (default: `star`, else `python -m star`)
#   MAX_RESTARTS  requeue cap (default 50): a job restarted this many times is not requeued again
#   DOCTOR        1 (default): run `star doctor` on every task before training, on every start;
#                 0: skip it. A failing doctor ends the job with its exit code, never requeued.
#   KERNELS       model.kernels for training and the doctor: fused (default where nvidia-smi is
#                 found: refuse to train on the slow PyTorch scan), auto (fused when available,
#                 else PyTorch, said in the log) or torch. Without a GPU the default is auto.

STAR_EXIT_RESUME=75          # "stopped early, resume me" (star/train contract)
STAR_DATA_KEY=data.dir       # the config key that DATA_DIR sets
STAR_SIGNAL=""               # the signal the batch shell received, if any (USR1 / TERM)
STAR_SIGNAL_COUNT=0          # signals received so far (tells an interrupted `wait` from a real exit)
STAR_STEP_PID=""             # pid of the running `srun`

star_log() { printf '[star-slurm %s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }

star_die() {
    star_log "error: $*" >&2
    exit 2
}

# Sets STAR_ROOT and STAR_CMD (an array), cds to the repository root and activates the
# virtualenv. Needs no SLURM: usable by any script that runs `star`.
star_env() {
    STAR_ROOT=${STAR_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
    [[ -f $STAR_ROOT/slurm/_common.sh ]] \
        || star_die "STAR_ROOT=$STAR_ROOT is not the STAR repository: submit from the repository root or set STAR_ROOT"
    cd "$STAR_ROOT" || star_die "cannot cd to STAR_ROOT=$STAR_ROOT"

    local venv=${STAR_VENV:-$STAR_ROOT/.venv}
    if [[ -z ${VIRTUAL_ENV:-} && -f $venv/bin/activate ]]; then
        # shellcheck disable=SC1091
        source "$venv/bin/activate"
    fi
    if [[ -n ${STAR_CMD:-} ]]; then
        read -r -a STAR_CMD <<<"$STAR_CMD"
    elif command -v star >/dev/null 2>&1; then
        STAR_CMD=(star)
    else
        STAR_CMD=(python -m star)
    fi
}

# star_env, then MASTER_ADDR, MASTER_PORT, DS_ACCELERATOR, the traps, and the job header.
star_setup() {
    [[ -n ${SLURM_JOB_ID:-} ]] || star_die "SLURM_JOB_ID is not set: submit this script with sbatch"
    MAX_RESTARTS=${MAX_RESTARTS:-50}
    [[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || star_die "MAX_RESTARTS=$MAX_RESTARTS is not a whole number of restarts"
    star_env

    # The rendezvous every task would derive on its own (star/train): the first host of the
    # allocation, a port from the job id. Always derived: sbatch exports the submitting shell's
    # environment, and a stale MASTER_ADDR from an interactive session must not win.
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
    export MASTER_ADDR MASTER_PORT
    # Rank variables left by a torchrun session in the submitting shell would override SLURM's
    # task layout in every task (star/train/distributed.py refuses a set that disagrees).
    local stale=()
    for var in RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK; do
        [[ -n ${!var+x} ]] && stale+=("$var=${!var}")
        unset "$var"
    done
    ((${#stale[@]})) && star_log "ignoring ${stale[*]} inherited from the submitting shell"
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}   # no GPU visible: DeepSpeed on CPU + gloo
    fi
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}
    fi

    trap '_star_on_signal USR1' USR1
    trap '_star_on_signal TERM' TERM

    star_log "job ${SLURM_JOB_NAME:-?} id $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} (cap $MAX_RESTARTS)"
    star_log "nodes ${SLURM_JOB_NUM_NODES:-1} (${SLURM_JOB_NODELIST}) tasks ${SLURM_NTASKS:-1} cpus/task ${SLURM_CPUS_PER_TASK:-?}"
    star_log "root $STAR_ROOT  trainer '${STAR_CMD[*]}'  rendezvous $MASTER_ADDR:$MASTER_PORT${DS_ACCELERATOR:+  DS_ACCELERATOR=$DS_ACCELERATOR}"
}

# star_collect_overrides ARGS...: STAR_OVERRIDES = config overrides in the order they apply
# (later wins): data.dir from DATA_DIR, the words of EXTRA, then the script's arguments.
star_collect_overrides() {
    local extra=()
    read -r -a extra <<<"${EXTRA:-}"
    STAR_OVERRIDES=()
    [[ -n ${DATA_DIR:-} ]] && STAR_OVERRIDES+=("$STAR_DATA_KEY=$DATA_DIR")
    STAR_OVERRIDES+=("${extra[@]}" "$@")
}

# star_kernels_override: prepends model.kernels=$KERNELS to STAR_OVERRIDES (EXTRA and the
# script's arguments come later, so they still win). Call after star_collect_overrides.
star_kernels_override() {
    local default=auto
    command -v nvidia-smi >/dev/null 2>&1 && default=fused
    STAR_KERNELS=${KERNELS:-$default}
    [[ $STAR_KERNELS =~ ^(auto|fused|torch)$ ]] \
        || star_die "KERNELS=$STAR_KERNELS: use fused (refuse the slow path), auto or torch"
    STAR_OVERRIDES=("model.kernels=$STAR_KERNELS" "${STAR_OVERRIDES[@]}")
}

# star_doctor ARGS...: `star doctor ARGS` on every task (one srun), unless DOCTOR=0. Returns
# when it passes; a failure ends the job with the doctor's exit code and no requeue (a broken
# node or install does not heal by restarting). A USR1/TERM during the check goes through the
# normal contract (requeue / not), as a training step would.
star_doctor() {
    if [[ ${DOCTOR:-1} == 0 ]]; then
        star_log "DOCTOR=0: skipping star doctor"
        return 0
    fi
    local device=cpu
    command -v nvidia-smi >/dev/null 2>&1 && device=cuda
    star_srun "${STAR_CMD[@]}" doctor --device "$device" "$@"
    local rc=$?
    ((rc == 0)) && return 0
    if [[ -n $STAR_SIGNAL ]]; then
        star_finish_or_requeue "$STAR_EXIT_RESUME"
    fi
    star_log "star doctor FAILED (exit $rc): not starting training and not requeueing; its table above names" \
        "each failing check and rank (DOCTOR=0 skips the check, KERNELS=auto allows the slow kernel path)"
    exit "$rc"
}

# USR1 (time limit ahead, or a preemption notice) asks every task to checkpoint and exit 75.
# TERM means SLURM itself is ending the job (scancel, preemption, time limit): it signals the
# tasks on its own; we only remember it, so the job is not requeued behind a user's scancel.
# Never send TERM to srun: srun answers it by killing the step outright.
_star_on_signal() {
    STAR_SIGNAL_COUNT=$((STAR_SIGNAL_COUNT + 1))
    [[ $STAR_SIGNAL == TERM ]] || STAR_SIGNAL=$1
    if [[ $1 == USR1 && -n $STAR_STEP_PID ]]; then
        star_log "received SIGUSR1: asking all tasks to checkpoint and stop"
        kill -USR1 "$STAR_STEP_PID" 2>/dev/null || true   # srun forwards it to every task
    else
        star_log "received SIG$1"
    fi
}

# star_srun CMD...: one task per allocated slot, in the background so the traps can run;
# returns the step's exit code. A USR1 that arrived before the step started skips it (75).
star_srun() {
    if [[ -n $STAR_SIGNAL ]]; then
        star_log "stop requested before launch: not starting '$*'"
        return "$STAR_EXIT_RESUME"
    fi
    local cpus=()
    # srun stopped inheriting --cpus-per-task from sbatch in SLURM 23.11: pass it on explicitly.
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && cpus=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    star_log "srun: $*"
    # --kill-on-bad-exit=0: ranks exit 75 one by one after a coordinated save; killing the
    # stragglers on the first non-zero exit could cut rank 0 while it commits the checkpoint.
    srun --kill-on-bad-exit=0 "${cpus[@]}" "$@" &
    STAR_STEP_PID=$!
    local rc seen
    while :; do
        seen=$STAR_SIGNAL_COUNT
        wait "$STAR_STEP_PID"
        rc=$?
        # A trap interrupts `wait` with 128+signal while the step keeps running: wait again
        # (bash keeps the step's status, so a second wait after a real exit returns it too).
        ((rc > 128 && STAR_SIGNAL_COUNT != seen)) || break
    done
    STAR_STEP_PID=""
    return "$rc"
}

# star_finish_or_requeue RC: ends the batch script according to the exit-code contract.
star_finish_or_requeue() {
    local rc=$1 restarts=${SLURM_RESTART_COUNT:-0} cap=$MAX_RESTARTS
    if ((rc == 0)); then
        star_log "finished (exit 0) after $restarts restart(s)"
        exit 0
    fi
    if ((rc == 128 + $(kill -l USR1))) && [[ $STAR_SIGNAL == USR1 ]]; then
        # The forwarded USR1 reached a task before it installed its handler (still starting):
        # its newest complete checkpoint is intact, so resuming from it is still right.
        star_log "a task died of the forwarded SIGUSR1 before handling it (exit $rc): resuming from its last complete checkpoint"
        rc=$STAR_EXIT_RESUME
    fi
    if ((rc != STAR_EXIT_RESUME)); then
        star_log "FAILED with exit code $rc: not requeueing (fix the cause, then resubmit with the same RUN_DIR to resume)"
        exit "$rc"
    fi
    if [[ $STAR_SIGNAL == TERM ]]; then
        star_log "checkpointed after SIGTERM: SLURM is ending this job (scancel, preemption or time limit), not requeueing from here"
        exit "$rc"
    fi
    if ((restarts >= cap)); then
        star_log "checkpointed, but the job already restarted $restarts time(s) (MAX_RESTARTS=$cap): not requeueing; resubmit with the same RUN_DIR to continue"
        exit "$rc"
    fi
    star_log "checkpointed (exit $rc): requeueing job $SLURM_JOB_ID as restart $((restarts + 1)) of at most $cap"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        star_log "scontrol requeue failed: resubmit with the same RUN_DIR to continue"
        exit "$rc"
    fi
    exit 0   # SLURM now ends this instance and starts the requeued one
}
