"""One run at a time per run id (infra/lease.py): the lease on the local store and on moto's S3
server over HTTP, racing takers, a holder that stops renewing, and two real CLI runs on one
output (one allocation, one refusal naming the holder, every record once), then a kill -9 of
the holder and a retry once its lease expired."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from infra.deadline import Deadline, poll_until
from infra.errors import RunLeaseHeld
from infra.lease import LEASE_NAME, LeaseRecord, RunLease
from infra.storage import LocalOutputStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request, tmp_path):
    if request.param == "local":
        return LocalOutputStore(tmp_path / "out" / "run-1")
    from infra.s3 import S3OutputStore

    bucket = request.getfixturevalue("s3_bucket")
    settings = request.getfixturevalue("s3_settings")
    return S3OutputStore.from_uri(f"s3://{bucket}/out", "run-1", settings, client=request.getfixturevalue("s3_client"))


def lease(store, name: str, ttl_s: float = 60.0) -> RunLease:
    return RunLease(store, holder=str(uuid.uuid5(uuid.NAMESPACE_DNS, name)), holder_name=name, ttl_s=ttl_s)


def test_a_second_run_is_refused_naming_the_holder_until_the_first_releases(store):
    first = lease(store, "brave-otter").acquire()
    try:
        with pytest.raises(RunLeaseHeld) as refused:
            lease(store, "calm-heron").acquire(heartbeat=False)
        message = str(refused.value)
        assert "'brave-otter'" in message and first.holder in message and store.uri(LEASE_NAME) in message
        assert "expires in" in message and "another run_id" in message
        assert LeaseRecord.from_json(store.read_bytes(LEASE_NAME)).holder == first.holder  # untouched
    finally:
        first.release()
    assert store.read_bytes(LEASE_NAME) is None
    second = lease(store, "calm-heron").acquire(heartbeat=False)
    second.release()
    first.release()  # idempotent


def test_the_same_flow_run_takes_its_own_lease_back_at_once(store):
    crashed = lease(store, "brave-otter").acquire(heartbeat=False)  # never released: as if killed
    retry = lease(store, "brave-otter").acquire(heartbeat=False)  # prefect flow-run retry: same flow run id
    assert not crashed.renew() and crashed.lost  # the old acquisition cannot renew over the new one
    retry.release()
    assert store.read_bytes(LEASE_NAME) is None


def test_the_heartbeat_keeps_the_lease_past_its_ttl_and_a_stopped_holder_loses_it(store):
    alive = lease(store, "brave-otter", ttl_s=1.5).acquire()
    stopped = None
    try:
        time.sleep(3.5)  # more than twice the ttl: only the renewals keep it
        with pytest.raises(RunLeaseHeld):
            lease(store, "calm-heron").acquire(heartbeat=False)
        renewed = LeaseRecord.from_json(store.read_bytes(LEASE_NAME))
        assert renewed.renewed_at > alive.record.acquired_at and renewed.token == alive.record.token
        alive._stop.set()  # the holder stops renewing (hung, or its host is gone)
        alive._thread.join(timeout=10)
        stopped = poll_until(lambda: _try(store, "calm-heron"), deadline=Deadline(30), interval=0.3,
                             what="the stopped holder's lease to expire")
        assert LeaseRecord.from_json(store.read_bytes(LEASE_NAME)).holder == stopped.holder
        assert not alive.renew() and alive.lost
    finally:
        alive.release()  # lost: leaves the new holder's lease alone
        if stopped is not None:
            assert LeaseRecord.from_json(store.read_bytes(LEASE_NAME)).holder == stopped.holder
            stopped.release()


def _try(store, name: str):
    try:
        return lease(store, name).acquire(heartbeat=False)
    except RunLeaseHeld:
        return None


def race(store, prefix: str, n: int = 6) -> tuple[list[RunLease], list[str]]:
    """`n` threads try to acquire at the same moment: (the leases won, the refusals)."""
    barrier = threading.Barrier(n)
    won, refused = [], []

    def take(i):
        barrier.wait()
        try:
            won.append(lease(store, f"{prefix}-{i}").acquire(heartbeat=False))
        except RunLeaseHeld as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return won, refused


def test_racing_takers_of_an_expired_lease_one_wins(store):
    lease(store, "brave-otter", ttl_s=0.01).acquire(heartbeat=False)
    time.sleep(0.05)
    won, refused = race(store, "taker")
    assert len(won) == 1 and len(refused) == 5, (won, refused)
    assert LeaseRecord.from_json(store.read_bytes(LEASE_NAME)).holder == won[0].holder
    won[0].release()


def test_racing_creators_one_wins(store):
    won, refused = race(store, "creator")
    assert len(won) == 1 and len(refused) == 5, (won, refused)
    won[0].release()


# --- two real CLI runs on one output ---------------------------------------------------------------


def cli_env(prefect_server, tmp_path: Path, name: str, ttl_s: int = 30, **extra: str) -> dict[str, str]:
    return {**os.environ, **prefect_server.client_env(), "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "ph"),
            "NSDG_LOCAL__ENGINE": "simulated", "NSDG_WORK_DIR": str(tmp_path / f"work-{name}"),
            "NSDG_LOCAL__EXTRA_ARGS": json.dumps(["--extra-latency", "0.4"]), "NSDG_RUN_LEASE_TTL_S": str(ttl_s), **extra}


def start_cli(prefect_server, tmp_path: Path, name: str, src: Path, output_uri: str | None = None,
              **env) -> subprocess.Popen:
    argv = [sys.executable, "-m", "flows.cli", "run", "--input-uri", str(src), "--output-uri",
            output_uri or str(tmp_path / "out"), "--run-id", "shared", "--tokens-to-generate", "4", "--batch-size", "2",
            "--shard-size", "6"]
    return subprocess.Popen(argv, cwd=tmp_path, env=cli_env(prefect_server, tmp_path, name, **env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def allocations(tmp_path: Path, name: str) -> int:
    return len(list((tmp_path / f"work-{name}").glob("servers/*/replica-*/server.log")))


def published_ids(store) -> list[str]:
    manifest = json.loads(store.read_bytes("manifest.json"))
    return [json.loads(line)["id"] for part in manifest["parts"]
            for line in store.read_bytes(part["name"]).decode().splitlines()]


def prompts(tmp_path: Path, n: int) -> Path:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"prompt {i}"}) + "\n" for i in range(n)))
    return src


@pytest.mark.integration
@pytest.mark.prefect_server
@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_two_concurrent_cli_runs_one_allocation_one_refusal(where, prefect_server, tmp_path, request):
    src = prompts(tmp_path, 30)
    if where == "s3":
        from infra.s3 import S3OutputStore

        bucket, settings = request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_settings")
        output_uri, env = f"s3://{bucket}/out", {"NSDG_S3__ENDPOINT_URL": settings.s3.endpoint_url,
                                                 "NSDG_S3__ADDRESSING_STYLE": "path"}
        store = S3OutputStore.from_uri(output_uri, "shared", settings)
    else:
        output_uri, env, store = str(tmp_path / "out"), {}, LocalOutputStore(tmp_path / "out" / "shared")
    procs = {name: start_cli(prefect_server, tmp_path, name, src, output_uri, **env) for name in ("a", "b")}
    outs = {name: proc.communicate(timeout=400) for name, proc in procs.items()}
    codes = {name: proc.returncode for name, proc in procs.items()}
    assert sorted(codes.values()) == [0, 2], {n: (codes[n], outs[n][1][-2000:]) for n in codes}
    loser = next(n for n, c in codes.items() if c == 2)
    winner = "b" if loser == "a" else "a"
    refusal = outs[loser][1]
    assert "is already running" in refusal and "holds its lease" in refusal and "Traceback" not in refusal, refusal
    holder = refusal.split("holds its lease")[0].rsplit("(", 1)[1].split(")")[0]
    run = prefect_server.get(f"/flow_runs/{holder}")  # the named holder is the winner's flow run
    assert run["state"]["type"] == "COMPLETED", run
    assert allocations(tmp_path, winner) == 1 and allocations(tmp_path, loser) == 0
    ids = published_ids(store)
    assert sorted(ids) == sorted(f"r{i}" for i in range(30)) and len(ids) == len(set(ids))
    assert store.read_bytes(LEASE_NAME) is None  # the winner gave it back


@pytest.mark.integration
@pytest.mark.prefect_server
def test_kill_9_of_the_holder_lets_a_retry_in(prefect_server, tmp_path):
    """The holder's process is gone from this host: its lease is stale at once (a holder on
    another host, or hung, is waited for until the expiry: the unit tests above)."""
    src = prompts(tmp_path, 30)
    lease_file = tmp_path / "out" / "shared" / LEASE_NAME
    holder = start_cli(prefect_server, tmp_path, "a", src, ttl_s=600)
    try:
        poll_until(lambda: lease_file.exists() or None, deadline=Deadline(180), interval=0.2,
                   what="the first run's lease", describe_last=lambda: f"exit code {holder.poll()}")
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
    record = LeaseRecord.from_json(lease_file.read_bytes())
    assert record.pid == holder.pid and record.expires_at > time.time() + 60  # far from expiring
    retry = start_cli(prefect_server, tmp_path, "b", src, ttl_s=600)
    out, err = retry.communicate(timeout=400)
    assert retry.returncode == 0, err[-3000:]
    assert "stopped renewing" in err and "taken over" in err, err[-3000:]
    ids = published_ids(LocalOutputStore(tmp_path / "out" / "shared"))
    assert sorted(ids) == sorted(f"r{i}" for i in range(30)) and len(ids) == len(set(ids))
    assert not lease_file.exists()


def test_a_live_holder_elsewhere_is_waited_for_until_the_expiry(tmp_path):
    """A lease from another host (or a live process here) is only taken once it expired."""
    store = LocalOutputStore(tmp_path / "out" / "run-1")
    now = time.time()
    other = LeaseRecord("other-run", "far-away", "another-host", 1, "t", now, now, now + 1.0)
    assert store.create_exclusive(LEASE_NAME, other.to_json())
    with pytest.raises(RunLeaseHeld, match="far-away"):
        lease(store, "newcomer").acquire(heartbeat=False)
    taken = poll_until(lambda: _try(store, "newcomer"), deadline=Deadline(30), interval=0.2,
                       what="the other host's lease to expire")
    taken.release()
