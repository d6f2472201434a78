# shellcheck shell=bash
# fewstep: shared Slurm launch logic, sourced by slurm/*.sbatch (not meant to be run on its own).
#
#   fewstep_launch SCRIPT [ARGS...]
#
# starts one task per GPU with srun (RANK/LOCAL_RANK from SLURM_PROCID/SLURM_LOCALID, WORLD_SIZE=$SLURM_NTASKS,
# MASTER_ADDR = first node of the job, MASTER_PORT derived from the job id), forwards USR1/TERM from the batch shell
# to the tasks (as USR1: srun answers a TERM of its own by SIGKILLing every task), waits for them, and then requeues
# the job (`scontrol requeue`) if they stopped for it with a checkpoint written (exit status 75), unless Slurm itself
# is ending it (scancel, time limit: no requeue). The requeued job restarts with the same job id, environment and
# arguments, so the same output directory and `--resume_from_checkpoint latest` continue the run.
#
# Knobs (environment variables, set before `sbatch` or in the EDIT block below; jobs inherit the submitter's
# environment, also across requeues):
#   FEWSTEP_ROOT    the fewstep checkout; default: the directory sbatch was run from ($SLURM_SUBMIT_DIR)
#   FEWSTEP_PYTHON  the Python interpreter; default: python
#   FEWSTEP_GPUS_PER_NODE  GPUs per node, where Slurm does not count them (nodes without a GPU GRES in slurm.conf,
#                   whole-node allocations): default $SLURM_GPUS_ON_NODE, set from '#SBATCH --gpus-per-node'
#   FEWSTEP_MAX_REQUEUES  requeues after which a preempted job ends instead (default 50: a run that cannot make
#                   progress in a slot, such as one whose load outlasts it, does not cycle for ever)
#   FEWSTEP_CPU=1   CPU test mode: gloo instead of NCCL (DS_ACCELERATOR=cpu), OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK,
#                   and the job step gets no GPU GRES (srun --gpus-per-node=0 if the job has GPUs; submit with
#                   `sbatch --gpus-per-node=0` on a CPU-only cluster). The same sbatch scripts run unchanged.

# ==== EDIT: software environment (runs in the batch shell; the tasks inherit it) =================================
# module load cuda/12.4
# source /path/to/venv/bin/activate                     # or: conda activate fewstep
# ==== END EDIT ====================================================================================================

# ---- NCCL (GPU runs; ignored by gloo in CPU mode) ----------------------------------------------------------------
# A failed or timed-out collective ends the process instead of hanging the whole job until its time limit (torch's
# default since 2.2, TORCH_NCCL_ASYNC_ERROR_HANDLING=3: no communicator abort first, which can itself hang); with
# srun --kill-on-bad-exit=1 the other ranks are then stopped too. Leave it unset.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"                 # INFO prints the chosen transports/rings: use it to debug
# If NCCL picks the wrong network interface (hangs at the first collective, or "no socket interface found"),
# name the right one (`ip addr` on a compute node), e.g. InfiniBand IPoIB or the cluster Ethernet:
# export NCCL_SOCKET_IFNAME=ib0                         # or exclude: ^lo,docker0
# export NCCL_IB_HCA=mlx5                               # restrict to these InfiniBand adapters
export PYTHONUNBUFFERED=1                               # log lines reach %x-%j.out as they happen

# ---- internals ---------------------------------------------------------------------------------------------------
FEWSTEP_SIGNAL=""      # the signal the batch shell received (USR1 or TERM), empty if none
# The exit status of a trainer that stopped for a preemption signal with its checkpoint written (launcher/train.py
# reads it): the one status that requeues the job. EX_TEMPFAIL, not 0: a run that finished is not requeued.
export FEWSTEP_PREEMPTED_EXIT=75
FEWSTEP_STEP_PID=""    # PID of the srun that runs the tasks

_fewstep_die() {
    echo "fewstep-slurm: error: $*" >&2
    exit 2
}

