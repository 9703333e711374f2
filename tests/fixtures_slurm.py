"""The local 2-node Slurm cluster as a pytest fixture (load with `pytest_plugins` or `-p`).

`slurm_cluster` (session scope) runs infra/cluster/start-local-slurm.sh, which is idempotent
and quick when the cluster is already up, and yields where it lives. At the end of the session
it cancels this session's jobs still queued (named `nsdg-...`, running under its temporary
directories or the directory it runs in); the daemons keep running,
because starting them again is slow. Tests name their jobs `nsdg-...` so nothing leaks.

`slurm_test_env(root, port, *server_args)` is the settings of a flow on that cluster, for every
test that runs one: the test profiles (`TEST_PROFILES`, the seed's 2x8 shape and its 1- and 3-node
variants), runtime `none`, jobs under `root/jobs`, this checkout on the ranks' PYTHONPATH, and the
server command replaced by the project's simulated NeMo-compatible server.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from infra.system.commands import run_command
from infra.system.paths import is_under
from infra.errors import CommandError
from infra.slurm.client import SlurmClient

REPO_ROOT = Path(__file__).resolve().parents[1]
START_SCRIPT = REPO_ROOT / "infra" / "cluster" / "start-local-slurm.sh"
START_TIMEOUT_S = 300.0  # includes an apt-get install on a bare machine
JOB_PREFIX = "nsdg-"
TEST_PROFILES = {
    "test2x8": {"backend": "slurm", "nodes": 2, "gpus_per_node": 8, "tensor_parallel": 8, "pipeline_parallel": 2},
    "test3x8": {"backend": "slurm", "nodes": 3, "gpus_per_node": 8, "tensor_parallel": 8, "pipeline_parallel": 3},
    "test1x8": {"backend": "slurm", "nodes": 1, "gpus_per_node": 8, "tensor_parallel": 8, "pipeline_parallel": 1},
}


def simulated_server_command(*server_args: str, listen: str = "{port}") -> list[str]:
    """The project's NeMo-compatible server (simulated engine) as a job's server command. `{port}` is
    each launch's own port (launch k, a replica or a restart, listens on NSDG_SERVER__PORT + k)."""
    return [sys.executable, "-m", "infra.local_server", "serve-local", "--engine", "simulated",
            "--host", "0.0.0.0", "--port", listen, *server_args]


def slurm_job_env(**extra: str) -> str:
    """NSDG_SLURM__ENV: the job gets none of this process's PYTHONPATH, so this checkout is named for
    the ranks' Python; `extra` adds variables."""
    return json.dumps({"PYTHONPATH": str(REPO_ROOT), **extra})


def slurm_test_env(root: Path, port: int, *server_args: str, profiles: dict | None = None, listen: str = "{port}",
                   simulated_server: bool = True) -> dict[str, str]:
    """The NSDG_* settings of a flow on the local cluster, jobs under `root/jobs` (a 10-minute limit).
    `server_args` go to the simulated server; without `simulated_server` the engine's own command is
    kept (the vllm stand-ins)."""
    env = {
        "NSDG_EXTRA_PROFILES": json.dumps(TEST_PROFILES if profiles is None else profiles),
        "NSDG_SLURM__CONTAINER_RUNTIME": "none",
        "NSDG_SLURM__JOB_ROOT": str(root / "jobs"),
        "NSDG_SLURM__TIME_LIMIT": "00:10:00",
        "NSDG_SLURM__ENV": slurm_job_env(),
        "NSDG_SERVER__PORT": str(port),
        "NSDG_SERVER__READY_TIMEOUT_S": "120",
    }
    if simulated_server:
        env["NSDG_SERVER__COMMAND"] = json.dumps(simulated_server_command(*server_args, listen=listen))
    elif server_args:
        raise ValueError("server_args are for the simulated server")
    return env


@dataclass(frozen=True)
class LocalSlurmCluster:
    state_dir: Path
    partition: str = "debug"
    nodes: tuple[str, ...] = ("node1", "node2")
    gpus_per_node: int = 8
    client: SlurmClient = field(default_factory=SlurmClient)

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"


def _controller_answers() -> bool:
    if shutil.which("scontrol") is None:
        return False
    try:
        return "UP" in run_command(["scontrol", "ping"], timeout=15, check=False).stdout
    except CommandError:
        return False


def cancel_test_jobs(client: SlurmClient, roots: list[Path], prefix: str = JOB_PREFIX) -> list[str]:
    """Cancel this session's leftover jobs: named `nsdg-...` and running under one of `roots` (its
    temporary directories, the directory it runs in), so a second session's jobs are left alone."""
    roots = [root.resolve() for root in roots]
    ids = [job.job_id for job in client.active_jobs()
           if job.name.startswith(prefix) and any(is_under(job.work_dir, root) for root in roots)]
    for job_id in ids:
        client.cancel(job_id)
    return ids


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[LocalSlurmCluster]:
    state_dir = Path(os.environ.get("NSDG_SLURM_STATE_DIR", "/var/lib/nsdg-slurm"))
    if os.geteuid() == 0:
        try:
            # The daemons it may start outlive the session by design: not marked as this run's processes.
            daemons_env = {k: v for k, v in os.environ.items() if k != "NEMOTRON_SDG_TEST_RUN"}
            run_command(["bash", str(START_SCRIPT)], timeout=START_TIMEOUT_S, env=daemons_env)
        except CommandError as exc:
            pytest.fail(f"The local Slurm cluster did not start:\n{exc}\n{exc.stderr[-3000:]}", pytrace=False)
    elif not _controller_answers():
        pytest.skip(f"no Slurm controller answers and {START_SCRIPT.name} needs root to start one")
    cluster = LocalSlurmCluster(state_dir=state_dir)
    yield cluster
    try:
        cancel_test_jobs(cluster.client, [tmp_path_factory.getbasetemp(), Path.cwd()])
    except CommandError as exc:  # cleanup must not hide the tests' own result
        print(f"fixtures_slurm: could not cancel leftover {JOB_PREFIX}* jobs: {exc}")
