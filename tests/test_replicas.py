"""Several server replicas sharing one run's shards."""

import json
import os
import signal
import threading

import pytest

from infra.deadline import Deadline, poll_until

from flows.generate import generate
from tests.localserver import running_server

pytestmark = pytest.mark.integration


def prompts(path, n):
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"replica prompt {i}"}) + "\n" for i in range(n)))
    return str(path)


def read_run(run_dir):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    ids = [json.loads(l)["id"] for p in manifest["parts"] for l in (run_dir / p["name"]).read_text().splitlines()]
    return manifest, ids


def test_two_local_replicas_share_the_queue(prefect_harness, workdir, monkeypatch):
    monkeypatch.setenv("NSDG_LOCAL__ENGINE", "simulated")
    monkeypatch.setenv("NSDG_LOCAL__EXTRA_ARGS", json.dumps(["--extra-latency", "0.05"]))
    generate(input_uri=prompts(workdir / "in.jsonl", 120), output_uri="out", run_id="rep2", shard_size=10,
             batch_size=5, replicas=2)
    manifest, ids = read_run(workdir / "out" / "rep2")
    assert ids == [f"p{i}" for i in range(120)]
    per = {r["replica"]: r for r in manifest["replicas"]}
    assert set(per) == {0, 1} and sum(r["records"] for r in per.values()) == 120
    assert all(r["records"] > 0 and r["busy_fraction"] is not None for r in per.values())


def test_a_replica_that_dies_is_replaced(prefect_harness, workdir, monkeypatch):
    monkeypatch.setenv("NSDG_LOCAL__ENGINE", "simulated")
    monkeypatch.setenv("NSDG_LOCAL__EXTRA_ARGS", json.dumps(["--extra-latency", "0.1"]))
    run_dir = workdir / "out" / "rep-die"
    server_dir = workdir / ".nemotron-sdg" / "servers" / "rep-die" / "replica-0"

    def serving() -> bool:  # past its 1-token readiness probe, generating batches of 5
        log = server_dir / "server.log"
        return log.exists() and "5 sentences" in log.read_text()

    def kill_replica_0():  # rank 0 of one replica killed mid-run
        poll_until(lambda: True if serving() else None, deadline=Deadline(60), interval=0.05,
                   what="replica 0 to serve a batch")
        os.killpg(int((server_dir / "pgid").read_text().split()[0]), signal.SIGKILL)

    killer = threading.Thread(target=kill_replica_0, daemon=True)
    killer.start()
    generate(input_uri=prompts(workdir / "in.jsonl", 100), output_uri="out", run_id="rep-die", shard_size=5,
             batch_size=5, replicas=2)
    killer.join(timeout=5)
    manifest, ids = read_run(run_dir)
    assert manifest["server_restarts"] == 1
    assert ids == [f"p{i}" for i in range(100)]
    assert len(manifest["replicas"]) == 3  # two started, one replacement


def test_attach_to_a_list_of_servers(prefect_harness, workdir, monkeypatch):
    with running_server(workdir, "--engine", "simulated") as (url_a, _), running_server(workdir, "--engine", "simulated") as (url_b, _):
        monkeypatch.setenv("NSDG_SERVER__URLS", json.dumps([url_a, url_b]))
        generate(input_uri=prompts(workdir / "in.jsonl", 40), output_uri="out", run_id="att", profile="attach",
                 shard_size=5, batch_size=5)
    manifest, ids = read_run(workdir / "out" / "att")
    assert ids == [f"p{i}" for i in range(40)]
    assert len(manifest["replicas"]) == 2 and manifest["slurm_job_ids"] == []
