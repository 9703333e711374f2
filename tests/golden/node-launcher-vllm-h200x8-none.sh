#!/bin/bash
# nemotron-sdg node launcher: srun runs it once per node (vLLM starts its GPU workers), inside the
# container when there is one. Rendered by infra.slurm.render.render_node_launcher from
# infra/templates/node-launcher.sh.tmpl; edit the template, not this file.
# Every value below is assigned once, shell-quoted, and only ever used as "$VAR".
JOB_DIR=/shared/nsdg/jobs/nsdg-golden-0001
SETUP_LINES=()
SERVER_CMD=(vllm serve /lustre/models/Nemotron-4-340B-Base-hf-FP8 --served-model-name nemotron-4-340b-base --tensor-parallel-size 8 --max-model-len 4096 --host 0.0.0.0 --port 1424)

# Not the orchestrator's Python; not the home directory's pip --user packages either. Whole
# Hydra errors and unbuffered output, so 16 ranks' logs can be read.
unset VIRTUAL_ENV PYTHONPATH PYTHONHOME
export PYTHONNOUSERSITE=1 HYDRA_FULL_ERROR=1 PYTHONUNBUFFERED=1
# Caches in a writable place of this job's: the image is read-only and $HOME is not mounted, so
# vLLM's compile cache, Triton, torch and the HF hub would fail writing under ~/.cache. Compute
# nodes are often offline: no hub lookups, no usage reports (which would wait on the network).
# slurm.env below may set any of these otherwise.
export XDG_CACHE_HOME="${TMPDIR:-/tmp}/nsdg-cache-${SLURM_JOB_ID:-0}"
export HF_HOME="$XDG_CACHE_HOME/huggingface" VLLM_CACHE_ROOT="$XDG_CACHE_HOME/vllm" \
    TRITON_CACHE_DIR="$XDG_CACHE_HOME/triton" TORCHINDUCTOR_CACHE_DIR="$XDG_CACHE_HOME/inductor"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
# slurm.env, set again here: inside a container it wins over the image's own values.
# slurm.env is empty.

RANK="${SLURM_PROCID:-0}"
if ! mkdir -p "$XDG_CACHE_HOME" 2>/dev/null; then
    echo "rank $RANK: cannot create the cache directory $XDG_CACHE_HOME; set XDG_CACHE_HOME in NSDG_SLURM__ENV to a writable directory" >&2
    exit 1
fi
# Taken before any trap is set, and never `$HOSTNAME`, which may be the submit host's
# (Slurm exports the caller's environment). After the traps below no command substitution
# runs in this shell: bash 5.2 can fail to parse one that a signal interrupts.
HOST=$(hostname)
SERVER_PID=""

log() {
    printf '%(%Y-%m-%dT%H:%M:%S%z)T rank %s: %s\n' -1 "$RANK" "$*"
}

publish() {
    # Temp name + rename: the orchestrator polls these files and must never read half of one.
    local tmp="$JOB_DIR/.$1.$$"
    printf '%s\n' "$2" > "$tmp" && mv -f "$tmp" "$JOB_DIR/$1"
}

stop_server() {
    # Signal the server's own process group (it and whatever it forked) and nothing else.
    log "received SIG$1; sending SIGTERM to the server's process group ${SERVER_PID:-none}"
    if [ -z "$SERVER_PID" ]; then
        exit 143
    fi
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || kill -TERM "$SERVER_PID" 2>/dev/null
}

note_signal() {
    # Slurm sends a step's signal to every process of the step, the server too, so a USR1 for the
    # ranks cannot be a mere warning (slurm.extra_directives refuses --signal without B:). The
    # trap keeps this launcher alive to report how the server ended.
    log "received SIG$1 (the server gets it from Slurm as well)"
}

run_setup() {
    # slurm.setup: the site's own lines (module load ..., source .../activate), in this shell, so
    # what they set reaches the server. A line that fails ends the rank: the server would not run.
    local line
    for line in "${SETUP_LINES[@]}"; do
        log "setup: $line"
        eval "$line" || { log "setup line failed (exit $?): $line"; exit 1; }
    done
}

wait_for() {
    # `wait` returns early (>128) when a trapped signal arrives; keep waiting until the server
    # has really exited, so its own exit code is the one reported.
    local pid=$1 rc
    while :; do
        wait "$pid"
        rc=$?
        kill -0 "$pid" 2>/dev/null || return "$rc"
    done
}

# Before the traps: setup lines (Lmod's `module`, for one) run command substitutions.
run_setup

trap 'stop_server TERM' TERM
trap 'stop_server INT' INT
trap 'note_signal USR1' USR1
trap 'note_signal USR2' USR2

log "local_rank=${SLURM_LOCALID:-?} node_rank=${SLURM_NODEID:-?} host=$HOST job=${SLURM_JOB_ID:-?}"

if [ "$RANK" = "0" ]; then
    # Only global rank 0 serves HTTP: the orchestrator reads these to find the server.
    publish rank0-host "$HOST"
    publish rank0-node "${SLURMD_NODENAME:-}"
fi

# setsid puts the server in a new session and process group whose id is its pid, so
# stop_server can reach every process it forks.
setsid "${SERVER_CMD[@]}" &
SERVER_PID=$!
log "server started, pid and process group $SERVER_PID"

wait_for "$SERVER_PID"
rc=$?
# A non-zero code is passed on unchanged: srun --kill-on-bad-exit ends the step on it and the
# job ends FAILED.
log "server exited with code $rc"
exit "$rc"
