"""An idle ready replica gets a 1-token request every server.keep_alive_s (issue 11: NeMo's idle
ranks die at megatron_gpt_eval.py's 5 h NCCL timeout). The pool's idle check against a real
local server; no other replica state is faked than the idle time."""

import time

import pytest

from flows.replica import Replica
from flows.replicas import Pool
from infra.backends.attach import AttachBackend
from infra.deadline import Deadline, poll_until
from infra.engines.nemo import NemoClient
from infra.settings import Settings
from tests.localserver import running_server

pytestmark = pytest.mark.integration


def pool(**kw) -> Pool:
    def never(*_):
        raise AssertionError("no launch or shard expected")

    return Pool(make_backend=never, start=never, submit=never, release=lambda backend: backend.release(),
                shards=iter(()), replicas=1, max_in_flight=2, restarts_allowed=0, keep_alive_s=1.0, **kw)


def ready_replica(index: int, url: str, idle_s: float) -> Replica:
    rep = Replica(index, AttachBackend(Settings(server={"url": url})))
    rep.client, rep.ready_at = NemoClient(url), time.time() - idle_s
    rep.last_active = time.time() - idle_s
    return rep


def one_token_requests(log_path) -> int:
    return log_path.read_text().count(": 1 sentences, 1 tokens generated")


def test_an_idle_replica_gets_a_one_token_request_and_a_busy_one_none(tmp_path):
    with running_server(tmp_path, "--engine", "simulated") as (url, _):
        p = pool()
        idle, fresh = ready_replica(0, url, idle_s=2.0), ready_replica(1, url, idle_s=0.0)
        p.members = [idle, fresh]
        before = one_token_requests(tmp_path / "server.log")
        p._keep_idle_alive()
        assert fresh.keep_alive is None and idle.keep_alive is not None
        idle.keep_alive.result(timeout=30)
        poll_until(lambda: True if one_token_requests(tmp_path / "server.log") == before + 1 else None,
                   deadline=Deadline(10), interval=0.05, what="the keep-alive in the server log")
        p._keep_idle_alive()  # collected; not due again for keep_alive_s
        assert idle.keep_alive is None and idle.state == "ready"


def test_a_keep_alive_that_gets_no_answer_loses_the_replica(tmp_path):
    with running_server(tmp_path, "--engine", "simulated") as (url, _):
        alive = ready_replica(1, url, idle_s=0.0)
    dead = ready_replica(0, url, idle_s=2.0)  # its server is gone now
    p = pool()
    p.members = [dead, alive]
    p._keep_idle_alive()
    dead.keep_alive.exception(timeout=30)
    p._keep_idle_alive()
    assert dead.state == "released" and dead.lost and alive.state == "ready"
