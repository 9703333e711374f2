"""One run at a time per run id (infra/run/lease.py): the lease on the local store and on moto's S3
server over HTTP, racing takers, a holder that stops renewing, a holder that lost its lease and
writes nothing more (its store is fenced), and two real CLI runs on one output (one allocation,
one refusal naming the holder, every record once), then a kill -9 of the holder and a retry once
its lease expired, and a holder stopped past its TTL that fails instead of overwriting."""

from __future__ import annotations

import hashlib
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

from benchmarks.fault_harness import stop_between_writes
from infra.deadline import Deadline, poll_until
from infra.errors import LeaseLost, RunLeaseHeld
from infra.run.layout import LEASE_NAME
from infra.run.lease import LeaseRecord, RunLease
from infra.storage.local import LocalOutputStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request, tmp_path):
    if request.param == "local":
        return LocalOutputStore(tmp_path / "out" / "run-1")
    from infra.storage.s3_output import S3OutputStore

    bucket = request.getfixturevalue("s3_bucket")
    settings = request.getfixturevalue("s3_settings")
    return S3OutputStore.from_uri(f"s3://{bucket}/out", "run-1", settings.s3, settings.work_path("staging"), client=request.getfixturevalue("s3_client"))


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
        alive.stop_renewing(10)  # the holder stops renewing (hung, or its host is gone)
        stopped = poll_until(lambda: _try(store, "calm-heron"), deadline=Deadline(30), interval=0.3,
                             what="the stopped holder's lease to expire")
        assert LeaseRecord.from_json(store.read_bytes(LEASE_NAME)).holder == stopped.holder
        assert not alive.renew() and alive.lost
    finally:
        alive.release()  # lost: leaves the new holder's lease alone
        if stopped is not None:
            assert LeaseRecord.from_json(store.read_bytes(LEASE_NAME)).holder == stopped.holder
            stopped.release()


def staged(store, name: str, data: bytes) -> tuple[Path, str]:
    """A part written where publish_file takes it from."""
    path = store.staging_dir() / f".{name}.staged.tmp"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def test_a_holder_that_lost_its_lease_writes_nothing_more(store):
    """D4 (review 2): a holder stopped past its TTL wakes up after another run took the lease over.
    Its heartbeat has not run (nothing set `lost`), yet its next write of any kind is refused,
    naming the new holder, and the new holder's objects are untouched."""
    stopped = lease(store, "brave-otter", ttl_s=0.5).acquire(heartbeat=False)
    mine = stopped.fenced()
    mine.write_bytes("part-00000.jsonl", b"first holder\n")
    time.sleep(0.7)  # past the TTL without a renewal: as if SIGSTOPped
    taker = lease(store, "calm-heron").acquire(heartbeat=False)
    store.write_bytes("part-00000.jsonl", b"new holder\n")
    path, sha = staged(store, "part-00001.jsonl", b"first holder\n")
    writes = {"part": lambda: mine.write_bytes("part-00000.jsonl", b"first holder, again\n"),
              "manifest": lambda: mine.write_bytes("manifest.json", b"{}"),
              "publish": lambda: mine.publish_file("part-00001.jsonl", path, sha),
              "staging": mine.staging_dir, "preflight": mine.preflight, "uploads": mine.abort_incomplete_uploads}
    for what, write in writes.items():
        with pytest.raises(LeaseLost) as caught:
            write()
        message = str(caught.value)
        assert "'calm-heron'" in message and taker.holder in message and "'brave-otter'" in message, (what, message)
        assert "\n" not in message and store.uri(LEASE_NAME) in message, message
    assert stopped.lost
    assert store.read_bytes("part-00000.jsonl") == b"new holder\n" and store.read_bytes("manifest.json") is None
    assert "part-00001.jsonl" not in store.list_names()
    assert mine.read_bytes("part-00000.jsonl") == b"new holder\n" and "part-00000.jsonl" in mine.list_names()  # reads pass
    stopped.release()  # lost: leaves the new holder's lease alone
    assert LeaseRecord.from_json(store.read_bytes(LEASE_NAME)).holder == taker.holder
    taker.release()
    with pytest.raises(LeaseLost, match="finished or released it since"):  # gone since: still not ours
        mine.write_bytes("manifest.json", b"{}")
    assert store.read_bytes(LEASE_NAME) is None and store.read_bytes("manifest.json") is None


