"""K server replicas working through one queue of shards.

Every replica is its own allocation (a Slurm job, a local process, an attached URL). They are
started together and waited on independently; generation starts on the first one ready and each
other joins as it becomes ready. Each ready replica keeps `max_in_flight` shard tasks running
(nemo-generate: the server serves one request at a time, one computing, one queued; openai-completions:
the requests in flight are the replica's client pool's, and these shard tasks only keep it fed:
flows.generate.shard_tasks_per_replica). A replica that dies or
hangs is released, its unfinished shards go back to the queue, and it is replaced while the run's
`max_server_restarts` allows. A replica is released as soon as the queue is empty and its last
shard is done, not when the slowest replica finishes; every replica is released on every exit.

A replica whose allocation has an end (a Slurm time limit) rolls over (flows/rollovers.py): ahead
of the end a successor is started for it; the old one keeps serving beside it (both are paid
for), takes no shard it cannot finish in time, and is released once its successor is ready and
its own end leaves no room for another shard. A job that ends first gives its shards back to the
queue; either way it is planned, not a failure, and uses `max_rollovers`, never `max_server_restarts`.

A release that fails (a Slurm job still listed after KillWait, scancel refused) is logged and
kept on the replica's summary, never raised: the others are still released, a lost replica is
still replaced, and the run still finishes its manifest. A ready replica that has sent nothing
for `keep_alive_s` gets a 1-token request, so its idle ranks never reach NCCL's timeout.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prefect.futures import PrefectFuture

from flows.replica import Replica
from flows.rollovers import RolloverPlanner
from infra.backends import PROBE_TIMEOUT_S, Backend
from infra.backends.rollover import Handover, mean_shard_s
from infra.errors import DeadlineExceeded, ServerLost, ServerNotReady, ServerThrottled, TransientServerError
from infra.generation import ShardResult, responsive_threads
from infra.prompting.dataset import Shard

log = logging.getLogger(__name__)

# A replica that was serving and then died or hung: its shards go back to the queue. A request
# still queued in a released replica's client fails as ServerLost too (infra.engines.openai); a
# server that throttles (ServerThrottled) answers, so it is never one of these.
LOST = (ServerLost, TransientServerError)
# A replica that never became ready: fatal only when no other replica can do the work.
NEVER_READY = (ServerNotReady, DeadlineExceeded)
# What a feed of shards yields when nothing is ready now but more will come (a streaming pipeline's
# later stage waits on shards in flight: flows/pipeline_stream.py): no shard handed out, not the end.
WAIT = object()


@dataclass
class Pool:
    """The replicas of one run and the shard queue they share."""

    make_backend: Callable[[int, int], Backend]  # (launch number, replica index) -> backend
    start: Callable[[Backend], PrefectFuture]        # allocate, then submit the readiness wait
    submit: Callable[[object, Shard, Backend], PrefectFuture]
    release: Callable[[Backend], None]
    shards: Iterator[Shard]
    replicas: int
    max_in_flight: int
    restarts_allowed: int
    on_result: Callable[[ShardResult], None] = lambda r: None
    keep_alive_s: float = 3600.0
    ping: Callable[[object], None] = lambda client: client.keep_alive(PROBE_TIMEOUT_S)
    planner: RolloverPlanner = field(default_factory=RolloverPlanner)  # rollovers off unless given a policy (Slurm)
    launched: int = 0  # launches so far: a new backend's launch number
    report_first: bool = False  # results reported before the feed is asked again (a pipeline's stream)
    switch_interval_s: float | None = None  # the GIL switch interval while generating (None: the interpreter's)
    # How a failing pool gives its replicas back (None: `release`): a job `release` would keep for a
    # later stage's server (flows/pipeline.py serve) is released instead, not swapped to be dropped after.
    release_failed: Callable[[Backend], None] | None = None
    members: list[Replica] = field(default_factory=list)
    retired: list[Replica] = field(default_factory=list)
    requeued: deque = field(default_factory=deque)
    results: list[ShardResult] = field(default_factory=list)
    restarts: int = 0
    first_ready: float | None = None
    last_result_at: float | None = None
    _exhausted: bool = False
    _unreported: deque = field(default_factory=deque)
    _pinger: concurrent.futures.ThreadPoolExecutor | None = None

    def run(self) -> list[ShardResult]:
        try:
            with responsive_threads(self.switch_interval_s):  # a freed request slot is used at once (infra/generation.py)
                for i in range(self.replicas):
                    self._launch(i)
                while not self._finished():
                    self._step()
            return self.results
        except BaseException:
            self.release_all(failed=True)
            raise
        finally:
            if self._pinger is not None:
                self._pinger.shutdown(wait=False)

    # --- the loop ----------------------------------------------------------------------------

    def _step(self) -> None:
        for rep in self._active():
            if rep.state == "starting" and rep.ready_future.wrapped_future.done():
                self._became_ready(rep)
        for rep in self._active():
            if rep.state == "ready":
                self.planner.plan_successor(rep, self._launch, self._queue_empty)
                self._fill(rep)
        starting = [r.ready_future for r in self._active() if r.state == "starting"]
        # Shards of released replicas are still collected: they come back to the queue.
        running = [f for rep in self.members for f in rep.in_flight]
        if not any(f.wrapped_future.done() for f in running):
            pending = [f.wrapped_future for f in [*running, *starting] if not f.wrapped_future.done()]
            if pending:
                concurrent.futures.wait(pending, timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED)
            else:
                time.sleep(0.05)
        for rep in list(self.members):
            for fut in [f for f in rep.in_flight if f.wrapped_future.done()]:
                self._collect(rep, fut)
        # Refill before reporting: a slow progress update must not leave a server idle. A pipeline's
        # results are reported first: each can make its children's shards ready, which the feed hands
        # out before its own stage's next shard (deepest first); the shards still in flight keep the
        # server busy meanwhile.
        if self.report_first:
            self._report()
        for rep in self._active():
            if rep.state == "ready":
                self._fill(rep)
        self._report()
        self._keep_idle_alive()
        for rep in list(self._active()):
            # As soon as the queue is empty and its own last shard is done: not when the slowest
            # replica finishes. (A replica lost later is replaced within max_server_restarts.)
            if not rep.in_flight and self._queue_empty():
                self._retire(rep, "queue empty" if rep.state == "ready" else "queue empty before it was ready")
            elif (not rep.in_flight and rep.successor is not None and rep.successor.state == "ready"
                  and not self.planner.admits_shard(rep, 0)):
                self._retire(rep, f"rolled over: its end is near and its successor ({rep.successor.backend.status()}) "
                                  "serves")
            elif rep.state == "ready" and not rep.in_flight and rep.end is not None and time.time() >= rep.end:
                why = f"{rep.backend.status()} reached its end with no shard left to finish"
                if not self.planner.ended(rep, why, self._retire, self._launch):
                    self._lose(rep, ServerLost(f"replica {rep.index}: {why}, and max_rollovers allows no successor"))

    def _report(self) -> None:
        while self._unreported:
            self.on_result(self._unreported.popleft())

    def _launch(self, index: int, predecessor: Replica | None = None) -> None:
        # The backend gets the launch number: a replacement must not reuse the port (or the job
        # directory) of the server it replaces, which may still be shutting down. The replica
        # index picks an attached server's URL: a replacement re-attaches to the same one.
        rep = Replica(index, self.make_backend(self.launched, index), predecessor=predecessor)
        self.launched += 1
        if predecessor is not None:
            predecessor.successor = rep
            rep.handover = Handover(index, list(predecessor.backend.job_ids), [], predecessor.end)
        self.members.append(rep)
        rep.ready_future = self.start(rep.backend)
        if rep.handover is not None:
            rep.handover.new_jobs = list(rep.backend.job_ids)

    def _became_ready(self, rep: Replica) -> None:
        try:
            rep.client = rep.ready_future.result()
        except NEVER_READY as exc:
            self._retire(rep, f"never became ready: {exc}")
            if rep.predecessor is not None and rep.predecessor.successor is rep:
                rep.predecessor.successor = None  # another may be planned, within max_rollovers
            if not self._active():
                raise
            log.warning("replica %d never became ready (%s); going on with the others", rep.index, exc)
            return
        rep.ready_at = rep.last_active = time.time()
        self.first_ready = self.first_ready or rep.ready_at
        # What a successor's lead time plans for: a job adopted already running (a pipeline's kept job) had
        # no queue wait here, and its load is its generator's restart, not the levels before it.
        since = rep.held_since()
        self.planner.measured.allocation(since - rep.started if since else None, rep.ready_at - (since or rep.started))
        if rep.handover is not None:
            old_end = rep.predecessor.end or rep.handover.old_end
            if rep.handover.ready_in_time is None:  # False already when the old job's end came first
                rep.handover.ready_in_time = not rep.predecessor.lost and (old_end is None or rep.ready_at <= old_end)
        log.info("replica %d ready at %s", rep.index, rep.backend.url())

    def _fill(self, rep: Replica) -> None:
        # Beside a ready successor too, until its own end is near: both allocations are paid for.
        while (len(rep.in_flight) < self.max_in_flight
               and self.planner.admits_shard(rep, len(rep.in_flight))
               and (shard := self._next_shard()) is not None):
            rep.in_flight[self.submit(rep.client, shard, rep.backend)] = shard
            rep.last_active = time.time()

    def _collect(self, rep: Replica, fut: PrefectFuture) -> None:
        shard = rep.in_flight.pop(fut)
        rep.last_active = time.time()
        try:
            result = fut.result()
        except LOST as exc:
            self.requeued.append(shard)
            if rep.state != "released":
                self._lose(rep, exc)
            return
        rep.records += result.part.records
        rep.shards += 1
        rep.intervals.append((result.started_at, result.finished_at))
        self.planner.measured.shard_s = mean_shard_s(sum(r.busy_seconds() for r in self.members), sum(r.shards for r in self.members))
        self.last_result_at = max(self.last_result_at or 0.0, result.finished_at)
        self.results.append(result)
        self._unreported.append(result)

    def _lose(self, rep: Replica, exc: BaseException) -> None:
        """Release the replica (its other shards then fail fast and are requeued) and replace it.
        One whose allocation ended by schedule (its time limit) is a planned rollover instead."""
        if self.planner.enabled and (why := rep.backend.scheduled_end()) is not None and self.planner.ended(rep, why, self._retire, self._launch):
            return
        rep.lost = True
        self._retire(rep, f"lost: {exc}")
        if self.restarts >= self.restarts_allowed:
            if not any(r.state != "released" for r in self.members):
                raise exc
            log.warning("replica %d lost and no restart left (%d used); the others go on", rep.index, self.restarts)
            return
        self.restarts += 1
        log.warning("replica %d lost (%s); starting a replacement (restart %d of %d)",
                    rep.index, exc, self.restarts, self.restarts_allowed)
        self._launch(self._replacement_index(rep.index))

    def _replacement_index(self, lost: int) -> int:
        """The replica a replacement stands for: the lost one's, except for attached servers,
        where one released healthy (queue empty, while another still ran) is known to answer
        and costs nothing to attach again; the lost one's URL answers again only if its owner
        restarts it."""
        busy = {r.index for r in self._active()}
        healthy = [r.index for r in reversed(self.retired) if r.backend.name == "attach" and r.ready_at is not None
                   and not r.lost and r.index not in busy]
        return healthy[0] if healthy else lost

    def _retire(self, rep: Replica, why: str, failed: bool = False) -> None:
        """Release it (`failed`: the pool is failing, `release_failed` if given). A failed release is
        logged and kept, never raised: raising here would abort the pool, kill the other replicas'
        work and lose the manifest of a finished run."""
        if rep.state == "released":
            return
        log.info("releasing replica %d: %s", rep.index, why)
        try:
            (self.release_failed if failed and self.release_failed is not None else self.release)(rep.backend)
        except Exception as exc:
            rep.release_error = f"{type(exc).__name__}: {exc}"
            log.error("releasing replica %d (%s) failed: %s; the run goes on", rep.index, rep.backend.status(), exc)
        finally:
            rep.released_at = time.time()
            # Its shards, if any, fail fast now; they are requeued as they are collected. Requests still
            # queued in its client's pool (openai-completions) are dropped, not sent to a released server.
            if (close := getattr(rep.client, "close", None)) is not None:
                close()
            self.retired.append(rep)

    def _keep_idle_alive(self) -> None:
        """A 1-token request to each ready replica idle for keep_alive_s (off the loop's thread);
        one that gets no answer is lost like a replica whose shard got none."""
        for rep in self._active():
            if rep.keep_alive is not None and rep.keep_alive.done():
                fut, rep.keep_alive = rep.keep_alive, None
                if (exc := fut.exception()) is not None and not isinstance(exc, ServerThrottled):
                    self._lose(rep, exc)
                    continue
                # Only 429/503 is an answer too: a busy server is not a lost one.
                log.info("replica %d answered its keep-alive%s", rep.index, f" only with 429/503: {exc}" if exc else "")
            if (rep.state == "ready" and not rep.in_flight and rep.keep_alive is None
                    and time.time() - rep.last_active >= self.keep_alive_s):
                log.info("replica %d idle for %.0f s: sending a 1-token keep-alive", rep.index, time.time() - rep.last_active)
                if self._pinger is None:
                    self._pinger = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="keep-alive")
                rep.keep_alive = self._pinger.submit(self.ping, rep.client)
                rep.last_active = time.time()

    def release_all(self, failed: bool = False) -> None:
        """Every replica, on every exit (`failed`: the pool's run raised); then wait for every shard
        task so none still publishes."""
        for rep in self.members:
            self._retire(rep, "run failing" if failed else "run ending", failed)  # never raises: every replica gets its release
        concurrent.futures.wait([f.wrapped_future for rep in self.members for f in rep.in_flight])

    # --- the queue ---------------------------------------------------------------------------

    def _next_shard(self) -> Shard | None:
        if self.requeued:
            return self.requeued.popleft()
        if self._exhausted:
            return None
        shard = next(self.shards, None)
        self._exhausted = shard is None
        return None if shard is WAIT else shard

    def _queue_empty(self) -> bool:
        """No shard left to hand out, now or later: shards still running on a released replica
        will come back to the queue."""
        if self.requeued or any(rep.in_flight for rep in self.members if rep.state == "released"):
            return False
        if not self._exhausted:
            # Peek: pull the next shard into the requeue so "empty" is exact.
            shard = next(self.shards, None)
            if shard is None:
                self._exhausted = True
            elif shard is WAIT:
                return False
            else:
                self.requeued.append(shard)
                return False
        return True

    def _no_work_left(self) -> bool:
        return self._queue_empty() and not any(rep.in_flight for rep in self.members)

    def _active(self) -> list[Replica]:
        return [r for r in self.members if r.state != "released"]

    def _finished(self) -> bool:
        if any(rep.in_flight for rep in self.members):
            return False
        if self._no_work_left():
            for rep in self._active():
                self._retire(rep, "queue empty")
            return True
        if not self._active():
            if self.restarts >= self.restarts_allowed:
                raise ServerLost("every replica is gone and work remains; rerun with the same run_id to finish")
            self.restarts += 1
            log.warning("no replica left and work remains; starting one (restart %d of %d)", self.restarts, self.restarts_allowed)
            self._launch(self._replacement_index(self.retired[-1].index if self.retired else 0))
        return False
