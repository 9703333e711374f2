"""Start a `/generate` server as a real subprocess, for tests: the project's NeMo-compatible
server (`running_server`) or NeMo's own server code on a local engine (`running_nemo_reference`,
see tests/nemo_reference.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from infra.deadline import Deadline, poll_until
from infra.system.process import start_process_group, stop_process_group
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def running_server(tmp: Path, *args: str, timeout: float = 120.0, env: dict | None = None):
    """Yield (base_url, process) for `serve-local ARGS`, once its port file is written and it answers."""
    port_file = tmp / f"port-{time.monotonic_ns()}"
    argv = [sys.executable, "-m", "infra.local_server", "serve-local", "--port", "0", "--port-file", str(port_file), *args]

    def url() -> str | None:
        text = port_file.read_text().strip() if port_file.exists() else ""
        return f"http://127.0.0.1:{int(text)}" if text else None

    with _serving(argv, tmp / "server.log", url, timeout=timeout, env=env) as served:
        yield served


@contextmanager
def running_nemo_reference(tmp: Path, *args: str, timeout: float = 120.0):
    """Yield (base_url, process) for NeMo's text_generation_server on a local engine (ARGS:
    tests/nemo_reference.py's options) once it answers. Werkzeug binds a port we choose, so
    readiness is the first HTTP reply, as NeMo-Skills and the HF card wait for it."""
    port = free_port()
    argv = [sys.executable, "-m", "tests.nemo_reference", "--port", str(port), *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "FLASK_SKIP_DOTENV": "1"}  # Flask's app.run would otherwise read a .env it finds
    with _serving(argv, tmp / f"nemo-reference-{port}.log", lambda: f"http://127.0.0.1:{port}",
                  timeout=timeout, env=env, cwd=str(REPO)) as served:
        yield served


@contextmanager
def _serving(argv: list[str], log: Path, url: Callable[[], str | None], *, timeout: float,
             env: dict | None = None, cwd: str | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    proc = start_process_group(argv, log_path=log, env=env, cwd=cwd)
    try:
        def up() -> str | None:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}: {log.read_text()[-2000:]}")
            base = url()
            if base is None:
                return None
            try:
                requests.put(base + "/", timeout=2)
            except requests.ConnectionError:
                return None
            return base

        base = poll_until(up, deadline=Deadline(timeout), interval=0.1, what=f"{argv[2]} to listen",
                          describe_last=lambda: log.read_text()[-500:] if log.exists() else "")
        yield base, proc
    finally:
        stop_process_group(proc, grace=5)
        assert proc.poll() is not None


def is_running(proc: subprocess.Popen) -> bool:
    return proc.poll() is None
