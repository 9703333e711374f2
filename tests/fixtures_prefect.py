"""A real Prefect server, a `process` worker and the repo's deployments, as pytest fixtures
(load with `pytest_plugins` or `-p tests.fixtures_prefect`).

    prefect_server   (session) `prefect server start` on a free port: SQLite in its own
                     PREFECT_HOME under a tmp dir, analytics off, PREFECT_SERVER_API_PORT set so
                     the UI advertises the right api_url, the scheduler service off (see below),
                     basic authentication on (PREFECT_SERVER_API_AUTH_STRING, a fresh password
                     per session); `env()` gives clients PREFECT_API_AUTH_STRING, `basic_auth`
                     is for requests
    work_pool        (session) the `nemotron-sdg` process pool (`prefect work-pool create`)
    prefect_worker   (session) `prefect worker start --pool nemotron-sdg` with
                     cwd = the repo root and NSDG_* settings pointing into a tmp dir; the flow
                     runs (its children) inherit them. `kill()` / `start()` for the fault tests
    deployed         (session) `prefect --no-prompt deploy --all` from the repo's prefect.yaml,
                     unedited, then `nemotron-sdg install-automations`; yields the deployments
                     as the API returns them
    smoke_run        (session) one `prefect deployment run 'generate/local-smoke' --watch`

The local-smoke run serves the tiny model (`tiny_model_dir`, the transformers engine), so
the deployment runs as it does on an operator's machine. The Slurm settings in the worker's
environment are tests/fixtures_slurm.py's `slurm_test_env` (a 2-node test profile, runtime none,
the server command replaced by the simulated NeMo-compatible server), plus a short heartbeat
timeout so the dead-man switch fires within seconds.

The scheduler service is off: prefect.yaml's crons (nightly at 02:00, reap every 10 min) would
otherwise start runs in the middle of a test session, and a reap run judges Slurm jobs by what
this server knows. Schedules are still stored and shown; only no runs are created from them.

Every wait is bounded (infra.deadline); at session end the worker and the server are stopped
as process groups, flow-run processes of this server left behind are killed, and Slurm jobs
under the session's job root are cancelled.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import requests

from infra.system.commands import CommandResult, run_command
from infra.deadline import Deadline, poll_until
from infra.errors import CommandError
from infra.system.process import start_process_group, stop_process_group
from tests.fixtures_slurm import TEST_PROFILES, slurm_test_env

REPO = Path(__file__).resolve().parents[1]
POOL = "nemotron-sdg"  # the work pool prefect.yaml names (definitions.site.work_pool_name)
PREFECT = [sys.executable, "-m", "prefect"]
SERVER_START_S = 120.0
WORKER_START_S = 60.0
SMOKE_RUN_S = 300.0
HEARTBEAT_TIMEOUT_S = 15
HEARTBEAT_INTERVAL_S = 2
FLOW_HEARTBEAT_S = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY for the flow runs (Prefect's minimum)
FLOW_RUN_UUID = re.compile(r"UUID: ([0-9a-f-]{36})")
AUTH_USER = "nsdg-test"
# Credentials the worker (so every flow run) holds, set to markers tests/test_secrets.py looks for
# everywhere a run leaves a trace. No worker run uses S3, so fake ones break nothing.
SECRET_MARKERS = {
    "AWS_SECRET_ACCESS_KEY": "MARKER-aws-secret-4b1d",
    "AWS_SESSION_TOKEN": "MARKER-aws-session-9c2e",
    "NSDG_S3__SECRET_ACCESS_KEY": "MARKER-nsdg-secret-77aa",
    "NSDG_S3__SESSION_TOKEN": "MARKER-nsdg-session-31f0",
}


def clean_env() -> dict[str, str]:
    """This process's environment without any PREFECT_* or NSDG_* (the Makefile exports a
    PREFECT_HOME inside the checkout; a developer may have PREFECT_API_URL set)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "NSDG_"))}


