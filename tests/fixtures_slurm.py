"""The local 2-node Slurm cluster as a pytest fixture (load with `pytest_plugins` or `-p`).

`slurm_cluster` (session scope) runs infra/cluster/start-local-slurm.sh, which is idempotent
and quick when the cluster is already up, and yields where it lives. At the end of the session
it cancels this session's jobs still queued (named `nsdg-...`, running under its temporary
directories or the directory it runs in); the daemons keep running,
because starting them again is slow. Tests name their jobs `nsdg-...` so nothing leaks.
"""

from __future__ import annotations

import os
import shutil
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
