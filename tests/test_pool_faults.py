"""The replica pool under faults the fault table does not run: a release that fails, an attached
server that hiccups, a refused readiness probe (F3, F5). Real local servers; the failed release is injected at
the backend's release (reaching it for real needs a Slurm job stuck RUNNING after scancel)."""

import json
import threading

import pytest

from benchmarks.faults import local_servers
from flows.generate import generate
from infra.backends.attach import AttachBackend
from infra.backends.local import LocalBackend
from infra.backends.ready import wait_until_ready
from infra.deadline import Deadline, poll_until
from infra.errors import ServerFailure, ServerNotReady, SlurmJobError
from infra.settings import Settings
from tests.localserver import running_server
from tests.ports import free_port
from tests.test_replicas import prompts, read_run

pytestmark = pytest.mark.integration


def test_a_failed_release_is_logged_and_the_run_finishes(prefect_harness, workdir, monkeypatch):
    """The first replica to be released stops, then its release raises (as a Slurm release that
    gives up does): the other replica keeps its work, every server is stopped, the manifest is
    published and names the failure."""
    monkeypatch.setenv("NSDG_LOCAL__ENGINE", "simulated")
    monkeypatch.setenv("NSDG_LOCAL__EXTRA_ARGS", json.dumps(["--extra-latency", "0.05"]))
    real_release, failed = LocalBackend.release, []

    def release(self):
        real_release(self)
        if not failed:
            failed.append(self.dir.name)
            raise SlurmJobError("Slurm jobs ['7'] still listed 65 s after scancel. Check `squeue -j 7`.")

    monkeypatch.setattr(LocalBackend, "release", release)
    generate(input_uri=prompts(workdir / "in.jsonl", 60), output_uri="out", run_id="rel-fail", shard_size=5,
             batch_size=5, replicas=2)
    manifest, ids = read_run(workdir / "out" / "rel-fail")
    assert ids == [f"p{i}" for i in range(60)]
    errors = [r["release_error"] for r in manifest["replicas"] if "release_error" in r]
    assert failed and errors == ["SlurmJobError: Slurm jobs ['7'] still listed 65 s after scancel. Check `squeue -j 7`."]
    assert local_servers(workdir) == 0


def test_a_lost_attached_server_is_attached_again_when_it_answers(prefect_harness, workdir, monkeypatch):
    """One attached URL; the server hangs, its owner restarts it on the same port: the run
    re-attaches to it (one restart) and finishes, instead of asking for a second URL."""
    port, marker = free_port(), workdir / "hung"
    args = ["--engine", "simulated", "--port", str(port), "--extra-latency", "0.05"]
    monkeypatch.setenv("NSDG_SERVER__URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NSDG_SERVER__READ_TIMEOUT_S", "2")
    monkeypatch.setenv("NSDG_SERVER__READY_TIMEOUT_S", "60")
    hung = running_server(workdir, *args, "--fault-hang-after", "6", "--fault-once-marker", str(marker))
    restarted = running_server(workdir, *args)
    done, hung_stopped = threading.Event(), threading.Event()

    def owner_restarts_it():  # the hung server is stopped and started again, as its owner would
        poll_until(lambda: True if marker.exists() or done.is_set() else None, deadline=Deadline(60), interval=0.1,
                   what="the hang")
        # Once the run has given up on it: the replacement's readiness poll knocks on its port.
        log, seen = workdir / "server.log", (workdir / "server.log").stat().st_size

        def knocked():
            with open(log, "rb") as f:
                f.seek(seen)
                return True if b'"PUT / HTTP' in f.read() or done.is_set() else None

        poll_until(knocked, deadline=Deadline(60), interval=0.1, what="the run to poll the hung server again")
        hung.__exit__(None, None, None)
        hung_stopped.set()
        if not done.is_set():
            with restarted:
                done.wait(120)

    hung.__enter__()
    owner = threading.Thread(target=owner_restarts_it, daemon=True)
    owner.start()
    try:
        generate(input_uri=prompts(workdir / "in.jsonl", 60), output_uri="out", run_id="att-again", profile="attach",
                 shard_size=5, batch_size=5)
    finally:
        done.set()
        owner.join(timeout=30)
        if not hung_stopped.is_set():  # the run failed before the owner's turn: stop it here
            hung.__exit__(None, None, None)
    manifest, ids = read_run(workdir / "out" / "att-again")
    assert ids == [f"p{i}" for i in range(60)]
    assert manifest["server_restarts"] == 1 and [r["replica"] for r in manifest["replicas"]] == [0, 0]


def test_a_refused_readiness_probe_is_never_ready_at_once(workdir):
    """An HTTP 500 to the 1-token probe ends that replica's wait at once as ServerNotReady (which
    the pool counts as never ready), instead of failing the run or polling for 45 min."""
    with running_server(workdir, "--engine", "simulated", "--fault-500-on", "Hello") as (url, _):
        settings = Settings(server={"url": url, "ready_timeout_s": 600})
        with pytest.raises(ServerNotReady, match="refused the 1-token readiness probe.*HTTP 500") as exc:
            wait_until_ready(AttachBackend(settings), settings)
    assert isinstance(exc.value.__cause__, ServerFailure)


def test_openai_throttling_is_back_pressure_not_a_lost_replica(prefect_harness, workdir, monkeypatch):
    """Review 2, D8: a server that answers every 4th request 503 or 429 (busy): each such request is
    sent again alone, no shard fails, no replica is released as lost, every row is written once."""
    monkeypatch.setenv("NSDG_LOCAL__ENGINE", "simulated")
    monkeypatch.setenv("NSDG_LOCAL__EXTRA_ARGS", json.dumps(["--fault-throttle-every", "4"]))
    monkeypatch.setenv("NSDG_EXTRA_PROFILES", json.dumps({"local-vllm": {"backend": "local", "engine": "vllm"}}))
    monkeypatch.setenv("NSDG_SERVER__MAX_IN_FLIGHT", "4")
    generate(input_uri=prompts(workdir / "in.jsonl", 40), output_uri="out", run_id="oai-busy", profile="local-vllm",
             shard_size=5)
    manifest, ids = read_run(workdir / "out" / "oai-busy")
    assert ids == [f"p{i}" for i in range(40)]
    assert manifest["server_restarts"] == 0 and len(manifest["replicas"]) == 1
    log = next((workdir / ".nemotron-sdg" / "servers" / "oai-busy").glob("replica-*/server.log")).read_text()
    assert '"POST /v1/completions HTTP/1.1" 429' in log and '"POST /v1/completions HTTP/1.1" 503' in log
