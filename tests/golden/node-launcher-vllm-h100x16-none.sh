#!/bin/bash
# nemotron-sdg node launcher: srun runs it once per node (vLLM starts its GPU workers), inside the
# container when there is one. Rendered by infra.slurm.render.render_node_launcher from
# infra/templates/node-launcher.sh.tmpl; edit the template, not this file.
# Every value below is assigned once, shell-quoted, and only ever used as "$VAR".
JOB_DIR=/shared/nsdg/jobs/nsdg-golden-0001
SETUP_LINES=()
SERVER_CMD=(vllm serve /lustre/models/Nemotron-4-340B-Base-hf --served-model-name nemotron-4-340b-base --tensor-parallel-size 8 --pipeline-parallel-size 2 --distributed-executor-backend ray --max-model-len 4096 --generation-config vllm --host 0.0.0.0 --port 1424)
RAY_PORT=6379
RAY_PORT_SPAN=1100
RAY_NODE_ARGS=(--node-manager-port=6380 --object-manager-port=6381 --dashboard-agent-grpc-port=6382 --dashboard-agent-listen-port=6383 --metrics-export-port=6384 --runtime-env-agent-port=6385 --min-worker-port=6479 --max-worker-port=7478)
RAY_HEAD_ARGS=(--ray-client-server-port=6386 --dashboard-port=6387)
RAY_GPUS=16
RAY_WAIT_S=2700
PREFLIGHT_PORT=1424
PREFLIGHT_MODEL=/lustre/models/Nemotron-4-340B-Base-hf
PREFLIGHT_MODEL_FILES=(config.json)
PREFLIGHT_GPUS=8
PREFLIGHT_DRIVER_MIN=''

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

# vLLM over Ray, one task per node (vLLM's and NeMo-Skills' layout): node 0 runs the Ray head,
# waits until the cluster shows every GPU of the job, then runs `vllm serve`, which places its
# TP x PP workers through Ray; every other node runs a Ray worker joined to the head. Each role
# runs in its own process group. A worker whose Ray exits ends its task non-zero, so srun
# --kill-on-bad-exit ends the whole step (the head's server cannot go on without it).
NODE_RANK="${SLURM_NODEID:-0}"
RAY_PID=""
# The preflight's Ray check, before Ray is started: the fixed ports this node's Ray binds (the
# head's too on node 0; the workers' range is Ray's to search) are free here.
ray_ports_free() {
    local arg
    for arg in "$@"; do
        case "$arg" in --min-worker-port=*|--max-worker-port=*) continue ;; esac
        if port_taken "${arg#*=}"; then
            preflight_fail "port: Ray's ${arg%%=*} ${arg#*=} is already taken on $HOST; set NSDG_SLURM__RAY_PORT to the start of $RAY_PORT_SPAN free ports"
        fi
    done
}
if [ "$NODE_RANK" = "0" ]; then
    ray_ports_free "--port=$RAY_PORT" "${RAY_NODE_ARGS[@]}" "${RAY_HEAD_ARGS[@]}"
else
    ray_ports_free "${RAY_NODE_ARGS[@]}"
fi
# vLLM 0.20-0.22 keep the old compiled-graph Ray executor (multi-node PP > 1 fails in its channels)
# unless asked for V2, its default from 0.23 on (vllm #36836).
export VLLM_USE_RAY_V2_EXECUTOR_BACKEND="${VLLM_USE_RAY_V2_EXECUTOR_BACKEND:-1}"
# A raylet on a loaded node can take longer than Ray's default 60 s to register (NeMo-Skills gives
# this job shape 120 s; audit S3); slurm.env may set it otherwise.
export RAY_raylet_start_wait_time_s="${RAY_raylet_start_wait_time_s:-120}"
# Tagged with the job id and restart count: a requeued job must not join the last start's head.
HEAD_TAG="${SLURM_JOB_ID:-0}.${SLURM_RESTART_COUNT:-0}"

stop_ray() {
    if [ -n "$RAY_PID" ]; then
        kill -TERM -- "-$RAY_PID" 2>/dev/null || kill -TERM "$RAY_PID" 2>/dev/null
    fi
    return 0
}

trap 'stop_ray; stop_server TERM' TERM
trap 'stop_ray; stop_server INT' INT

own_address() {
    # This node's address as `hostname --ip-address` gives it (Ray's own Slurm recipe), through a
    # file: no command substitution runs once the traps are set.
    hostname --ip-address > "$JOB_DIR/.node-ip.$$" 2>/dev/null
    read -r NODE_IP _ < "$JOB_DIR/.node-ip.$$"
    rm -f "$JOB_DIR/.node-ip.$$"
}

is_loopback() {
    case "$1" in 127.*|::1|localhost|"") return 0 ;; *) return 1 ;; esac
}

elapsed_since() {
    local now
    printf -v now '%(%s)T' -1
    ELAPSED=$((now - $1))
}

ray_gpus_at_least() {
    # 2: the head does not answer yet; 1: it answers with fewer GPUs than $1; 0: at least $1.
    # `ray status` lists the cluster's resources, e.g. " 0.0/16.0 GPU".
    ray status --address="$HEAD_ADDRESS" > "$JOB_DIR/.ray-status.$$" 2>&1 || return 2
    awk -v need="$1" '
        match($0, /\/[0-9.]+ GPU/) { if (substr($0, RSTART + 1, RLENGTH - 5) + 0 >= need) ok = 1 }
        END { exit !ok }' "$JOB_DIR/.ray-status.$$"
}

