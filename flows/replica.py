"""One server replica of a run's pool (flows/replicas.py): its allocation, its client once ready,
the shards it has in flight, what it did, and its place in a rollover chain (the replica it took
over from, the one taking over from it)."""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field

from prefect.futures import PrefectFuture

from infra.backends import Backend
from infra.backends.rollover import Handover, busy_s
from infra.prompting.dataset import Shard


@dataclass
class Replica:
    index: int
    backend: Backend
    started: float = field(default_factory=time.time)
    ready_future: PrefectFuture | None = None
    client: object | None = None
    ready_at: float | None = None
    released_at: float | None = None
    in_flight: dict[PrefectFuture, Shard] = field(default_factory=dict)
    intervals: list[tuple[float, float]] = field(default_factory=list)
    records: int = 0
    shards: int = 0
    last_active: float = field(default_factory=time.time)  # last request sent or answered
    keep_alive: concurrent.futures.Future | None = None
    release_error: str | None = None
    lost: bool = False
    end: float | None = None  # when its allocation ends, as last read
    predecessor: Replica | None = None  # the replica this one took over from (a planned rollover)
    successor: Replica | None = None
    handover: Handover | None = None  # on a successor: what its rollover cost
    ended: str | None = None  # why its allocation ended by schedule, when it did
    capped: bool = False  # told that no successor may be started for it (max_rollovers, a limit too short)

    @property
    def state(self) -> str:
        if self.released_at is not None:
            return "released"
        return "ready" if self.client is not None else "starting"

    def busy_seconds(self) -> float:
        return busy_s(self.intervals)

    def held_since(self) -> float | None:
        """When this replica began to hold its job's GPUs: the job's start, or, for a job that was already
        running when this replica took it (a pipeline's kept job handed back to a later level), the
        replica's own start. Its queue wait and load are this replica's, not the earlier level's."""
        running = self.backend.running_at()
        return max(running, self.started) if running else None

    def summary(self, gpus: int) -> dict:
        held = (self.released_at or time.time()) - self.started
        serving = (self.released_at or time.time()) - self.ready_at if self.ready_at else 0.0
        return {
            "replica": self.index, "job_ids": list(self.backend.job_ids), "records": self.records, "shards": self.shards,
            "busy_fraction": round(self.busy_seconds() / serving, 4) if serving > 0 else None,
            "busy_s": round(self.busy_seconds(), 2),
            "gpu_hours": round(gpus * held / 3600, 4), "held_s": round(held, 2),
            # From the job's start (not its submission) to its release: the GPUs it really held.
            "allocated_s": round((self.released_at or time.time()) - since, 2) if (since := self.held_since()) else 0.0,
            "load_s": round(self.ready_at - since, 2) if since and self.ready_at else None,
            "idle_after_last_shard_s": round(self.released_at - max(b for _, b in self.intervals), 2)
            if self.intervals and self.released_at else None,
            **({"release_error": self.release_error} if self.release_error else {}),
            **({"successor_of": list(self.predecessor.backend.job_ids)} if self.predecessor else {}),
            **({"ended": self.ended} if self.ended else {}),
        }

    def first_start(self) -> float | None:
        return min((a for a, _ in self.intervals), default=None)

    def last_finish(self) -> float | None:
        return max((b for _, b in self.intervals), default=None)