def test_a_retry_of_the_same_flow_run_fences_the_attempt_it_replaced(store):
    """A fresh heartbeat is no proof: every write compares the stored record with this acquisition."""
    old = lease(store, "brave-otter").acquire(heartbeat=False)
    fenced = old.fenced()
    fenced.write_bytes("run.json", b"{}")
    retry = lease(store, "brave-otter").acquire(heartbeat=False)  # the same flow run takes its lease back
    with pytest.raises(LeaseLost, match="'brave-otter'"):
        fenced.write_bytes("part-00000.jsonl", b"old attempt\n")
    assert store.read_bytes("part-00000.jsonl") is None
    retry.fenced().write_bytes("part-00000.jsonl", b"retry\n")
    retry.release()


def test_a_late_holder_nobody_took_over_renews_at_its_next_write(store):
    """A starved heartbeat alone is no loss: the write renews the lease by compare-and-swap, then goes ahead."""
    late = lease(store, "brave-otter", ttl_s=0.5).acquire(heartbeat=False)
    acquired = late.record
    time.sleep(0.7)  # expired, but no run took it
    late.fenced().write_bytes("part-00000.jsonl", b"late\n")
    record = LeaseRecord.from_json(store.read_bytes(LEASE_NAME))
    assert record.token == acquired.token and record.renewed_at > acquired.renewed_at and not late.lost
    assert store.read_bytes("part-00000.jsonl") == b"late\n"
    late.release()
    assert store.read_bytes(LEASE_NAME) is None


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
        from infra.storage.s3_output import S3OutputStore

        bucket, settings = request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_settings")
        output_uri, env = f"s3://{bucket}/out", {"NSDG_S3__ENDPOINT_URL": settings.s3.endpoint_url,
                                                 "NSDG_S3__ADDRESSING_STYLE": "path"}
        store = S3OutputStore.from_uri(output_uri, "shared", settings.s3, settings.work_path("staging"))
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


@pytest.mark.integration
@pytest.mark.prefect_server
def test_a_holder_stopped_past_its_ttl_fails_instead_of_overwriting(prefect_server, tmp_path):
    """D4 (review 2), through the CLI: the holder is stopped (SIGSTOP) after its first part until
    its lease expires, and another run takes the lease. Continued, the holder publishes nothing
    more, releases its server and exits 1 with one line naming the new holder."""
    src = prompts(tmp_path, 30)
    store = LocalOutputStore(tmp_path / "out" / "shared")
    holder = start_cli(prefect_server, tmp_path, "a", src, ttl_s=3, NSDG_SERVER__MAX_IN_FLIGHT="1")
    taker = None
    try:
        poll_until(lambda: store.read_bytes("part-00000.jsonl.state.json") is not None or None, deadline=Deadline(180),
                   interval=0.1, what="the holder's first part", describe_last=lambda: f"exit code {holder.poll()}")
        stop_between_writes(holder.pid, tmp_path / "out" / "shared")
        taker = poll_until(lambda: _try(store, "calm-heron"), deadline=Deadline(60), interval=0.2,
                           what="the stopped holder's lease to expire")
        published = {name: store.read_bytes(name) for name in store.list_names()}
        os.kill(holder.pid, signal.SIGCONT)
        out, err = holder.communicate(timeout=300)
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait(timeout=30)
    assert holder.returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("nemotron-sdg run: LeaseLost:") and "'calm-heron'" in last and taker.holder in last, last
    assert {name: store.read_bytes(name) for name in store.list_names()} == published  # nothing written after the loss
    assert "manifest.json" not in published
    assert allocations(tmp_path, "a") == 1 and "releasing replica 0" in err, err[-3000:]
    assert LeaseRecord.from_json(store.read_bytes(LEASE_NAME)).holder == taker.holder  # the loser left it alone
    taker.release()