_fewstep_on_signal() {
    # Runs in the batch shell. Remember the signal and pass USR1 on to srun, which forwards it to every task: the
    # trainer finishes its optimizer step, all ranks save a checkpoint together, and the tasks exit 75
    # (FEWSTEP_PREEMPTED_EXIT). Never TERM:
    # srun itself takes a TERM as "forcing job termination" and SIGKILLs the tasks, with no checkpoint.
    FEWSTEP_SIGNAL=$1
    echo "fewstep-slurm: batch shell got SIG$1 at $(date '+%F %T'); forwarding USR1 to the job step" >&2
    if [ -n "$FEWSTEP_STEP_PID" ]; then
        kill -s USR1 "$FEWSTEP_STEP_PID" 2>/dev/null || true
    fi
}

# _fewstep_resume_hint ARGS...: how to resume the run in a new job, for a job ending without finishing or a requeue
# (a new job gets a new id, and the default output directory follows the id).
_fewstep_resume_hint() {
    local prev="" a dir="" config=""
    for a in "$@"; do  # the last one given is the one the trainer uses
        if [ "$prev" = --output_dir ]; then dir=$a; fi
        if [ "$prev" = --config ]; then config=$a; fi
        case $a in --output_dir=*) dir=${a#--output_dir=} ;; --config=*) config=${a#--config=} ;; esac
        prev=$a
    done
    # only where the run saved a checkpoint (a job that failed before, e.g. on a config mistake, has nothing to resume)
    if [ -n "$dir" ] && [ -e "$dir/checkpoints/latest" ]; then
        echo "fewstep-slurm: to resume this run in a new job: FEWSTEP_OUTPUT_DIR='$(realpath -m -- "$dir")'" \
             "${config:+FEWSTEP_CONFIG='$(realpath -m -- "$config")' }sbatch <the same script and arguments>" >&2
    fi
}

# fewstep_setup: validate the allocation and export the rendezvous variables; cd to the checkout.
fewstep_setup() {
    [ -n "${SLURM_JOB_ID:-}" ] || _fewstep_die "not inside a Slurm job: submit with sbatch (SLURM_JOB_ID is unset)"
    [ -n "${SLURM_NTASKS:-}" ] || _fewstep_die "SLURM_NTASKS is unset: set '#SBATCH --ntasks-per-node' (one task per GPU)"
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] || _fewstep_die "SLURM_CPUS_PER_TASK is unset: set '#SBATCH --cpus-per-task'"
    [[ ${FEWSTEP_MAX_REQUEUES:-50} =~ ^[0-9]+$ ]] ||
        _fewstep_die "FEWSTEP_MAX_REQUEUES='$FEWSTEP_MAX_REQUEUES': expected a number of requeues"
    FEWSTEP_ROOT="${FEWSTEP_ROOT:-$SLURM_SUBMIT_DIR}"
    [ -f "$FEWSTEP_ROOT/slurm/common.sh" ] ||
        _fewstep_die "FEWSTEP_ROOT='$FEWSTEP_ROOT' is not a fewstep checkout: submit from the repository root or set FEWSTEP_ROOT"
    cd "$FEWSTEP_ROOT" || _fewstep_die "cannot cd to FEWSTEP_ROOT='$FEWSTEP_ROOT'"
    export FEWSTEP_ROOT

    # Each task's CPU threads (data loading, DeepSpeedCPUAdam under offload_optimizer): its own CPUs, not every core
    # of the node once per task where the site does not bind tasks to cores.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}"
    if [ "${FEWSTEP_CPU:-0}" = 1 ]; then
        export DS_ACCELERATOR=cpu                    # DeepSpeed's CPU accelerator: gloo, no CUDA
        FEWSTEP_GRES_OPT=()
        if [ "${SLURM_GPUS_ON_NODE:-0}" != 0 ]; then
            FEWSTEP_GRES_OPT=(--gpus-per-node=0)     # the job has GPUs: the step gets none (22.05 rejects --gres=none)
        fi
    else
        FEWSTEP_GRES_OPT=()
        # One task per GPU; each task sees all GPUs of its node and the trainer picks cuda:$LOCAL_RANK.
        local gpus="${FEWSTEP_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}" tpn="${SLURM_NTASKS_PER_NODE:-}"
        [[ $gpus =~ ^[0-9]+$ ]] || _fewstep_die "FEWSTEP_GPUS_PER_NODE='$gpus': expected a number of GPUs"
        [ "$gpus" -gt 0 ] ||
            _fewstep_die "no GPUs in this job (SLURM_GPUS_ON_NODE=${SLURM_GPUS_ON_NODE:-unset}): set '#SBATCH --gpus-per-node' (or FEWSTEP_GPUS_PER_NODE where the nodes' GPUs are not Slurm resources), or FEWSTEP_CPU=1 for CPU test mode"
        [ -z "$tpn" ] || [ "${tpn%%(*}" = "$gpus" ] ||
            _fewstep_die "--ntasks-per-node=$tpn but --gpus-per-node=$gpus: expected one task per GPU (make them equal)"
    fi

    # Rank 0 runs on the first node of the allocation; the port is fixed per job id, so a requeued run (same id)
    # uses the same one and concurrent jobs on a shared node do not collide. 10000-29999: below Linux's ephemeral
    # ports (32768-60999), which any outgoing connection on the node (NCCL's, another job's) may hold. A single
    # task hosts its own store and binds any free port (0).
    local nodes
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    [ "${#nodes[@]}" -gt 0 ] || _fewstep_die "could not expand SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'"
    # Its NodeAddr: the address Slurm itself reaches it at (the node name where the site sets none; a name that only
    # slurm.conf knows would not resolve for the other ranks).
    local addr=""
    [[ $(scontrol show node -o "${nodes[0]}" 2>/dev/null) =~ NodeAddr=([^[:space:]]+) ]] && addr=${BASH_REMATCH[1]}
    export MASTER_ADDR="${addr:-${nodes[0]}}"
    export MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))
    if [ "$SLURM_NTASKS" = 1 ]; then MASTER_PORT=0; fi
    export WORLD_SIZE="$SLURM_NTASKS"
    echo "fewstep-slurm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}:" \
         "$WORLD_SIZE tasks, master $MASTER_ADDR:$MASTER_PORT, cpu mode ${FEWSTEP_CPU:-0}, root $FEWSTEP_ROOT" >&2
}

