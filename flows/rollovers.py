"""The pool's planned rollovers (flows/replicas.py's Pool holds one planner): start a replica's
successor ahead of its allocation's end, hand over when the end comes, and report what the
rollovers cost. The decisions themselves are pure, in infra/backends/rollover.py.

The planner owns the rollover policy, what this run measured (queue wait, load, shard time) and
the count of successors started. What it needs of the pool (launch a successor, retire a
replica, whether the queue is empty, its members) it is given in each call."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flows.replica import Replica
from infra.backends.rollover import (Measured, RolloverPolicy, RolloverReport, admits_shard, check_time_limit, gap_s,
                                     lead_s, overlap_s, successor_due)
from infra.errors import ConfigError

log = logging.getLogger(__name__)

# The pool's calls the planner makes: start a replica for an index as a predecessor's successor
# (it sets predecessor.successor), and release a replica, saying why.
Launch = Callable[[int, Replica], None]
Retire = Callable[[Replica, str], None]


@dataclass
class RolloverPlanner:
    """Plans successors for replicas whose allocation has an end (a Slurm time limit)."""

    policy: RolloverPolicy = field(default_factory=lambda: RolloverPolicy(max_rollovers=0))
    measured: Measured = field(default_factory=Measured)
    rollovers: int = 0  # successors started so far

    @property
    def enabled(self) -> bool:
        return self.policy.enabled

    def admits_shard(self, rep: Replica, in_flight: int) -> bool:
        """Whether the replica may take one more shard (its `in_flight` ones finished first) before its end."""
        return admits_shard(time.time(), rep.end, in_flight, self.measured, self.policy)

    def plan_successor(self, rep: Replica, launch: Launch, queue_empty: Callable[[], bool]) -> None:
        """Start the replica's successor once its end is nearer than the lead (queue wait + load +
        one shard, measured on this run): from then on it may take over. Not before the replica
        has served and its own predecessor is gone: a lead longer than the limit would otherwise
        start a successor for every job as soon as it is ready, each dropped before it served."""
        if not self.enabled or rep.ended:
            return
        rep.end = rep.backend.ends_at()  # read again while it serves: a limit shortened from outside is seen
        if rep.successor is not None or not rep.shards or (rep.predecessor and rep.predecessor.state != "released"):
            return
        now = time.time()
        if not successor_due(now, rep.end, self.measured, self.policy) or queue_empty():
            return
        if (refused := self._no_successor()) is not None:
            if not rep.capped:
                log.warning("replica %d: %s ends in %.0f s and no successor is started for it: %s",
                            rep.index, rep.backend.status(), rep.end - now, refused)
                rep.capped = True
            return
        self.rollovers += 1
        log.info("replica %d: %s ends in %.0f s (lead %.0f s: queue wait %.0f s + load %.0f s + shard %.0f s, with "
                 "margins); starting its successor (rollover %d of at most %d)", rep.index, rep.backend.status(),
                 rep.end - now, lead_s(self.measured, self.policy), self.measured.queue_wait_s, self.measured.load_s,
                 self.measured.shard_s or 0.0, self.rollovers, self.policy.max_rollovers)
        launch(rep.index, rep)

    def _no_successor(self) -> str | None:
        """Why no successor may be started, if none may."""
        if self.rollovers >= self.policy.max_rollovers:
            return (f"max_rollovers={self.policy.max_rollovers} successors were started already (raise "
                    "NSDG_SLURM__MAX_ROLLOVERS or NSDG_SLURM__TIME_LIMIT)")
        try:
            check_time_limit(self.measured, self.policy)
        except ConfigError as exc:
            return str(exc)
        return None

    def ended(self, rep: Replica, why: str, retire: Retire, launch: Launch) -> bool:
        """The replica's allocation ended (or is ending) by schedule: release it; its shards come
        back to the queue as they are collected. Its successor takes over, started now if it was
        not yet. False when no successor may be started (max_rollovers): then it is a lost server.
        A limit too short for load + one shard is refused (ConfigError) before that successor is
        submitted: it would load the model and be dropped in turn."""
        successor = rep.successor if rep.successor is not None and rep.successor.state != "released" else None
        if successor is None and self.rollovers >= self.policy.max_rollovers:
            return False
        if successor is None:
            check_time_limit(self.measured, self.policy)
        rep.ended = why
        retire(rep, f"planned rollover: {why}")
        if successor is None:
            self.rollovers += 1
            log.warning("replica %d: %s before a successor was started; starting one now (rollover %d of at most %d); "
                        "its shards go back to the queue", rep.index, why, self.rollovers, self.policy.max_rollovers)
            launch(rep.index, rep)
            rep.successor.handover.ready_in_time = False
        elif successor.state != "ready":
            successor.handover.ready_in_time = False
            log.warning(
                "replica %d: %s before its successor (%s) was ready: its unfinished shards go back to the queue and "
                "nothing is lost, but the GPUs idle until the successor is ready. The time limit leaves less than "
                "queue wait + load + one shard (%.0f + %.0f + %.0f s, measured): raise NSDG_SLURM__TIME_LIMIT.",
                rep.index, why, successor.backend.status(), self.measured.queue_wait_s, self.measured.load_s,
                self.measured.shard_s or 0.0)
        return True

    def report(self, members: Iterable[Replica], gpus: int) -> dict:
        """Rollovers, the GPU-hours both allocations were held at once, and the idle gap between
        the old replica's last shard and its successor's first."""
        report = RolloverReport()
        for rep in members:
            if rep.handover is None:
                continue
            old = rep.predecessor
            rep.handover.new_jobs = list(rep.backend.job_ids)
            rep.handover.overlap_s = overlap_s(rep.backend.running_at(), old.released_at)
            rep.handover.gap_s = gap_s(old.last_finish(), rep.first_start())
            report.handovers.append(rep.handover)
        return report.summary(gpus)
