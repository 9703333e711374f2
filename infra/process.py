"""Child processes in their own process group: stop = SIGTERM to the group, a grace period,
then SIGKILL (prefect-shell's way), so grandchildren never outlive a run."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

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


def stop_process_group_by_pid(pgid: int, *, grace: float = 10.0) -> None:
    """The same stop for a group we did not start in this process (found through a pid file)."""
    import time

    from infra.deadline import Deadline

    if not _signal_group(pgid, signal.SIGTERM):
        return
    deadline = Deadline(grace)
    while not deadline.expired():
        if not _signal_group(pgid, 0):
            return
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)
