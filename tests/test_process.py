"""Process groups: a stop from a pid file signals our group and never a stranger that got its pid."""

from __future__ import annotations

import os
import subprocess
import signal
import sys
import threading

from infra.process import group_identity, start_process_group, start_ticks, stop_process_group, stop_process_group_by_identity

SLEEPER = [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_start_ticks_names_one_process():
    assert start_ticks(os.getpid()) == start_ticks(os.getpid()) is not None
    assert start_ticks(2**22 + 12345) is None  # above pid_max: never a process


def test_stop_by_identity_stops_the_whole_group(tmp_path):
    proc = start_process_group(SLEEPER, log_path=tmp_path / "log")
    identity = group_identity(proc)
    assert identity.split() == [str(proc.pid), str(start_ticks(proc.pid))]
    # In production the crash hook is not the server's parent; here a thread reaps it as init would.
    reaper = threading.Thread(target=proc.wait, daemon=True)
    reaper.start()
    stop_process_group_by_identity(identity, grace=20)
    reaper.join(timeout=5)
    assert proc.returncode == -signal.SIGTERM  # stopped by SIGTERM, well before the SIGKILL at 20 s
    pgrep = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True)
    assert pgrep.stdout == ""  # the grandchild went with it


def test_stop_by_identity_leaves_a_process_that_reused_the_pid(tmp_path):
    proc = start_process_group(SLEEPER, log_path=tmp_path / "log")
    try:
        stale = f"{proc.pid} {start_ticks(proc.pid) - 1}"  # the same pid, started at another time
        stop_process_group_by_identity(stale, grace=1)
        assert proc.poll() is None and alive(proc.pid)
    finally:
        stop_process_group(proc, grace=5)


def test_stop_by_identity_of_a_gone_group_is_quiet(tmp_path):
    proc = start_process_group([sys.executable, "-c", "pass"], log_path=tmp_path / "log")
    identity = group_identity(proc)
    proc.wait(timeout=10)
    stop_process_group_by_identity(identity, grace=1)  # nothing left: returns at once
