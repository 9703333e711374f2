"""Release on Slurm when the cancelled job is slow to leave squeue (F3): COMPLETING lasts as long
as the ranks take to exit, up to the cluster's KillWait (30 s by default), then the epilog. A run
whose every shard is published must still finish its manifest, with every replica released."""

import json
import sys
import uuid

import pytest

from flows.generate import generate
from infra.deadline import Deadline, poll_until
from infra.slurm.backend import DEFAULT_KILL_WAIT_S, kill_wait_s, parse_kill_wait, wait_gone
from infra.slurm.client import SlurmClient
from tests.ports import free_port

PROFILES = {"rel1x8": {"backend": "slurm", "nodes": 1, "gpus_per_node": 8, "tensor_parallel": 8, "pipeline_parallel": 1}}
# Needs 10 s to exit after SIGTERM (a NeMo rank freeing 8 GPUs); the local cluster's KillWait
# (5 s) SIGKILLs it first, so the job stays COMPLETING about 5 s: more than the old 5 s wait.
SLOW_EXIT = "trap 'sleep 10; exit 0' TERM; {cmd} & wait $!; wait"


def test_kill_wait_is_read_from_the_config():
    assert parse_kill_wait("CompleteWait            = 0 sec\nKillWait                = 45 sec\n") == 45.0
    assert parse_kill_wait("slurm_load_ctl_conf error\n") == DEFAULT_KILL_WAIT_S


def our_jobs(run_id: str) -> list:
    return [j for j in SlurmClient().active_jobs() if j.name.startswith("nsdg-") and f"run={run_id} " in (j.comment or "")]


@pytest.mark.slurm
def test_a_cancelled_job_still_completing_counts_as_released(slurm_cluster, tmp_path):
    client = slurm_cluster.client
    assert kill_wait_s(client) == 5.0  # the local cluster's slurm.conf
    script = tmp_path / "slow.sbatch"
    script.write_text(f"#!/bin/bash\n#SBATCH --job-name=nsdg-test-{uuid.uuid4().hex[:8]}\n#SBATCH --output={tmp_path}/%j.log\n"
                      "trap 'sleep 10; exit 0' TERM\nsleep 100 & wait\n")
    job_id = client.submit(script)
    try:
        poll_until(lambda: True if client.state(job_id).state == "RUNNING" else None, deadline=Deadline(60),
                   interval=0.2, what=f"job {job_id} to run")
        client.cancel(job_id)
        assert wait_gone(client, [job_id], 1.0) == [job_id]  # still COMPLETING: released, not an error
        assert wait_gone(client, [job_id], 30.0) == []  # and it does leave, after KillWait
    finally:
        client.cancel(job_id)


@pytest.mark.slurm
@pytest.mark.integration
def test_a_slow_release_does_not_fail_a_finished_run(slurm_cluster, prefect_harness, workdir, monkeypatch):
    """Two one-node replicas, each job ~5 s in COMPLETING: the run finishes with its manifest."""
    cmd = f"{sys.executable} -m infra.local_server serve-local --engine simulated --host 0.0.0.0 --port {{port}} --extra-latency 0.1"
    monkeypatch.setenv("NSDG_EXTRA_PROFILES", json.dumps(PROFILES))
    monkeypatch.setenv("NSDG_SLURM__CONTAINER_RUNTIME", "none")
    monkeypatch.setenv("NSDG_SLURM__JOB_ROOT", str(workdir / "jobs"))
    monkeypatch.setenv("NSDG_SLURM__TIME_LIMIT", "00:05:00")
    monkeypatch.setenv("NSDG_SERVER__PORT", str(free_port(span=8)))
    monkeypatch.setenv("NSDG_SERVER__READY_TIMEOUT_S", "120")
    monkeypatch.setenv("NSDG_SERVER__COMMAND", json.dumps(["bash", "-c", SLOW_EXIT.format(cmd=cmd)]))
    src = workdir / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"s{i}", "prompt": f"slurm prompt {i}"}) + "\n" for i in range(40)))
    result = generate(input_uri=str(src), output_uri="out", run_id="slow-exit", profile="rel1x8", shard_size=10,
                      batch_size=5, replicas=2)
    run_dir = workdir / "out" / "slow-exit"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    ids = [json.loads(l)["id"] for p in manifest["parts"] for l in (run_dir / p["name"]).read_text().splitlines()]
    assert result["records_written"] == 40 and ids == [f"s{i}" for i in range(40)]
    assert len(manifest["slurm_job_ids"]) == 2 and not any("release_error" in r for r in manifest["replicas"])
    assert not our_jobs("slow-exit")
