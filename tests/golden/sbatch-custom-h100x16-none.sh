#!/bin/bash
#SBATCH -J nsdg-golden-0001
#SBATCH -A my-acct
#SBATCH -p batch
#SBATCH -N 2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --propagate=NONE
#SBATCH --no-requeue
#SBATCH --export=PATH,LANG,LC_ALL,TZ
#SBATCH --chdir=/shared/nsdg/jobs/nsdg-golden-0001
#SBATCH -o /shared/nsdg/jobs/nsdg-golden-0001/%x-%j.out
#SBATCH -e /shared/nsdg/jobs/nsdg-golden-0001/%x-%j.err
#SBATCH --comment="nsdg run=golden-0001 flow_run=00000000-0000-4000-8000-000000000001"
#
# nemotron-sdg: the NeMo server job. Rendered by infra.slurm.render.render_sbatch from
# infra/templates/sbatch.sh.tmpl; edit the template, not this file.
# sbatch stops reading #SBATCH lines at the first command, so they all come first.
# Every value below is assigned once, shell-quoted, and only ever used as "$VAR".
JOB_DIR=/shared/nsdg/jobs/nsdg-golden-0001
HEARTBEAT_FILE=/shared/nsdg/jobs/nsdg-golden-0001/heartbeat
HEARTBEAT_TIMEOUT_S=600
HEARTBEAT_INTERVAL_S=15
TASKS_PER_NODE=8
CPUS_PER_TASK=''
SRUN_ARGS=()
# Model: the server command is replaced (server.command); no model is mounted for it.
SRUN_CONTAINER_ARGS=()
LAUNCH_PREFIX=()

BATCH_PID=$$
SRUN_PID=""
REWARD_PID=""  # a resident reward server's step, beside the generator's (sbatch-resident.sh.tmpl)
WATCHDOG_PID=""

log() {
    printf '%(%Y-%m-%dT%H:%M:%S%z)T sbatch job %s: %s\n' -1 "${SLURM_JOB_ID:-?}" "$*" >&2
}

# The server needs none of the orchestrator's credentials, nor its Python: keep them off the
# compute nodes (sbatch --export passes only the names in the header; this also covers a login
# environment that sets them).
for _name in $(compgen -e); do
    case "$_name" in
        NSDG_S3__*|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|PREFECT_API_KEY|PREFECT_API_AUTH_STRING) unset "$_name" ;;
        VIRTUAL_ENV|PYTHONPATH|PYTHONHOME) unset "$_name" ;;
    esac
done
unset _name

drop_virtualenvs_from_path() {
    # A virtualenv's bin directory (the worker's .venv) would make `python3` the orchestrator's.
    local dir kept="" dirs
    IFS=: read -r -a dirs <<< "$PATH"
    for dir in "${dirs[@]}"; do
        [ -n "$dir" ] || continue
        [ -e "$dir/../pyvenv.cfg" ] && continue
        kept="${kept:+$kept:}$dir"
    done
    PATH=$kept
}
drop_virtualenvs_from_path

# slurm.env is empty.
# srun relays every rank's output unbuffered, so 16 ranks' lines stay whole and in order.
export SLURM_UNBUFFEREDIO=1

write_job_info() {
    # Where the job landed, for the orchestrator and for whoever reads the job dir later.
    # Written under a temp name and renamed, so a reader never sees half a file.
    local tmp="$JOB_DIR/.job-info.$$"
    {
        printf 'job_id=%s\n' "${SLURM_JOB_ID:-}"
        printf 'batch_host=%s\n' "$HOST"
        printf 'nodelist=%s\n' "${SLURM_JOB_NODELIST:-}"
        printf 'first_node=%s\n' "$FIRST_NODE"
        printf 'started_at=%(%Y-%m-%dT%H:%M:%S%z)T\n' -1
    } > "$tmp" && mv -f "$tmp" "$JOB_DIR/job-info"
}

heartbeat_signature() {
    # Changes whenever the orchestrator writes or touches the heartbeat; empty while it is
    # missing. Reading the file first makes NFS revalidate its cached attributes (close-to-open),
    # so the mtime read after it is current.
    [ -e "$HEARTBEAT_FILE" ] || return 0
    head -c 256 -- "$HEARTBEAT_FILE" 2>/dev/null | cksum
    stat -c '%Y %s' -- "$HEARTBEAT_FILE" 2>/dev/null
}

cancel_job() {
    log "dead-man switch: $1; cancelling job ${SLURM_JOB_ID:-?}"
    printf '%s\n' "$1" > "$JOB_DIR/cancel-reason"
    scancel "$SLURM_JOB_ID"
}

