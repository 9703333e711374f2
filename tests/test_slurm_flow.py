"""The generate flow on the real local Slurm cluster: the seed's job shape (-N 2,
--ntasks-per-node=8, --gpus-per-node=8, 16 ranks), runtime `none`, the server command replaced
by the project's NeMo-compatible server (rank 0 serves, the other ranks idle as NeMo's do)."""

import json
import sys
import threading

import pytest

from flows.generate import generate
from infra.deadline import Deadline, poll_until
from infra.errors import DeadlineExceeded, ServerLost, ServerNotReady
from infra.slurm.client import SlurmClient
from tests.fixtures_slurm import simulated_server_command, slurm_test_env
from tests.ports import free_port

pytestmark = [pytest.mark.slurm, pytest.mark.integration]


@pytest.fixture
def slurm_env(slurm_cluster, prefect_harness, workdir, monkeypatch):
    # prefect_harness: the session's API for the in-process flows (alone, each would start an ephemeral one)
    port = free_port(span=8)  # launch k (replicas, then restarts) listens on port + k
    for name, value in slurm_test_env(workdir, port).items():
        monkeypatch.setenv(name, value)

    def server_command(*extra):
        monkeypatch.setenv("NSDG_SERVER__COMMAND", json.dumps(simulated_server_command(*extra)))

    return server_command


def prompts(path, n):
    path.write_text("".join(json.dumps({"id": f"s{i}", "prompt": f"slurm prompt {i}"}) + "\n" for i in range(n)))
    return str(path)


def our_jobs(run_id: str) -> list:
    """Jobs of this test's run (other runs may share the cluster)."""
    return [j for j in SlurmClient().active_jobs() if j.name.startswith("nsdg-") and f"run={run_id} " in (j.comment or "")]


def test_full_flow_on_two_nodes(slurm_env, workdir):
    src = prompts(workdir / "in.jsonl", 30)
    result = generate(input_uri=src, output_uri="out", run_id="slurm-ok", profile="test2x8", shard_size=10, batch_size=8)
    manifest = json.loads((workdir / "out" / "slurm-ok" / "manifest.json").read_text())
    assert manifest["records_written"] == 30 and len(manifest["slurm_job_ids"]) == 1
    ids = [json.loads(l)["id"] for p in manifest["parts"] for l in (workdir / "out" / "slurm-ok" / p["name"]).read_text().splitlines()]
    assert ids == [f"s{i}" for i in range(30)]
    assert result["records_written"] == 30
    job_dir = next((workdir / "jobs" / "slurm-ok").iterdir())
    out = next(job_dir.glob("*.out")).read_text()
    assert out.count("SLURM_PROCID=") == 16 or len(list(job_dir.glob("*.out"))) == 1
    assert not our_jobs("slurm-ok")


def test_server_that_fails_at_start(slurm_env, workdir, monkeypatch):
    monkeypatch.setenv("NSDG_SERVER__COMMAND", json.dumps(["python3", "-c", "import sys; print('model load failed: bad checkpoint', file=sys.stderr); sys.exit(3)"]))
    with pytest.raises(ServerNotReady) as exc:
        generate(input_uri=prompts(workdir / "in.jsonl", 3), output_uri="out", run_id="slurm-fail", profile="test2x8")
    msg = str(exc.value)
    assert "FAILED" in msg and "bad checkpoint" in msg
    assert not our_jobs("slurm-fail")


RANK0_FAILS_OTHERS_CHATTER = """
import os, signal, sys, time
if os.environ["SLURM_PROCID"] == "0":
    print("ERROR could not listen on 0.0.0.0:1424: [Errno 98] Address already in use", file=sys.stderr, flush=True)
    time.sleep(0.5)
    sys.exit(1)
def chatter(*_):
    for i in range(10):
        print(f"rank {os.environ['SLURM_PROCID']}: shutting down step {i}", file=sys.stderr, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, chatter)
time.sleep(120)
"""


def test_first_failing_rank_is_named_although_the_others_log_after_it(slurm_env, workdir, monkeypatch):
    """Rank 0 fails; srun stops the other 15, which log 150 lines after it: the error still shows."""
    monkeypatch.setenv("NSDG_SERVER__COMMAND", json.dumps([sys.executable, "-c", RANK0_FAILS_OTHERS_CHATTER]))
    with pytest.raises(ServerNotReady) as exc:
        generate(input_uri=prompts(workdir / "in.jsonl", 3), output_uri="out", run_id="slurm-rank0", profile="test2x8")
    assert "Address already in use" in str(exc.value) and "first error lines" in str(exc.value)
    assert not our_jobs("slurm-rank0")


