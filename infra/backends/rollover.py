"""Planned rollover across Slurm time limits: when to submit a replica's successor, which shards
an ending job may still take, and what the rollovers cost. Pure: times in, decisions out.

A job's end is known (Slurm's EndTime, or sooner when its warning signal arrived). From
`end - lead` on, a successor allocation is submitted for the replica, where

    lead = factor * (queue wait + load time + one shard) + margin

measured on this run's own allocations (the largest queue wait and load seen, the run's mean
shard service time). Both allocations are paid for: the old job keeps taking shards until its own
end is near (a shard it cannot finish before its end, with a reserve, is left to the successor),
whatever its successor does, and is released then. A lead longer than the limit (a short limit,
a slow load) would want a successor from a job's first second: a successor's own successor is
planned only once it has served and its predecessor is gone, so a replica holds two jobs at most.
A limit too short for load + one shard (with the same factor and reserve) is refused before a job
is submitted for it (`check_time_limit`): its jobs would load the model and be dropped. Before this
run has loaded the model once, its load time is the policy's prior (slurm.expected_load_s, else the
profile's); the first measured load replaces it. A successor
is planned work, not a failure: it never uses `max_server_restarts`, only `max_rollovers`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from infra.errors import ConfigError


@dataclass(frozen=True)
class RolloverPolicy:
    factor: float = 1.25  # on the measured queue wait + load + shard: they vary from job to job
    margin_s: float = 60.0  # added to the lead, and kept free before the end when admitting a shard
    max_rollovers: int = 50  # planned successors per run: a misconfigured limit cannot submit jobs without end
    limit_s: float | None = None  # the time limit a new job gets (slurm.time_limit); None: no limit
    # A job's load time assumed until this run has measured one: a fresh run's first sbatch is
    # checked against it (slurm.expected_load_s, else the profile's); 0: nothing assumed.
    expected_load_s: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.max_rollovers > 0


@dataclass
class Measured:
    """This run's allocations: how long they queued and loaded, how long a shard takes."""

    queue_wait_s: float = 0.0
    load_s: float = 0.0
    shard_s: float | None = None  # mean service time of one shard; None until one is done

    def allocation(self, queue_wait_s: float | None, load_s: float | None) -> None:
        """One allocation that became ready: the largest seen is the one planned for."""
        if queue_wait_s is not None:
            self.queue_wait_s = max(self.queue_wait_s, queue_wait_s)
        if load_s is not None:
            self.load_s = max(self.load_s, load_s)


def lead_s(measured: Measured, policy: RolloverPolicy) -> float:
    """How long before a job's end its successor is submitted."""
    one = measured.queue_wait_s + measured.load_s + (measured.shard_s or 0.0)
    return policy.factor * one + policy.margin_s


def successor_due(now: float, end: float | None, measured: Measured, policy: RolloverPolicy) -> bool:
    return policy.enabled and end is not None and now >= end - lead_s(measured, policy)


def reserve_s(shard_s: float, policy: RolloverPolicy) -> float:
    """Kept free before a job's end when it takes a shard: the margin, or one more shard where
    that is shorter (a 1-minute job cannot keep a minute free and still serve)."""
    return min(policy.margin_s, policy.factor * shard_s)


def admits_shard(now: float, end: float | None, in_flight: int, measured: Measured, policy: RolloverPolicy) -> bool:
    """Whether a job ending at `end` can take one more shard. The server serves one request at a
    time: a new shard finishes after the `in_flight` ones before it. Unknown end or shard time:
    nothing to judge by, it takes the shard (a job that ends under it gives it back)."""
    if end is None or measured.shard_s is None:
        return True
    finish = now + (in_flight + 1) * measured.shard_s * policy.factor
    return finish + reserve_s(measured.shard_s, policy) <= end


def load_for_check(measured: Measured, policy: RolloverPolicy) -> tuple[float, str]:
    """The load time a limit is judged by, and where it comes from: measured on this run's jobs
    once one loaded, else the prior (a fresh run has measured nothing before its first sbatch)."""
    if measured.load_s > 0:
        return measured.load_s, "measured"
    return policy.expected_load_s, "assumed (NSDG_SLURM__EXPECTED_LOAD_S, else the profile's expected_load_s)"


