"""The held submit on the local Slurm cluster (issue 25): `sbatch --hold`, the id recorded, then
`scontrol release`. A failure between submit and release (the record, the release, a lost sbatch
answer) cancels the held job, which never ran: no allocation is left that no one knows about."""

from __future__ import annotations

import pytest

from infra.deadline import Deadline, poll_until
from infra.errors import CommandError
from infra.settings import Profile, ServerSettings, Settings, SlurmSettings
from infra.slurm.backend import HELD_REASON, SlurmBackend
from infra.slurm.client import SlurmClient
from infra.slurm.spec import JOB_INFO_NAME, SUBMITTED_NAME

pytestmark = pytest.mark.slurm
ONE_NODE = Profile(backend="slurm", nodes=1, gpus_per_node=1, tensor_parallel=1, pipeline_parallel=1)


class SeenAtRelease(SlurmClient):
    """The real client, noting the job's state when the hold is released, and failing there or
    after sbatch on request: the faults a crash or an unanswered controller cause."""

    def __init__(self, *, fail_release: bool = False, lose_sbatch_answer: bool = False):
        super().__init__(command_timeout=30)
        self.fail_release, self.lose_sbatch_answer = fail_release, lose_sbatch_answer
        self.at_release = None
        self.submitted: list[str] = []

    def submit(self, script_path, *, extra_args=()):
        job_id = super().submit(script_path, extra_args=extra_args)
        self.submitted.append(job_id)
        if self.lose_sbatch_answer:
            raise CommandError("`sbatch` timed out after 30 s", argv=["sbatch"], returncode=None, stderr="")
        return job_id

    def release_hold(self, job_id):
        self.at_release = self.state(job_id)
        if self.fail_release:
            raise CommandError("`scontrol release` failed", argv=["scontrol"], returncode=1, stderr="")
        super().release_hold(job_id)


def backend(tmp_path, client: SlurmClient) -> SlurmBackend:
    settings = Settings(_env_file=None, slurm=SlurmSettings(container_runtime="none", job_root=str(tmp_path / "jobs"),
                                                              time_limit="00:05:00"),
                        server=ServerSettings(command=["sleep", "300"]))
    return SlurmBackend(settings, ONE_NODE, run_id="held", client=client)


def gone_or_ended(client: SlurmClient, job_id: str) -> str:
    return poll_until(lambda: (st.state if (st := client.state(job_id)).state != "PENDING" else None),
                      deadline=Deadline(30), interval=0.3, what=f"job {job_id} to leave PENDING")


def test_a_job_is_held_until_its_id_is_recorded_then_runs(slurm_cluster, tmp_path):
    client = SeenAtRelease()
    b = backend(tmp_path, client)
    try:
        b.start()
        assert client.at_release.state == "PENDING" and client.at_release.reason == HELD_REASON
        assert (b.job_dir / SUBMITTED_NAME).read_text().strip() == b.job_id
        poll_until(lambda: True if (b.job_dir / JOB_INFO_NAME).exists() else None, deadline=Deadline(60),
                   interval=0.3, what=f"job {b.job_id} to run after its release")
    finally:
        b.release()


def test_a_failed_release_cancels_the_held_job_before_it_runs(slurm_cluster, tmp_path):
    client = SeenAtRelease(fail_release=True)
    b = backend(tmp_path, client)
    with pytest.raises(CommandError, match="scontrol release"):
        b.start()
    job_id = client.submitted[0]
    assert client.at_release.reason == HELD_REASON
    assert gone_or_ended(client, job_id) in ("CANCELLED", "UNKNOWN")
    assert not (b.job_dir / JOB_INFO_NAME).exists()  # its batch script never ran
    b.release()  # the teardown still finds it recorded, and finds nothing left to do


def test_a_lost_sbatch_answer_leaves_no_held_job(slurm_cluster, tmp_path):
    client = SeenAtRelease(lose_sbatch_answer=True)
    b = backend(tmp_path, client)
    with pytest.raises(CommandError, match="timed out"):
        b.start()
    job_id = client.submitted[0]
    assert b.job_ids == []  # never recorded: the backend found it by its comment and held state
    assert gone_or_ended(client, job_id) in ("CANCELLED", "UNKNOWN")
    assert not (b.job_dir / JOB_INFO_NAME).exists()