def tail_of(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


@dataclass
class PrefectServer:
    """A `prefect server start` with basic authentication on, as docs/operators.md runs it:
    every client here (CLI, worker, flow runs, install-automations, requests) sends `auth_string`."""

    home: Path
    port: int
    log_path: Path
    auth_string: str
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @property
    def basic_auth(self) -> tuple[str, str]:
        """(user, password) for requests: the server compares base64-decoded `user:password` with its string."""
        user, _, password = self.auth_string.partition(":")
        return user, password

    def client_env(self) -> dict[str, str]:
        """What a Prefect client needs to reach this server."""
        return {"PREFECT_API_URL": self.api_url, "PREFECT_API_AUTH_STRING": self.auth_string}

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for a Prefect client of this server (CLI, worker)."""
        return {**clean_env(), "PREFECT_HOME": str(self.home), **self.client_env(),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}

    def cli(self, *args: str, timeout: float = 120.0, check: bool = True) -> CommandResult:
        """`prefect ARGS` from the repo root against this server."""
        return run_command([*PREFECT, *args], timeout=timeout, check=check, env=self.env(), cwd=str(REPO))

    # --- the REST API -------------------------------------------------------------------------
    def get(self, path: str):
        reply = requests.get(f"{self.api_url}{path}", auth=self.basic_auth, timeout=10)
        reply.raise_for_status()
        return reply.json()

    def post(self, path: str, body: dict | None = None):
        reply = requests.post(f"{self.api_url}{path}", json=body or {}, auth=self.basic_auth, timeout=10)
        reply.raise_for_status()
        return reply.json() if reply.content else None

    def deployment(self, flow: str, name: str) -> dict:
        return self.get(f"/deployments/name/{flow}/{name}")

    def flow_run(self, run_id: str) -> dict:
        return self.get(f"/flow_runs/{run_id}")

    def state_type(self, run_id: str) -> str:
        return (self.flow_run(run_id).get("state") or {}).get("type", "")

    def wait_state(self, run_id: str, types: set[str], seconds: float) -> dict:
        def reached():
            run = self.flow_run(run_id)
            return run if (run.get("state") or {}).get("type") in types else None

        return poll_until(reached, deadline=Deadline(seconds), interval=0.5,
                          what=f"flow run {run_id} to reach {sorted(types)}",
                          describe_last=lambda: f"state {self.state_type(run_id)}")

    def logs(self, run_id: str) -> list[str]:
        body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200}
        return [entry["message"] for entry in self.post("/logs/filter", body)]

    def wait_log(self, run_id: str, needle: str, seconds: float) -> str:
        def found():
            return next((m for m in self.logs(run_id) if needle in m), None)

        return poll_until(found, deadline=Deadline(seconds), interval=0.5,
                          what=f"a log line with {needle!r} in flow run {run_id}")

    def artifacts(self, run_id: str) -> list[dict]:
        return self.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})

    def health(self) -> bool | None:
        try:
            return True if requests.get(f"{self.api_url}/health", timeout=2).ok else None
        except requests.RequestException:
            return None


def start_server(home: Path, port: int) -> PrefectServer:
    server = PrefectServer(home=home, port=port, log_path=home / "server.log",
                           auth_string=f"{AUTH_USER}:{secrets.token_urlsafe(18)}")
    env = {
        **server.env(),
        "PREFECT_SERVER_API_AUTH_STRING": server.auth_string,  # in the environment, never on the command line
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),  # `--port` alone leaves the UI pointing at 4200
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL")
    server.proc = start_process_group([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                      log_path=server.log_path, env=env, cwd=str(home))

    def up():
        if server.proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {server.proc.returncode}:\n{tail_of(server.log_path)}")
        return server.health()

    poll_until(up, deadline=Deadline(SERVER_START_S), interval=0.5, what=f"the Prefect server on port {port}",
               describe_last=lambda: tail_of(server.log_path, 10))
    return server


@dataclass
class PrefectWorker:
    server: PrefectServer
    root: Path
    env: dict[str, str]
    name: str = "nsdg-test-worker"
    proc: subprocess.Popen | None = None
    starts: int = 0
    server_port: int = 0

    @property
    def out_dir(self) -> Path:
        return self.root / "out"

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    @property
    def log_path(self) -> Path:
        return self.root / f"worker-{self.starts}.log"

    def log_tail(self, lines: int = 60) -> str:
        return tail_of(self.log_path, lines)

    def start(self) -> None:
        self.starts += 1
        self.proc = start_process_group([*PREFECT, "worker", "start", "--pool", POOL, "--name", self.name],
                                        log_path=self.log_path, env=self.env, cwd=str(REPO))
        started_after = time.time() - 1

        def online():
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect worker exited with code {self.proc.returncode}:\n{self.log_tail()}")
            workers = self.server.post(f"/work_pools/{POOL}/workers/filter")
            return next((w for w in workers if w["name"] == self.name and w["status"] == "ONLINE"
                         and _epoch(w["last_heartbeat_time"]) >= started_after), None)

        poll_until(online, deadline=Deadline(WORKER_START_S), interval=0.5, what=f"worker {self.name} to be online",
                   describe_last=lambda: self.log_tail(10))

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, grace=5.0)  # SIGTERM may leave a worker hanging: SIGKILL follows
            self.proc = None

    def kill(self) -> None:
        """SIGKILL the worker (its flow runs live in their own sessions and keep going)."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    def ensure_running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()


def _epoch(timestamp: str | None) -> float:
    if not timestamp:
        return 0.0
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def flow_run_processes(api_url: str) -> list:
    """Processes running a flow run of the server at `api_url` (`python -m prefect.engine`
    with PREFECT__FLOW_RUN_ID in its environment)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if "prefect.engine" not in " ".join(proc.info["cmdline"] or []):
                continue
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if env.get("PREFECT_API_URL") == api_url and env.get("PREFECT__FLOW_RUN_ID"):
            found.append((proc, env["PREFECT__FLOW_RUN_ID"]))
    return found


def cancel_jobs_under(root: Path) -> list[str]:
    """Cancel every Slurm job whose working directory is under `root` (this session's jobs)."""
    if shutil.which("squeue") is None:
        return []
    from infra.system.paths import is_under
    from infra.slurm.client import SlurmClient

    try:
        ids = [job.job_id for job in SlurmClient().active_jobs() if is_under(job.work_dir, root.resolve())]
        if ids:
            run_command(["scancel", *ids], timeout=30, check=False)
        return ids
    except CommandError as exc:
        print(f"fixtures_prefect: could not cancel jobs under {root}: {exc}")
        return []


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[PrefectServer]:
    from tests.ports import free_port

    home = tmp_path_factory.mktemp("prefect-home")
    server = start_server(home, free_port())
    try:
        yield server
    finally:
        if server.proc is not None:
            stop_process_group(server.proc, grace=10.0)


@pytest.fixture(scope="session")
def work_pool(prefect_server) -> str:
    """The `process` work pool prefect.yaml names, created as an operator does before deploying."""
    prefect_server.cli("work-pool", "create", POOL, "--type", "process")
    return POOL


@pytest.fixture(scope="session")
def prefect_worker(prefect_server, work_pool, tiny_model_dir, tmp_path_factory) -> Iterator[PrefectWorker]:
    from tests.ports import free_port

    root = tmp_path_factory.mktemp("prefect-runs")
    port = free_port()
    env = prefect_server.env(
        PREFECT_WORKER_QUERY_SECONDS="2",  # pick scheduled runs up within 2 s, not 10
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(FLOW_HEARTBEAT_S),
        NSDG_OUTPUT_URI=str(root / "out"),
        NSDG_WORK_DIR=str(root / "work"),
        NSDG_LOCAL__MODEL_DIR=str(tiny_model_dir),
        **slurm_test_env(root, port, "--extra-latency", "0.3", profiles={"test2x8": TEST_PROFILES["test2x8"]},
                         listen=str(port)),
        NSDG_SLURM__HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_TIMEOUT_S),
        NSDG_SLURM__HEARTBEAT_INTERVAL_S=str(HEARTBEAT_INTERVAL_S),
        **SECRET_MARKERS,
    )
    worker = PrefectWorker(server=prefect_server, root=root, env=env, server_port=port)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
        for proc, _ in flow_run_processes(prefect_server.api_url):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        cancel_jobs_under(worker.jobs_dir)


@pytest.fixture(scope="session")
def deployed(prefect_server, work_pool) -> dict[str, dict]:
    """`prefect --no-prompt deploy --all` from the repo root, as an operator runs it."""
    result = prefect_server.cli("--no-prompt", "deploy", "--all", timeout=180, check=False)
    assert result.returncode == 0, f"`prefect deploy --all` failed:\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
    names = {"generate": ["nightly", "on-demand", "local-smoke"], "pipeline": ["pipeline-example"], "reap": ["reap"]}
    # Then the zombie-run automation, as docs/operators.md says, for the worker's heartbeat.
    run_command([sys.executable, "-m", "flows.cli", "install-automations", "--heartbeat-s", str(FLOW_HEARTBEAT_S)],
                timeout=120, env=prefect_server.env(), cwd=str(REPO))
    try:
        return {name: prefect_server.deployment(flow, name) for flow, group in names.items() for name in group}
    except requests.HTTPError as exc:
        raise AssertionError(f"{exc}; `prefect deploy --all` printed:\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}")


@dataclass(frozen=True)
class DeploymentRun:
    flow_run_id: str
    returncode: int
    output: str
    seconds: float


def run_deployment(server: PrefectServer, name: str, *args: str, timeout: float) -> DeploymentRun:
    """`prefect deployment run NAME ARGS --watch`: waits for the end of the run."""
    t = time.monotonic()
    result = server.cli("deployment", "run", name, *args, "--watch", "--watch-timeout", str(int(timeout)),
                        timeout=timeout + 60, check=False)
    output = result.stdout + result.stderr
    match = FLOW_RUN_UUID.search(output)
    if match is None:
        raise AssertionError(f"`prefect deployment run {name}` printed no flow-run id:\n{output[-3000:]}")
    return DeploymentRun(match.group(1), result.returncode, output, time.monotonic() - t)


def start_deployment(server: PrefectServer, name: str, *args: str) -> str:
    """`prefect deployment run NAME ARGS` without waiting: returns the flow-run id."""
    result = server.cli("deployment", "run", name, *args, timeout=120)
    match = FLOW_RUN_UUID.search(result.stdout)
    if match is None:
        raise AssertionError(f"`prefect deployment run {name}` printed no flow-run id:\n{result.stdout[-3000:]}")
    return match.group(1)


def run_dir_of(worker: PrefectWorker, flow_run_id: str, base: Path | None = None) -> Path:
    """Where a run's output lands: `<output>/<created>-<first 8 of the flow-run id>`."""
    base = base or worker.out_dir
    found = sorted(base.glob(f"*-{flow_run_id[:8]}"))
    return found[0] if found else base / f"(no run dir for {flow_run_id})"


@pytest.fixture(scope="session")
def smoke_run(prefect_server, prefect_worker, deployed) -> DeploymentRun:
    run = run_deployment(prefect_server, "generate/local-smoke", timeout=SMOKE_RUN_S)
    assert run.returncode == 0, (f"local-smoke did not complete:\n{run.output[-3000:]}\n"
                                 f"--- worker log ---\n{prefect_worker.log_tail()}")
    return run