def shortest_limit_s(measured: Measured, policy: RolloverPolicy) -> float | None:
    """The least time limit in which a job loads and serves one shard (factor and reserve as
    above). A shard not measured yet counts as nothing (the limit is then a lower bound); None
    while neither a load nor a shard is known: nothing to judge by."""
    load, _ = load_for_check(measured, policy)
    if measured.shard_s is None and load <= 0:
        return None
    shard = measured.shard_s or 0.0
    return policy.factor * (load + shard) + reserve_s(shard, policy)


def check_time_limit(measured: Measured, policy: RolloverPolicy) -> None:
    """Refuse, before a job is submitted, a limit its job could only load the model in: every job
    would be dropped with no shard done while its successors load in turn."""
    need = shortest_limit_s(measured, policy)
    if not policy.enabled or policy.limit_s is None or need is None or policy.limit_s >= need:
        return
    minutes = max(1, math.ceil(need / 60))
    load, source = load_for_check(measured, policy)
    shard = measured.shard_s or 0.0
    shard_seen = "measured" if measured.shard_s is not None else "(none measured yet)"
    hint = "or a smaller shard_size" if source == "measured" else "or, if the model loads faster, a smaller expected_load_s"
    raise ConfigError(
        f"slurm.time_limit ({policy.limit_s:.0f} s) is too short for a job to load the model and serve one shard: "
        f"{policy.factor:g} x (load {load:.0f} s {source} + shard {shard:.0f} s {shard_seen}) + "
        f"{reserve_s(shard, policy):.0f} s kept before its end = {need:.0f} s; set "
        f"NSDG_SLURM__TIME_LIMIT={minutes // 60:02d}:{minutes % 60:02d}:00 or more ({hint})")


def busy_s(intervals: list[tuple[float, float]]) -> float:
    """Union of the intervals shards ran: two overlapping shards count once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def mean_shard_s(busy_s: float, shards: int) -> float | None:
    """Service time of one shard: the time the servers were busy (overlapping shards once) per shard."""
    return busy_s / shards if shards else None


@dataclass
class Handover:
    """One planned rollover: the old replica's job ends, its successor takes over."""

    replica: int
    old_jobs: list[str]
    new_jobs: list[str]
    old_end: float | None  # the old job's end as known when the successor was submitted
    ready_in_time: bool | None = None  # successor ready before the old job's end; None: not ready yet
    overlap_s: float = 0.0  # both allocations held at once (successor running, old not released)
    gap_s: float | None = None  # old replica's last shard done -> successor's first shard started

    def as_dict(self) -> dict:
        return {"replica": self.replica, "old_jobs": self.old_jobs, "new_jobs": self.new_jobs,
                "ready_in_time": self.ready_in_time, "overlap_s": round(self.overlap_s, 2),
                "gap_s": None if self.gap_s is None else round(self.gap_s, 2)}


def overlap_s(successor_running_at: float | None, old_released_at: float | None) -> float:
    if successor_running_at is None or old_released_at is None:
        return 0.0
    return max(0.0, old_released_at - successor_running_at)


def gap_s(old_last_finish: float | None, new_first_start: float | None) -> float | None:
    """Idle time between the two replicas' shards; 0 when the successor started before the old one
    finished (they overlapped)."""
    if old_last_finish is None or new_first_start is None:
        return None
    return max(0.0, new_first_start - old_last_finish)


@dataclass
class RolloverReport:
    handovers: list[Handover] = field(default_factory=list)

    def summary(self, gpus: int) -> dict:
        gaps = [h.gap_s for h in self.handovers if h.gap_s is not None]
        return {
            "count": len(self.handovers),
            "late": sum(1 for h in self.handovers if h.ready_in_time is False),
            "overlap_gpu_hours": round(gpus * sum(h.overlap_s for h in self.handovers) / 3600, 4),
            "largest_gap_s": round(max(gaps), 2) if gaps else None,
            "handovers": [h.as_dict() for h in self.handovers],
        }
