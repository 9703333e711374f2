"""The pool's planned rollovers (flows/replicas.py's Pool has these methods): start a replica's
successor ahead of its allocation's end, hand over when the end comes, and report what the
rollovers cost. The decisions themselves are pure, in infra/backends/rollover.py."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from infra.errors import ConfigError
from infra.backends.rollover import RolloverReport, check_time_limit, gap_s, lead_s, overlap_s, successor_due

if TYPE_CHECKING:
    from flows.replicas import Replica

log = logging.getLogger(__name__)


class Rollovers:
    """Mixed into Pool: uses its rollover policy, measurements, queue and launch."""

    def _plan_successor(self, rep: Replica) -> None:
        """Start the replica's successor once its end is nearer than the lead (queue wait + load +
        one shard, measured on this run): from then on it may take over. Not before the replica
        has served and its own predecessor is gone: a lead longer than the limit would otherwise
        start a successor for every job as soon as it is ready, each dropped before it served."""
        if not self.rollover.enabled or rep.ended:
            return
        rep.end = rep.backend.ends_at()  # read again while it serves: a limit shortened from outside is seen
        if rep.successor is not None or not rep.shards or (rep.predecessor and rep.predecessor.state != "released"):
            return
        now = time.time()
        if not successor_due(now, rep.end, self.measured, self.rollover) or self._queue_empty():
            return
        if (refused := self._no_successor(rep)) is not None:
            if not rep.capped:
                log.warning("replica %d: %s ends in %.0f s and no successor is started for it: %s",
                            rep.index, rep.backend.status(), rep.end - now, refused)
                rep.capped = True
            return
        self.rollovers += 1
        log.info("replica %d: %s ends in %.0f s (lead %.0f s: queue wait %.0f s + load %.0f s + shard %.0f s, with "
                 "margins); starting its successor (rollover %d of at most %d)", rep.index, rep.backend.status(),
                 rep.end - now, lead_s(self.measured, self.rollover), self.measured.queue_wait_s, self.measured.load_s,
                 self.measured.shard_s or 0.0, self.rollovers, self.rollover.max_rollovers)
        self._launch(rep.index, predecessor=rep)

    def _no_successor(self, rep: Replica) -> str | None:
        """Why no successor may be started for the replica, if none may."""
        if self.rollovers >= self.rollover.max_rollovers:
            return (f"max_rollovers={self.rollover.max_rollovers} successors were started already (raise "
                    "NSDG_SLURM__MAX_ROLLOVERS or NSDG_SLURM__TIME_LIMIT)")
        try:
            check_time_limit(self.measured, self.rollover)
        except ConfigError as exc:
            return str(exc)
        return None

    def _ended(self, rep: Replica, why: str) -> bool:
        """The replica's allocation ended (or is ending) by schedule: release it; its shards come
        back to the queue as they are collected. Its successor takes over, started now if it was
        not yet. False when no successor may be started (max_rollovers): then it is a lost server.
        A limit too short for load + one shard is refused (ConfigError) before that successor is
        submitted: it would load the model and be dropped in turn."""
        successor = rep.successor if rep.successor is not None and rep.successor.state != "released" else None
        if successor is None and self.rollovers >= self.rollover.max_rollovers:
            return False
        if successor is None:
            check_time_limit(self.measured, self.rollover)
        rep.ended = why
        self._retire(rep, f"planned rollover: {why}")
        if successor is None:
            self.rollovers += 1
            log.warning("replica %d: %s before a successor was started; starting one now (rollover %d of at most %d); "
                        "its shards go back to the queue", rep.index, why, self.rollovers, self.rollover.max_rollovers)
            self._launch(rep.index, predecessor=rep)
            rep.successor.handover.ready_in_time = False
        elif successor.state != "ready":
            successor.handover.ready_in_time = False
            log.warning(
                "replica %d: %s before its successor (%s) was ready: its unfinished shards go back to the queue and "
                "nothing is lost, but the GPUs idle until the successor is ready. The time limit leaves less than "
                "queue wait + load + one shard (%.0f + %.0f + %.0f s, measured): raise NSDG_SLURM__TIME_LIMIT.",
                rep.index, why, successor.backend.status(), self.measured.queue_wait_s, self.measured.load_s, self.measured.shard_s or 0.0)
        return True

    def rollover_report(self, gpus: int) -> dict:
        """Rollovers, the GPU-hours both allocations were held at once, and the idle gap between
        the old replica's last shard and its successor's first."""
        report = RolloverReport()
        for rep in self.members:
            if rep.handover is None:
                continue
            old = rep.predecessor
            rep.handover.new_jobs = list(rep.backend.job_ids)
            rep.handover.overlap_s = overlap_s(rep.backend.running_at(), old.released_at)
            rep.handover.gap_s = gap_s(old.last_finish(), rep.first_start())
            report.handovers.append(rep.handover)
        return report.summary(gpus)