def test_job_that_never_starts_times_out_with_reason(slurm_env, workdir, monkeypatch):
    monkeypatch.setenv("NSDG_SERVER__READY_TIMEOUT_S", "6")
    with pytest.raises(DeadlineExceeded) as exc:
        generate(input_uri=prompts(workdir / "in.jsonl", 3), output_uri="out", run_id="slurm-pending", profile="test3x8")
    assert "PENDING" in str(exc.value) and "reason" in str(exc.value)
    assert not our_jobs("slurm-pending")


def cancel_after_first_part(run_dir, only_one: bool = False) -> threading.Thread:
    run_id = run_dir.name

    job_logs = run_dir.parent.parent / "jobs" / run_id  # slurm_env's NSDG_SLURM__JOB_ROOT

    def serving_job() -> str | None:
        # A job whose rank 0 has answered the readiness probe and a real batch: cancelling one that is
        # still starting (the other replica published first) would test a never-ready replica instead.
        for err in job_logs.glob("*/*.err"):
            if err.read_text(errors="replace").count('"PUT /generate HTTP/1.1" 200') >= 2:
                return err.stem.rsplit("-", 1)[-1]
        return None

    def cancel():
        poll_until(lambda: True if list(run_dir.glob("part-*.state.json")) else None,
                   deadline=Deadline(120), interval=0.2, what="the first published part")
        if only_one:
            job_id = poll_until(serving_job, deadline=Deadline(60), interval=0.1, what="a job serving batches")
            SlurmClient().cancel(job_id)
            return
        for job in our_jobs(run_id):
            SlurmClient().cancel(job.job_id)

    killer = threading.Thread(target=cancel, daemon=True)
    killer.start()
    return killer


def test_scancel_from_outside_mid_generation(slurm_env, workdir):
    slurm_env("--extra-latency", "0.3")
    run_dir = workdir / "out" / "slurm-cut"
    src = prompts(workdir / "in.jsonl", 200)
    killer = cancel_after_first_part(run_dir)
    with pytest.raises(ServerLost) as exc:
        generate(input_uri=src, output_uri="out", run_id="slurm-cut", profile="test2x8", shard_size=10, batch_size=5,
                 max_server_restarts=0)
    killer.join(timeout=5)
    assert "CANCELLED" in str(exc.value)
    import hashlib
    states = list(run_dir.glob("part-*.state.json"))
    assert states
    for state in states:
        info = json.loads(state.read_text())
        assert hashlib.sha256((run_dir / info["name"]).read_bytes()).hexdigest() == info["sha256"]
    assert not (run_dir / "manifest.json").exists()
    assert not our_jobs("slurm-cut")


@pytest.mark.faults
def test_scancel_from_outside_is_recovered_with_a_new_job(slurm_env, workdir):
    slurm_env("--extra-latency", "0.2")
    run_dir = workdir / "out" / "slurm-heal"
    killer = cancel_after_first_part(run_dir)
    generate(input_uri=prompts(workdir / "in.jsonl", 120), output_uri="out", run_id="slurm-heal", profile="test2x8",
             shard_size=10, batch_size=5)
    killer.join(timeout=5)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert len(manifest["slurm_job_ids"]) == 2  # the cancelled job and its replacement
    ids = [json.loads(l)["id"] for p in manifest["parts"] for l in (run_dir / p["name"]).read_text().splitlines()]
    assert ids == [f"s{i}" for i in range(120)]  # every record exactly once, in order
    assert not our_jobs("slurm-heal")


def test_two_replicas_one_cancelled_from_outside(slurm_env, workdir):
    """K = 2 one-node replicas (one per node); one job is cancelled mid-run: its shards go back to
    the queue, a replacement joins, every record lands exactly once and no job is left."""
    slurm_env("--extra-latency", "0.2")
    run_dir = workdir / "out" / "slurm-rep"
    killer = cancel_after_first_part(run_dir, only_one=True)
    generate(input_uri=prompts(workdir / "in.jsonl", 120), output_uri="out", run_id="slurm-rep", profile="test1x8",
             shard_size=10, batch_size=5, replicas=2)
    killer.join(timeout=5)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    ids = [json.loads(l)["id"] for p in manifest["parts"] for l in (run_dir / p["name"]).read_text().splitlines()]
    assert ids == [f"s{i}" for i in range(120)]
    assert manifest["server_restarts"] == 1 and len(manifest["slurm_job_ids"]) == 3
    assert all(r["gpu_hours"] > 0 for r in manifest["replicas"])
    assert not our_jobs("slurm-rep")