# fewstep_launch SCRIPT [ARGS...]: run `python SCRIPT ARGS...` as one task per GPU; see the header of this file.
fewstep_launch() {
    [ $# -ge 1 ] || _fewstep_die "fewstep_launch needs a script to run"
    fewstep_setup
    [ -f "$1" ] || _fewstep_die "'$1' not found under FEWSTEP_ROOT='$FEWSTEP_ROOT'"
    # Traps first, so a signal that arrives before srun is up is not lost (bash's default for USR1 is to exit).
    trap '_fewstep_on_signal USR1' USR1
    trap '_fewstep_on_signal TERM' TERM

    # `bash -c` runs in each task: $SLURM_PROCID/$SLURM_LOCALID must expand there, hence the single quotes.
    # srun in the background: bash runs traps only between commands, and `wait` is interruptible, a foreground
    # srun is not.
    # shellcheck disable=SC2016
    # --export=ALL: the tasks get this shell's environment (rendezvous, NCCL, venv PATH) also where the site submits
    # with --export=NONE. ${a[@]+"${a[@]}"}: an empty array under `set -u` is "unbound" in bash < 4.4 (RHEL 7).
    srun --export=ALL --kill-on-bad-exit=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" \
        ${FEWSTEP_GRES_OPT[@]+"${FEWSTEP_GRES_OPT[@]}"} \
        bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID; exec "$@"' fewstep-task \
        "${FEWSTEP_PYTHON:-python}" "$@" &
    FEWSTEP_STEP_PID=$!
    if [ -n "$FEWSTEP_SIGNAL" ]; then     # signalled while srun was being started
        kill -s USR1 "$FEWSTEP_STEP_PID" 2>/dev/null || true
    fi

    # `wait` returns early (status > 128) when a trapped signal arrives; wait again until srun itself has exited.
    local rc seen
    while :; do
        seen=$FEWSTEP_SIGNAL
        rc=0
        wait "$FEWSTEP_STEP_PID" || rc=$?
        if [ "$seen" = "$FEWSTEP_SIGNAL" ] && ! kill -0 "$FEWSTEP_STEP_PID" 2>/dev/null; then
            break
        fi
    done
    trap '' USR1 TERM    # the step is over: a late signal must not kill this shell and fail a finished job

    if [ -z "$FEWSTEP_SIGNAL" ] && [ "$rc" != "$FEWSTEP_PREEMPTED_EXIT" ]; then
        echo "fewstep-slurm: job step finished with exit code $rc" >&2
        [ "$rc" = 0 ] || _fewstep_resume_hint "$@"
        return "$rc"
    fi
    # A signal while the job is still RUNNING (USR1 from --signal=B:USR1@..., or `scancel --signal=...`; or one sent
    # to the tasks alone): the trainer checkpoints and exits $FEWSTEP_PREEMPTED_EXIT, and only then is the job
    # requeued. Exit 0 is a run that finished anyway; any other status a failure a requeue would repeat (a
    # checkpoint that cannot be written: the next slot trains from the same checkpoint to the same failure).
    local why=${FEWSTEP_SIGNAL:+SIG$FEWSTEP_SIGNAL}
    why=${why:-a signal to the tasks}
    if [ "$rc" = 0 ]; then
        echo "fewstep-slurm: job step finished (exit code 0) after $why: nothing to requeue" >&2
        return 0
    fi
    if [ "$rc" != "$FEWSTEP_PREEMPTED_EXIT" ]; then
        echo "fewstep-slurm: job step failed with exit code $rc after $why; not requeueing (the requeued run would" \
             "fail the same way: see the error above)" >&2
        _fewstep_resume_hint "$@"
        return "$rc"
    fi
    local restarts=${SLURM_RESTART_COUNT:-0} most=${FEWSTEP_MAX_REQUEUES:-50}
    if [ "$restarts" -ge "$most" ]; then
        echo "fewstep-slurm: job $SLURM_JOB_ID was requeued $restarts times already (FEWSTEP_MAX_REQUEUES=$most);" \
             "not requeueing" >&2
        _fewstep_resume_hint "$@"
        return 1
    fi
    # If Slurm itself is ending the job (scancel, time limit, preemption: TERM, then KILL after KillWait) its state
    # is already COMPLETING and `scontrol requeue` would still succeed, turning every scancel into a restart: leave
    # it ended (a preempted --requeue job is requeued by Slurm itself under PreemptMode=REQUEUE).
    # A busy controller may not answer at once: ask again (2+4+8+16 s) before giving up. Without an answer the job
    # is neither requeued (it may be a cancel) nor left COMPLETED: it fails, and its log says why.
    local info="" state="" try
    for try in 1 2 3 4 5; do
        info=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null) || info=""
        [[ $info =~ JobState=([A-Z_]+) ]] && state=${BASH_REMATCH[1]} && break
        [ "$try" = 5 ] || sleep $((1 << try))
    done
    if [ -z "$state" ]; then
        echo "fewstep-slurm: cannot read job $SLURM_JOB_ID's state after $why (scontrol gave none in" \
             "30 s): not requeueing" >&2
        _fewstep_resume_hint "$@"
        return "$rc"
    fi
    if [ "$state" != RUNNING ]; then
        echo "fewstep-slurm: $why while Slurm ends job $SLURM_JOB_ID (JobState=${state:-unknown}: cancelled," \
             "timed out or preempted); not requeueing; job step exit code $rc" >&2
        _fewstep_resume_hint "$@"
        return "$rc"
    fi
    echo "fewstep-slurm: job step checkpointed and stopped after $why; requeueing job $SLURM_JOB_ID" >&2
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0    # slurmctld ends this run now; the job goes back to PENDING with the same id
    fi
    echo "fewstep-slurm: 'scontrol requeue $SLURM_JOB_ID' failed (job cancelled, or not requeueable?)" >&2
    _fewstep_resume_hint "$@"
    return "$rc"
}
