#!/bin/bash
# nemotron-sdg node launcher: srun runs it once per rank (one rank per GPU), inside the
# container when there is one. Rendered by infra.slurm.render.render_node_launcher from
# infra/templates/node-launcher.sh.tmpl; edit the template, not this file.
# Every value below is assigned once, shell-quoted, and only ever used as "$VAR".
JOB_DIR=/shared/nsdg/jobs/nsdg-golden-0001
SETUP_LINES=()
SERVER_CMD=(python3 /opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py gpt_model_file=/lustre/models/Nemotron-4-340B-Base tensor_model_parallel_size=8 pipeline_model_parallel_size=1 pipeline_model_parallel_split_rank=0 trainer.devices=8 trainer.num_nodes=1 trainer.precision=bf16 megatron_amp_O2=True server=True web_server=False port=1424)
PREFLIGHT_PORT=1424
PREFLIGHT_MODEL=/lustre/models/Nemotron-4-340B-Base
PREFLIGHT_MODEL_FILES=(model_config.yaml)
PREFLIGHT_GPUS=8
PREFLIGHT_DRIVER_MIN=525.60.13

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

preflight_fail() {
    # One line naming the check, what was seen and the fix: in the job's log, and in
    # $JOB_DIR/preflight-failed, which the orchestrator reports at once instead of waiting out the
    # ready deadline (infra/slurm/backend.py). A non-zero exit ends the step, and the job FAILED.
    local line="nsdg preflight failed on $HOST (rank $RANK): $*"
    echo "$line" >&2
    publish preflight-failed "$line"
    exit 3
}

port_taken() {
    # Something answers on the port here: the server (or Ray's head) could not bind it.
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

preflight() {
    # What a misconfigured site fails, found in seconds before the server loads (issue 25). Every
    # rank checks its cache; the first task of each node the rest, for its node and container.
    local probe file seen driver floor
    if ! mkdir -p "$XDG_CACHE_HOME" 2>/dev/null || ! probe=$(mktemp "$XDG_CACHE_HOME/.preflight.XXXXXX" 2>/dev/null); then
        preflight_fail "cache: $XDG_CACHE_HOME is not writable; set XDG_CACHE_HOME in NSDG_SLURM__ENV to a writable directory of the node"
    fi
    rm -f "$probe"
    [ "${SLURM_LOCALID:-0}" = "0" ] || return 0
    if command -v getent >/dev/null 2>&1 && ! getent hosts "$HOST" >/dev/null; then
        preflight_fail "node name: $HOST does not resolve (getent hosts); the other nodes could not reach it: ask the site's operators"
    fi
    if [ -n "$PREFLIGHT_MODEL" ]; then
        if [ ! -d "$PREFLIGHT_MODEL" ] || [ ! -r "$PREFLIGHT_MODEL" ] || [ ! -x "$PREFLIGHT_MODEL" ]; then
            preflight_fail "model: $PREFLIGHT_MODEL is not a readable directory here (inside the container); check NSDG_MODEL__PATH and the mounts (NSDG_SLURM__CONTAINER_MOUNTS, NSDG_SLURM__MOUNT_MODEL)"
        fi
        for file in "${PREFLIGHT_MODEL_FILES[@]}"; do
            [ -r "$PREFLIGHT_MODEL/$file" ] || preflight_fail "model: $PREFLIGHT_MODEL has no readable $file, which the engine loads first; point NSDG_MODEL__PATH at the checkpoint directory"
        done
    fi
    if [ "$RANK" = "0" ] && port_taken "$PREFLIGHT_PORT"; then
        preflight_fail "port: $PREFLIGHT_PORT is already taken on $HOST; set NSDG_SERVER__PORT to a port free on the nodes"
    fi
    if [ "$PREFLIGHT_GPUS" -gt 0 ]; then
        command -v nvidia-smi >/dev/null 2>&1 || preflight_fail "GPUs: no nvidia-smi here, so no GPU is visible to the server; run with the container runtime's GPU support (the image's driver libraries, apptainer --nv)"
        seen=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
        if [ "$seen" -lt "$PREFLIGHT_GPUS" ]; then
            preflight_fail "GPUs: nvidia-smi lists $seen, the job expects $PREFLIGHT_GPUS on each node; check CUDA_VISIBLE_DEVICES in NSDG_SLURM__ENV and the profile's gpus_per_node"
        fi
        driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
        # The image's CUDA needs this driver or newer (rendered from its tag; NSDG_DRIVER_MIN in
        # slurm.env overrides it, 0 accepts any): an older one fails at the first CUDA call, after the load.
        floor="${NSDG_DRIVER_MIN:-$PREFLIGHT_DRIVER_MIN}"
        if [ -n "$floor" ] && [ -n "$driver" ] && ! printf '%s\n%s\n' "$floor" "$driver" | sort -V -C; then
            preflight_fail "driver: NVIDIA driver $driver on $HOST, the image's CUDA needs $floor or newer; use an image built for an older CUDA (e.g. vLLM's -cu129 tags, 525.60.13) or ask the site's operators for a newer driver"
        fi
        log "preflight: $seen GPUs, driver $driver"
    fi
    log "preflight passed"
}

# Before the traps: setup lines (Lmod's `module`, for one) run command substitutions, as does the
# preflight.
run_setup
preflight

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