wait_for_ray_cluster() {
    # The head's address is published once its Ray answers, so the workers join a running head.
    local started state published=""
    printf -v started '%(%s)T' -1
    while :; do
        if ! kill -0 "$RAY_PID" 2>/dev/null; then
            log "the Ray head exited before the cluster formed"
            return 1
        fi
        ray_gpus_at_least "$RAY_GPUS"
        state=$?
        if [ "$state" -ne 2 ] && [ -z "$published" ]; then
            publish ray-head "$HEAD_TAG $HEAD_ADDRESS"
            published=1
            log "the Ray head answers at $HEAD_ADDRESS; waiting for $RAY_GPUS GPUs"
        fi
        if [ "$state" -eq 0 ]; then
            log "the Ray cluster shows $RAY_GPUS GPUs"
            return 0
        fi
        elapsed_since "$started"
        if [ "$ELAPSED" -ge "$RAY_WAIT_S" ]; then
            log "the Ray cluster did not show $RAY_GPUS GPUs within ${RAY_WAIT_S}s: see the workers' lines in this log"
            return 1
        fi
        sleep 1
    done
}

wait_for_head() {
    # The head publishes "<tag> <address>" in the job dir once its Ray is started.
    local started tag address
    printf -v started '%(%s)T' -1
    while :; do
        if [ -r "$JOB_DIR/ray-head" ] && read -r tag address < "$JOB_DIR/ray-head" && [ "$tag" = "$HEAD_TAG" ]; then
            HEAD_ADDRESS=$address
            return 0
        fi
        elapsed_since "$started"
        if [ "$ELAPSED" -ge "$RAY_WAIT_S" ]; then
            log "no Ray head published $JOB_DIR/ray-head within ${RAY_WAIT_S}s: see node 0's lines in this log"
            return 1
        fi
        sleep 1
    done
}

if [ "$NODE_RANK" = "0" ]; then
    # Only node 0 serves HTTP: the orchestrator reads these to find the server.
    publish rank0-host "$HOST"
    publish rank0-node "${SLURMD_NODENAME:-}"
    # The head's address as the other nodes reach it: RAY_HEAD_IP from slurm.env, else the
    # node's own address. A loopback address found that way (a hostname mapped to 127.0.1.1 in
    # /etc/hosts) cannot be reached from another node: refused now, not after Ray's 30-minute wait.
    if [ -z "${RAY_HEAD_IP:-}" ]; then
        own_address
        if is_loopback "$NODE_IP"; then
            log "hostname --ip-address gives '$NODE_IP' on $HOST, which the other nodes cannot reach: set RAY_HEAD_IP in NSDG_SLURM__ENV to this node's address on the cluster network, or fix its /etc/hosts"
            exit 1
        fi
        RAY_HEAD_IP=$NODE_IP
    fi
    # vLLM places its workers by this address (VLLM_HOST_IP, else a guess from the default
    # route, which air-gapped nodes lack): the same one Ray knows the node by (vLLM's run_cluster.sh).
    export VLLM_HOST_IP="$RAY_HEAD_IP" RAY_NODE_IP_ADDRESS="$RAY_HEAD_IP"
    HEAD_ADDRESS="$RAY_HEAD_IP:$RAY_PORT"
    setsid ray start --head --node-ip-address="$RAY_HEAD_IP" --port="$RAY_PORT" "${RAY_NODE_ARGS[@]}" \
        "${RAY_HEAD_ARGS[@]}" --block &
    RAY_PID=$!
    log "Ray head started at $HEAD_ADDRESS, pid and process group $RAY_PID"
    wait_for_ray_cluster
    formed=$?
    rm -f "$JOB_DIR/.ray-status.$$"
    if [ "$formed" -ne 0 ]; then
        stop_ray
        exit 1
    fi
    setsid "${SERVER_CMD[@]}" &
    SERVER_PID=$!
    log "server started, pid and process group $SERVER_PID"
    wait_for "$SERVER_PID"
    rc=$?
    log "server exited with code $rc"
    stop_ray
    exit "$rc"
fi

wait_for_head || exit 1
own_address
if is_loopback "$NODE_IP" && ! is_loopback "${HEAD_ADDRESS%:*}"; then
    log "hostname --ip-address gives '$NODE_IP' on $HOST, which the head at $HEAD_ADDRESS cannot reach: fix this node's /etc/hosts"
    exit 1
fi
export VLLM_HOST_IP="$NODE_IP" RAY_NODE_IP_ADDRESS="$NODE_IP"
setsid ray start --address="$HEAD_ADDRESS" --node-ip-address="$NODE_IP" "${RAY_NODE_ARGS[@]}" --block &
SERVER_PID=$!
log "Ray worker joined $HEAD_ADDRESS, pid and process group $SERVER_PID"
wait_for "$SERVER_PID"
rc=$?
log "Ray worker exited with code $rc"
# Exit 0 would leave srun's step running without this node's GPUs.
[ "$rc" -ne 0 ] || rc=1
exit "$rc"
