#!/usr/bin/env bash
# Stop the local Slurm cluster started by start-local-slurm.sh: cancel every job, then stop
# slurmd (node1, node2) and slurmctld with SIGTERM and a bounded wait (SIGKILL after 10 s).
# munged is left running. The state dir is kept (delete it by hand for a clean slate).
set -euo pipefail

STATE_DIR="${NSDG_SLURM_STATE_DIR:-/var/lib/nsdg-slurm}"
say() { printf 'stop-local-slurm: %s\n' "$*"; }

running() { # $1 = pid file, $2 = program name
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(<"$1")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]] || return 1
    # A zombie (exited, not yet reaped) is not running.
    [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]]
}

stop_one() { # $1 = pid file, $2 = program name, $3 = label
    if ! running "$1" "$2"; then
        say "$3 is not running"
        return 0
    fi
    local pid
    pid="$(<"$1")"
    say "stopping $3 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        running "$1" "$2" || return 0
        sleep 0.1
    done
    say "$3 (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

if running "$STATE_DIR/slurmctld.pid" slurmctld; then
    jobs="$(timeout 15 squeue -h -o %i 2>/dev/null || true)"
    if [[ -n "$jobs" ]]; then
        say "cancelling jobs: $(echo $jobs)"
        # shellcheck disable=SC2086
        timeout 15 scancel $jobs 2>/dev/null || true
        for _ in $(seq 1 100); do
            [[ -z "$(timeout 15 squeue -h -o %i 2>/dev/null || true)" ]] && break
            sleep 0.1
        done
    fi
fi

for n in node1 node2; do
    stop_one "$STATE_DIR/slurmd-$n.pid" slurmd "slurmd -N $n"
done
stop_one "$STATE_DIR/slurmctld.pid" slurmctld slurmctld
say "stopped (munged left running; state in $STATE_DIR)"
