# Sourced by every slurm/*.sh: locate the checkout, pick the interpreter, run one task per GPU with srun, and turn
# the trainer's "pre-empted, checkpoint saved" exit into a requeue of the same job.
#
# Environment knobs (all optional; set them in front of `sbatch`, which exports the submitting environment):
#   CONFIG          YAML config, relative to the checkout (each script names its own default)
#   RUN_DIR         output directory; default runs/<job name>-<job id>. The job id survives `scontrol requeue`,
#                   so a requeued job finds its own checkpoints there and `--resume auto` continues from them.
#   SET             extra space-separated key=value config overrides, e.g. SET="optim.lr=2e-4 train.max_steps=500"
#   PYTHON          interpreter; default .venv/bin/python when present, else python
#   MONA_DIST_ROOT  the checkout; default the directory sbatch was called from (SLURM copies the batch script to
#                   its spool directory, so the script's own path does not lead back here)
#   OMP_NUM_THREADS default SLURM_CPUS_PER_TASK (1 outside SLURM)
#
# Pre-emption, end to end:
#   1. `#SBATCH --signal=USR1@120` (no `B:`) makes slurmctld send SIGUSR1 to the tasks of every job step, i.e. to
#      the srun'd trainers, 120 s before the time limit. `scancel --signal=USR1 <jobid>` does the same by hand
#      (steps only; `--full` or `--batch` would also/only hit this shell). With `--signal=B:USR1@...` only this
#      shell is signalled; it then forwards USR1 to srun, which relays it to the tasks, so both forms work.
#   2. The trainer saves `$RUN_DIR/checkpoints/latest` and every rank exits 75 (EX_TEMPFAIL).
#   3. srun returns 75 (the highest exit code of its tasks); this shell runs `scontrol requeue $SLURM_JOB_ID`
#      (needs `--requeue`). SLURM puts the job
#      back in the queue under the same id with SLURM_RESTART_COUNT incremented; `--open-mode=append` keeps the
#      first run's log lines in the same output file.
#   4. The requeued job runs the same command; `--resume auto` picks up the checkpoint.
# A failing rank ends the step: srun runs with `--kill-on-bad-exit=1`, so when one task exits non-zero (an error,
# a crash) srun terminates the others at once instead of leaving them blocked in a collective with the dead rank
# until the process-group timeout (NCCL does not notice a peer's death; 30 min of every GPU of the job). The
# status is then the failing task's (or 128+signal), never 75: no requeue. Exit 75 is non-zero too, so on a
# pre-emption srun SIGTERMs the ranks still exiting after the first: the trainer ignores pre-emption signals once
# its checkpoint is saved, before the barrier that every rank passes before any exits, so they all still exit 75.
# GPUs: the scripts ask `#SBATCH --gpus-per-task=1`, so every task (rank) sees exactly its own GPU (as cuda:0; mona-dist
# exports LOCAL_RANK=0 for DeepSpeed accordingly). On CPU-only nodes pass `--gpus-per-task=0`.
# SIGTERM (cancellation, the time limit, pre-emption by SLURM itself) reaches every process of the step directly:
# the trainers save at their next step boundary and exit 75; their DataLoader workers ignore it and end with them.
# The trainers have KillWait seconds (slurm.conf, often 30) before SIGKILL. A signal sent to this shell alone
# (`--signal=B:TERM@...`, `scancel --batch --signal=TERM|USR1`) is forwarded to srun, the one process that relays
# signals to every task of the step on every node; signalling a task's own children (its workers, or under a
# `deepspeed` runner the runner itself) would reach only part of a rank, or nothing that relays it.

set -euo pipefail

readonly EX_TEMPFAIL=75

MONA_DIST_ROOT=${MONA_DIST_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
cd "$MONA_DIST_ROOT"

if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# Slurm 22.05 stopped srun inheriting --cpus-per-task from sbatch (it reads SRUN_CPUS_PER_TASK instead): without
# this a rank's step has one CPU per task, and where tasks are bound to their CPUs (task/affinity or cgroups with
# --exact, which later releases imply) the rank and its loader workers share one core.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}; fi
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-mona}-${SLURM_JOB_ID:-local}}

mona_log() { echo "[$(date +%FT%T)] [slurm ${SLURM_JOB_ID:-local}.${SLURM_RESTART_COUNT:-0}] $*"; }

# mona_srun CMD...: `srun CMD` (one task per allocated task slot, i.e. per GPU), waiting through trapped signals.
# Exit 75 from the tasks requeues this job; any other status becomes this script's status.
mona_srun() {
    local pid status
    mona_log "nodes=${SLURM_JOB_NODELIST:-?} ntasks=${SLURM_NTASKS:-?} restart=${SLURM_RESTART_COUNT:-0}: $*"
    srun --kill-on-bad-exit=1 "$@" &
    pid=$!
    trap 'mona_log "batch shell got SIGTERM; forwarding to srun"; kill -TERM "$pid" 2>/dev/null || true' TERM
    trap 'mona_log "batch shell got SIGUSR1; forwarding to srun"; kill -USR1 "$pid" 2>/dev/null || true' USR1
    while :; do
        status=0
        wait "$pid" || status=$?
        # A trapped signal interrupts `wait` with 128+signo while srun keeps running: wait again.
        kill -0 "$pid" 2>/dev/null || break
    done
    # srun may have finished during the handler; bash keeps a reaped child's status for a later `wait`.
    wait "$pid" 2>/dev/null && status=0 || status=$?
    trap - TERM USR1
    if [[ $status -eq $EX_TEMPFAIL && -n ${SLURM_JOB_ID:-} ]]; then
        mona_log "tasks exited $EX_TEMPFAIL (checkpoint saved after a pre-emption signal): requeueing"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0  # SLURM ends this run now; the requeued one starts from the same RUN_DIR
        fi
        mona_log "scontrol requeue failed (job submitted with --no-requeue?)"
    fi
    mona_log "srun exited with status $status"
    exit "$status"
}

# mona_train DEFAULT_CONFIG: the training command, one rank per task; ranks come from SLURM via mona_dist.distributed.
# Each SET item becomes its own `--set key=value` (the train CLI takes one pair per flag).
mona_train() {
    local config=${CONFIG:-$1} item items=() sets=(--set "output_dir=$RUN_DIR")
    read -r -a items <<< "${SET:-}"  # split on spaces without glob expansion ("x=[1,2]" stays as written)
    for item in "${items[@]}"; do sets+=(--set "$item"); done
    mona_srun "$PYTHON" -m mona_dist.cli train --config "$config" "${sets[@]}" --resume auto
}

# mona_bench DEFAULT_ARGS: `mona-dist bench` with BENCH_ARGS (space-separated) or the script's defaults.
mona_bench() {
    local args=()
    read -r -a args <<< "${BENCH_ARGS:-$1}"
    mona_srun "$PYTHON" -m mona_dist.cli bench --out "$RUN_DIR" "${args[@]}"
}
