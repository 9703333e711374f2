#!/usr/bin/env bash
# Start a real 2-node Slurm cluster on this one machine, as root (see infra/cluster/README.md).
#
#   node1, node2: NodeAddr=127.0.0.1, slurmd ports 17001/17002, CPUs=16, Gres=gpu:8 (placeholder
#   device files), partition `debug`. No slurmdbd: finished jobs are recorded by jobcomp/filetxt
#   in $STATE_DIR/jobcomp.log, which `sacct --completion` reads.
#
# Idempotent: installs only what is missing, writes the config, restarts the daemons only when
# the config changed or a daemon is not running, then waits (bounded) until both nodes are idle.
#
# Environment:
#   NSDG_SLURM_STATE_DIR   state, logs, pid files, spool (default /var/lib/nsdg-slurm)
#   NSDG_SLURM_WAIT_S      how long to wait for both nodes to be idle (default 60)
set -euo pipefail

STATE_DIR="${NSDG_SLURM_STATE_DIR:-/var/lib/nsdg-slurm}"
WAIT_S="${NSDG_SLURM_WAIT_S:-60}"
CONF_DIR=/etc/slurm                   # where Debian's slurm commands look without SLURM_CONF
MARKER="# written by nemotron-sdg infra/cluster/start-local-slurm.sh"
NODES=(node1 node2)
declare -A PORT=([node1]=17001 [node2]=17002)
CTLD_PORT=16817
LOG_DIR="$STATE_DIR/log"

say() { printf 'start-local-slurm: %s\n' "$*"; }
die() {
    printf 'start-local-slurm: ERROR: %s\n' "$1" >&2
    shift
    local f
    for f in "$@"; do
        if [[ -f "$f" ]]; then
            printf -- '--- last 30 lines of %s ---\n' "$f" >&2
            tail -n 30 "$f" >&2 || true
        fi
    done
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "run as root (the local cluster runs its daemons as root)"

# --- packages -------------------------------------------------------------------------------
missing=()
for pkg in slurmctld slurmd slurm-client munge; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q || die "apt-get update failed; check network access to the package mirror"
    apt-get install -y -q --no-install-recommends "${missing[@]}" \
        || die "apt-get install ${missing[*]} failed; see the output above"
fi

# --- munge ----------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 0400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    munged --force || die "munged did not start" /var/log/munge/munged.log
    for _ in $(seq 1 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 \
        || die "munged is not answering (munge -n | unmunge fails)" /var/log/munge/munged.log
fi

# --- config ---------------------------------------------------------------------------------
HOST="$(hostname -s)"
mkdir -p "$STATE_DIR/ctld" "$LOG_DIR" "$STATE_DIR/gpu"
for n in "${NODES[@]}"; do
    mkdir -p "$STATE_DIR/spool/$n"
    for i in 0 1 2 3 4 5 6 7; do
        [[ -e "$STATE_DIR/gpu/$n-gpu$i" ]] || : >"$STATE_DIR/gpu/$n-gpu$i"
    done
done

new_conf="$(mktemp)"
new_gres="$(mktemp)"
trap 'rm -f "$new_conf" "$new_gres"' EXIT

cat >"$new_conf" <<EOF
$MARKER
# State, logs and pid files live in $STATE_DIR.
ClusterName=nsdg
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
GresTypes=gpu
ReturnToService=2
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No slurmdbd: sacct has no accounting store; finished jobs go to a text file that
# \`sacct --completion\` reads, and the controller keeps them MinJobAge seconds.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE_DIR/jobcomp.log
MinJobAge=30
# Fast timings for tests.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1,batch_sched_delay=0
SlurmctldTimeout=10
SlurmdTimeout=30
MessageTimeout=10
KillWait=5
InactiveLimit=0
Waittime=0
NodeName=node1 NodeAddr=127.0.0.1 NodeHostname=$HOST Port=${PORT[node1]} CPUs=16 Gres=gpu:8 State=UNKNOWN
NodeName=node2 NodeAddr=127.0.0.1 NodeHostname=$HOST Port=${PORT[node2]} CPUs=16 Gres=gpu:8 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
EOF

cat >"$new_gres" <<EOF
$MARKER
NodeName=node1 Name=gpu File=$STATE_DIR/gpu/node1-gpu[0-7]
NodeName=node2 Name=gpu File=$STATE_DIR/gpu/node2-gpu[0-7]
EOF

# Pid files of the daemons the current /etc/slurm/slurm.conf describes (it may name another
# state dir), so a config change stops the daemons that are really running.
old_ctld_pid="$STATE_DIR/slurmctld.pid"
old_slurmd_pid="$STATE_DIR/slurmd-%n.pid"
if [[ -f "$CONF_DIR/slurm.conf" ]] && grep -qF "$MARKER" "$CONF_DIR/slurm.conf"; then
    old_ctld_pid="$(sed -n 's/^SlurmctldPidFile=//p' "$CONF_DIR/slurm.conf")"
    old_slurmd_pid="$(sed -n 's/^SlurmdPidFile=//p' "$CONF_DIR/slurm.conf")"
fi

changed=0
install_conf() { # $1 = new file, $2 = name
    local dest="$CONF_DIR/$2"
    cp "$1" "$STATE_DIR/$2"
    if [[ -f "$dest" ]] && cmp -s "$1" "$dest"; then
        return 0
    fi
    if [[ -f "$dest" ]] && ! grep -qF "$MARKER" "$dest"; then
        local backup
        backup="$dest.bak.$(date +%Y%m%d%H%M%S)"
        say "keeping the existing $dest as $backup"
        cp -p "$dest" "$backup"
    fi
    mkdir -p "$CONF_DIR"
    install -m 0644 "$1" "$dest"
    changed=1
}
install_conf "$new_conf" slurm.conf
install_conf "$new_gres" gres.conf

# --- daemons --------------------------------------------------------------------------------
# A daemon is running when its pid file names a live process of that program.
running() { # $1 = pid file, $2 = program name
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(<"$1")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]] || return 1
    # A zombie (exited, not yet reaped) is not running.
    [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]]
}