dead_man_switch() {
    # Cancels this job when the orchestrator's heartbeat stops. It measures how long the
    # heartbeat has gone unchanged on this node's own clock, never mtime against `date`, so clock
    # skew between the orchestrator's host and this node cannot fire it. A heartbeat that never
    # appears counts from the moment the job started. Ends with the batch script.
    local seen="" current now last_change age pause state
    trap '' USR1 USR2  # the batch script notes these; they must not end the switch
    # Waits with `read -t` on a pipe nobody writes: a sleep with no child process, so stopping
    # this subshell leaves nothing behind holding the job's output open.
    exec {pause}<> <(:)
    printf -v last_change '%(%s)T' -1
    while kill -0 "$BATCH_PID" 2>/dev/null; do
        current=$(heartbeat_signature)
        printf -v now '%(%s)T' -1
        age=$((now - last_change))
        if [ "$current" != "$seen" ]; then
            seen=$current
            last_change=$now
        elif [ "$age" -ge "$HEARTBEAT_TIMEOUT_S" ]; then
            state=unchanged
            [ -n "$current" ] || state=missing
            cancel_job "heartbeat file $HEARTBEAT_FILE $state for ${age}s (timeout ${HEARTBEAT_TIMEOUT_S}s)" && return 0
            log "dead-man switch: scancel failed; trying again in ${HEARTBEAT_INTERVAL_S}s"
        fi
        read -r -t "$HEARTBEAT_INTERVAL_S" -u "$pause" _
    done
}

stop_watchdog() {
    if [ -n "$WATCHDOG_PID" ]; then
        kill "$WATCHDOG_PID" 2>/dev/null
        WATCHDOG_PID=""
    fi
    return 0
}

forward_signal() {
    # Slurm signals us on scancel and at the time limit: pass it to srun (which relays it to
    # every rank) and to our own watchdog. Nothing we did not start is touched.
    log "received SIG$1; forwarding it to srun (pid ${SRUN_PID:-none}${REWARD_PID:+ and the reward step $REWARD_PID})"
    if [ -n "$SRUN_PID" ]; then
        kill "-$1" "$SRUN_PID" 2>/dev/null
    fi
    if [ -n "$REWARD_PID" ]; then
        kill "-$1" "$REWARD_PID" 2>/dev/null
    fi
    stop_watchdog
}

note_signal() {
    # `--signal=B:USR1@<s>` or `scancel --signal=USR1 --batch`: a warning, not an order to stop.
    # Written for the flow to read (temp + rename); srun and the ranks are not told.
    log "received SIG$1; noted in $JOB_DIR/signal-received, the job goes on"
    local tmp="$JOB_DIR/.signal-received.$$"
    printf 'signal=%s\nreceived_at=%(%s)T\nby=batch\n' "$1" -1 > "$tmp" && mv -f "$tmp" "$JOB_DIR/signal-received"
}

wait_for() {
    # `wait` returns early (>128) when a trapped signal arrives; keep waiting until the child
    # has really exited, so its own exit code is the one reported.
    local pid=$1 rc
    while :; do
        wait "$pid"
        rc=$?
        kill -0 "$pid" 2>/dev/null || return "$rc"
    done
}

# Taken before any trap is set, and never `$HOSTNAME`, which may be the submit host's (Slurm
# exports the caller's environment). After the traps no command substitution runs in this
# shell: bash 5.2 can fail to parse one that a signal interrupts.
HOST=$(hostname)
FIRST_NODE=""
if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    FIRST_NODE=$(timeout 30 scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1)
fi

if [ -z "$CPUS_PER_TASK" ]; then
    # srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05): without it each rank may
    # be pinned to one CPU. Share the node's CPUs among its ranks.
    CPUS_PER_TASK=$(( ${SLURM_CPUS_ON_NODE:-$TASKS_PER_NODE} / TASKS_PER_NODE ))
    [ "$CPUS_PER_TASK" -ge 1 ] || CPUS_PER_TASK=1
fi

trap 'forward_signal TERM' TERM
trap 'forward_signal INT' INT
trap 'note_signal USR1' USR1
trap 'note_signal USR2' USR2
trap stop_watchdog EXIT

write_job_info
log "running on $HOST, nodes ${SLURM_JOB_NODELIST:-?}; heartbeat $HEARTBEAT_FILE, timeout ${HEARTBEAT_TIMEOUT_S}s"

dead_man_switch &
WATCHDOG_PID=$!

# One task per GPU, no torchrun, each seeing every GPU of its node; a rank that exits non-zero
# ends the whole step (and the job then ends FAILED with that exit code). --export=ALL: the
# ranks get this script's environment (sbatch's --export list would otherwise narrow it again);
# --label prefixes each line with its rank.
srun --kill-on-bad-exit=1 --ntasks-per-node="$TASKS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" \
    --export=ALL --label "${SRUN_ARGS[@]}" \
    "${SRUN_CONTAINER_ARGS[@]}" "${LAUNCH_PREFIX[@]}" bash "$JOB_DIR/node-launcher.sh" </dev/null &
SRUN_PID=$!

wait_for "$SRUN_PID"
rc=$?
log "srun exited with code $rc"
exit "$rc"
