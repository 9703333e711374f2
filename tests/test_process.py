"""Process groups: a stop from a pid file signals our group and never a stranger that got its pid."""

from __future__ import annotations

import os
import subprocess
import signal
import sys
import threading
from pathlib import Path

from infra.deadline import Deadline, poll_until
from infra.system.process import group_identity, start_process_group, start_ticks, stop_process_group, stop_process_group_by_identity

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


def gone(pid: int) -> bool:
    """Exited, or a zombie waiting for init to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_server_whose_starter_dies_during_its_start_up_stops(tmp_path):
    """Issue 22: the starter killed while the server was still importing left it watching init as
    its "parent" forever. Told the starter's pid, it notices the starter is already gone."""
    starter = ("import os, subprocess, sys; "
               "p = subprocess.Popen([sys.executable, '-m', 'infra.local_server', 'serve-local', '--engine', 'simulated', "
               "'--host', '127.0.0.1', '--port', '0', '--exit-with-parent', str(os.getpid())], start_new_session=True, "
               "stdout=open(sys.argv[1], 'w'), stderr=subprocess.STDOUT); print(p.pid, flush=True); os._exit(0)")
    log = tmp_path / "server.log"
    out = subprocess.run([sys.executable, "-c", starter, str(log)], capture_output=True, text=True, timeout=60, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    server = int(out.stdout.strip())
    try:
        poll_until(lambda: gone(server) or None, deadline=Deadline(60), interval=0.2,
                   what=f"the orphaned server (pid {server}) to stop")
        assert "is gone; stopping" in log.read_text(), log.read_text()  # stopped by its watch, not by an error
    finally:
        if not gone(server):
            os.killpg(server, signal.SIGKILL)


def test_a_module_run_with_parent_stops_when_its_starter_is_killed(tmp_path):
    """infra/system/with_parent.py: what the CLI starts Prefect's temporary API server with, in a session of
    its own (a terminal's Ctrl-C must not reach it): a kill -9 of the CLI must not leave it running."""
    starter = ("import os, subprocess, sys; from infra.system import with_parent; "
               "p = subprocess.Popen(with_parent.command(os.getpid(), 'http.server', '0', '--bind', '127.0.0.1'), "
               "start_new_session=True, stdout=open(sys.argv[1], 'w'), stderr=subprocess.STDOUT); "
               "print(p.pid, flush=True); os.kill(os.getpid(), 9)")
    log = tmp_path / "child.log"
    out = subprocess.run([sys.executable, "-c", starter, str(log)], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == -signal.SIGKILL, out.stderr
    child = int(out.stdout.strip())
    try:
        poll_until(lambda: gone(child) or None, deadline=Deadline(60), interval=0.2,
                   what=f"the module run (pid {child}) to stop after its starter was killed")
        assert "is gone; stopping" in log.read_text(), log.read_text()  # stopped by its watch
    finally:
        if not gone(child):
            os.killpg(child, signal.SIGKILL)


def test_a_command_runs_to_its_end_through_a_ctrl_c_at_the_terminal(tmp_path):
    # A terminal's Ctrl-C is a SIGINT to the whole foreground process group. The CLI handles it
    # (releases, then exits 130); a command it runs meanwhile (squeue, scancel) must not die of it.
    # The stand-in for the CLI leads its own group, handles SIGINT (a handler, not SIG_IGN, which a
    # child would inherit), and runs a 2 s command; the group gets SIGINT while the command sleeps.
    script = ("import signal, sys; signal.signal(signal.SIGINT, lambda *_: None); "
              "from infra.system.commands import run_command; "
              "print('started', flush=True); "
              f"r = run_command(['sh', '-c', 'touch {tmp_path}/asleep; sleep 2; echo done'], timeout=30, check=False); "
              "print(r.returncode, r.stdout.strip(), flush=True)")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout.readline().strip() == "started"
        poll_until(lambda: (tmp_path / "asleep").exists() or None, deadline=Deadline(30), interval=0.05,
                   what="the command to start")
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert out.strip() == "0 done", f"the command was cut short by the terminal's Ctrl-C: {out!r}"