stop_one() { # $1 = pid file, $2 = program name
    running "$1" "$2" || return 0
    local pid
    pid="$(<"$1")"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        running "$1" "$2" || return 0
        sleep 0.1
    done
    say "$2 (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

if ((changed)); then
    say "configuration written to $CONF_DIR/slurm.conf and $CONF_DIR/gres.conf (copies in $STATE_DIR)"
    if running "$old_ctld_pid" slurmctld; then
        say "config changed: restarting the daemons"
        for n in "${NODES[@]}"; do stop_one "${old_slurmd_pid//%n/$n}" slurmd; done
        stop_one "$old_ctld_pid" slurmctld
    fi
fi

if ! running "$STATE_DIR/slurmctld.pid" slurmctld; then
    say "starting slurmctld"
    slurmctld || die "slurmctld did not start" "$LOG_DIR/slurmctld.log"
fi
for n in "${NODES[@]}"; do
    if ! running "$STATE_DIR/slurmd-$n.pid" slurmd; then
        say "starting slurmd -N $n"
        slurmd -N "$n" || die "slurmd -N $n did not start" "$LOG_DIR/slurmd-$n.log"
    fi
done

# --- wait until both nodes are idle ---------------------------------------------------------
say "waiting up to ${WAIT_S} s for node1 and node2 to be idle"
deadline=$((SECONDS + WAIT_S))
last=""
while :; do
    idle=0
    if last="$(sinfo -h -N -p debug -o '%N %t' 2>&1)"; then
        while read -r node st; do
            case "$st" in
                idle | mix | alloc | comp) idle=$((idle + 1)) ;;
                down* | drain* | drng* | fail*)
                    scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true ;;
            esac
        done <<<"$last"
    fi
    ((idle == ${#NODES[@]})) && break
    if ((SECONDS >= deadline)); then
        die "the nodes were not up after ${WAIT_S} s; last sinfo: ${last//$'\n'/; }. Check the logs below, then run infra/cluster/stop-local-slurm.sh and try again" \
            "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd-node1.log" "$LOG_DIR/slurmd-node2.log"
    fi
    sleep 0.5
done
# A daemon that could not start (a port in use, a bad spool dir) exits after forking.
running "$STATE_DIR/slurmctld.pid" slurmctld \
    || die "slurmctld is not running although the nodes answer: another controller holds port $CTLD_PORT? Stop it (infra/cluster/stop-local-slurm.sh with its NSDG_SLURM_STATE_DIR) and try again" "$LOG_DIR/slurmctld.log"
for n in "${NODES[@]}"; do
    running "$STATE_DIR/slurmd-$n.pid" slurmd \
        || die "slurmd -N $n is not running although the nodes answer: another slurmd holds port ${PORT[$n]}?" "$LOG_DIR/slurmd-$n.log"
done
say "cluster nsdg is up: ${last//$'\n'/, } (logs in $LOG_DIR)"
