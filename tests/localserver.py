"""Start the project's NeMo-compatible server as a real subprocess, for tests."""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import requests

from infra.deadline import Deadline, poll_until
from infra.process import start_process_group, stop_process_group


@contextmanager
def running_server(tmp: Path, *args: str, timeout: float = 120.0, env: dict | None = None):
    """Yield (base_url, process). Waits (bounded) for the port file and a listening socket."""
    port_file = tmp / f"port-{time.monotonic_ns()}"
    argv = [sys.executable, "-m", "infra.local_server", "serve-local", "--port", "0", "--port-file", str(port_file), *args]
    proc = start_process_group(argv, log_path=tmp / "server.log", env=env)
    try:
        def up():
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}: {(tmp / 'server.log').read_text()[-2000:]}")
            if not port_file.exists() or not port_file.read_text().strip():
                return None
            url = f"http://127.0.0.1:{int(port_file.read_text())}"
            try:
                requests.put(url + "/", timeout=2)
            except requests.ConnectionError:
                return None
            return url

        url = poll_until(up, deadline=Deadline(timeout), interval=0.1, what="the local server to listen")
        yield url, proc
    finally:
        stop_process_group(proc, grace=5)
        assert proc.poll() is not None


def is_running(proc: subprocess.Popen) -> bool:
    return proc.poll() is None
