"""A real PyTriton/Triton server on this machine's CPU serving tests/reward_standin.py: NeMo-Aligner's
reward server contract (model `reward_model`, `sentences` in, `rewards` out) around a stand-in scoring
function. Its Python environment is built once per machine by tools/build-pytriton-venv.sh (`make
pytriton`, which `make test` depends on); the fixture runs that script too, which only prints the
cached interpreter when it is there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from infra.deadline import Deadline, poll_until
from infra.system.process import start_process_group, stop_process_group
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[1]


def pytriton_python() -> str:
    out = subprocess.run(["bash", str(REPO / "tools" / "build-pytriton-venv.sh")], capture_output=True, text=True,
                         timeout=1200, check=False, env={**os.environ, "PYTHON": sys.executable})
    if out.returncode != 0:
        raise RuntimeError(f"tools/build-pytriton-venv.sh failed ({out.returncode}): {out.stderr[-2000:]}")
    return out.stdout.strip().splitlines()[-1]


def _libdir(python: str) -> str:
    """The interpreter's LIBDIR: Triton's Python stub must load this libpython, not the distribution's."""
    return subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                          capture_output=True, text=True, timeout=60, check=True).stdout.strip()


class RewardServer:
    """One stand-in Triton server; `start` and `stop` may be called again (a server lost and replaced)."""

    def __init__(self, python: str, workdir: Path, port: int | None = None):
        self.python, self.workdir = python, workdir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.scored_log = workdir / "scored.jsonl"  # every sentence the model scored, one line each
        self.proc = None
        self.starts = 0

    def start(self) -> "RewardServer":
        self.starts += 1
        log = self.workdir / f"triton-{self.starts}.log"
        # HOME stays: PyTriton's workspace (~/.cache/pytriton, removed at its exit) holds Unix sockets,
        # whose paths must stay under 108 bytes, which a pytest tmp_path can pass.
        env = {**os.environ, "LD_LIBRARY_PATH": _libdir(self.python), "PYTHONPATH": ""}
        self.proc = start_process_group([self.python, str(REPO / "tests" / "reward_standin.py"), str(self.port),
                                         str(self.scored_log)], log_path=log, env=env)

        def up() -> str | None:
            if self.proc.poll() is not None:
                pytest.fail(f"the PyTriton stand-in exited {self.proc.returncode} before its model was ready: "
                            f"{log.read_text(errors='replace')[-1500:]}", pytrace=False)
            try:
                got = requests.get(f"{self.url}/v2/models/reward_model/ready", timeout=2)
                return self.url if got.status_code == 200 else None
            except requests.ConnectionError:
                return None

        poll_until(up, deadline=Deadline(120), interval=0.2, what="the PyTriton stand-in's reward_model to be ready",
                   describe_last=lambda: log.read_text(errors="replace")[-500:] if log.exists() else "")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, grace=10)

    def scored(self) -> list[str]:
        if not self.scored_log.exists():
            return []
        return [json.loads(line)["text"] for line in self.scored_log.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def pytriton_env() -> str:
    return pytriton_python()


@pytest.fixture
def reward_server(pytriton_env, tmp_path):
    server = RewardServer(pytriton_env, tmp_path / "reward-server")
    server.workdir.mkdir(parents=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()
