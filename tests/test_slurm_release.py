"""Release on Slurm when the cancelled job is slow to leave squeue (F3): COMPLETING lasts as long
as the ranks take to exit, up to the cluster's KillWait (30 s by default), then the epilog."""

import uuid

import pytest

from infra.deadline import Deadline, poll_until
from infra.slurm.backend import DEFAULT_KILL_WAIT_S, kill_wait_s, parse_kill_wait, wait_gone


def test_kill_wait_is_read_from_the_config():
    assert parse_kill_wait("CompleteWait            = 0 sec\nKillWait                = 45 sec\n") == 45.0
    assert parse_kill_wait("slurm_load_ctl_conf error\n") == DEFAULT_KILL_WAIT_S


@pytest.mark.slurm
def test_a_cancelled_job_still_completing_counts_as_released(slurm_cluster, tmp_path):
    client = slurm_cluster.client
    assert kill_wait_s(client) == 5.0  # the local cluster's slurm.conf
    script = tmp_path / "slow.sbatch"
    script.write_text(f"#!/bin/bash\n#SBATCH --job-name=nsdg-test-{uuid.uuid4().hex[:8]}\n#SBATCH --output={tmp_path}/%j.log\n"
                      f"trap 'sleep 10; exit 0' TERM\ntouch {tmp_path}/trapped\nsleep 100 & wait\n")
    job_id = client.submit(script)
    try:
        # RUNNING in squeue can come before the script has set its trap: wait for the script itself.
        poll_until(lambda: True if (tmp_path / "trapped").exists() else None, deadline=Deadline(60),
                   interval=0.2, what=f"job {job_id}'s script to set its TERM trap")
        client.cancel(job_id)
        assert wait_gone(client, [job_id], 1.0) == [job_id]  # still COMPLETING: released, not an error
        assert wait_gone(client, [job_id], 30.0) == []  # and it does leave, after KillWait
    finally:
        client.cancel(job_id)


# The whole flow with two slow-to-exit replicas is the fault table's `slurm_slow_release` row
# (benchmarks/faults.py), run by tests/test_faults.py.
