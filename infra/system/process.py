"""Child processes in their own process group: stop = SIGTERM to the group, a grace period,
then SIGKILL (prefect-shell's way), so grandchildren never outlive a run."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

from infra.deadline import Deadline, poll_until
from infra.errors import DeadlineExceeded
from infra.system.periodic import Periodic

log = logging.getLogger(__name__)


def start_process_group(argv: list[str], *, log_path: Path, env: Mapping[str, str] | None = None,
                        cwd: str | None = None) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
        )


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def stop_process_group(proc: subprocess.Popen, *, grace: float = 10.0) -> int | None:
    """Stop the child and everything it started. Idempotent; returns the exit code."""
    if proc.poll() is not None:
        _signal_group(proc.pid, signal.SIGKILL)  # sweep grandchildren the child left behind
        return proc.returncode
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log.warning("process group %d ignored SIGTERM for %.0f s; sending SIGKILL", proc.pid, grace)
        _signal_group(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=grace)
    finally:
        _signal_group(proc.pid, signal.SIGKILL)


def start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (/proc/PID/stat field 22), or None if it is
    gone. A pid and its start time name one process: the kernel reuses pids, not both."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after the last ")".
    return int(stat.rsplit(")", 1)[1].split()[19])


def group_identity(proc: subprocess.Popen) -> str:
    """What a pid file holds for a group we started: "PGID START_TICKS"."""
    return f"{proc.pid} {start_ticks(proc.pid)}"


def stop_process_group_by_identity(identity: str, *, grace: float = 10.0) -> None:
    """The same stop for a group we did not start in this process, found through its pid file
    (crash hooks run in another process).

    The group is signalled only while it is still ours: its leader alive with the recorded start
    time, or the leader gone and members left (the kernel does not reuse a pid that still names a
    group). A leader alive with another start time is a stranger that got the pid: left alone."""
    pgid_text, _, ticks_text = identity.strip().partition(" ")
    pgid = int(pgid_text)
    recorded = int(ticks_text) if ticks_text.strip().isdigit() else None
    now = start_ticks(pgid)
    if recorded is not None and now is not None and now != recorded:
        log.info("pid %d was reused by another process since our server had it; not signalling it", pgid)
        return
    if not _signal_group(pgid, signal.SIGTERM):
        return
    try:
        poll_until(lambda: None if _signal_group(pgid, 0) else True, deadline=Deadline(grace), interval=0.1,
                   what=f"process group {pgid} to exit after SIGTERM")
    except DeadlineExceeded:
        log.warning("process group %d ignored SIGTERM for %.0f s; sending SIGKILL", pgid, grace)
        _signal_group(pgid, signal.SIGKILL)


def exit_with_parent(parent: int | None, interval: float = 0.5) -> None:
    """Send ourselves SIGTERM once our parent is gone (we are then reparented): a process started
    in a session of its own hears no signal of its starter's group, so a killed starter (kill -9,
    OOM) would otherwise leave it running.

    `parent` is the starter's pid as it told us. Without it, the parent is whoever we find at start,
    which is already init (or a subreaper) when the starter was killed while Python was still
    importing: we would then watch init forever (issue 22: a killed CLI's server outlived the tests)."""
    parent = parent or os.getppid()

    def watch() -> bool:
        if os.getppid() == parent:
            return True
        log.error("parent process %d is gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        return False

    # Never stopped: it lasts as long as the process.
    Periodic("exit-with-parent", watch, interval, immediately=True, what=f"watching parent process {parent}",
             logger=log).start()
