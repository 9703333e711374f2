"""A pipeline run's allocation over every invocation of it (issue 24): a run killed and resumed held
GPUs in each invocation, and its manifest's `allocation` and each stage's `busy_s`, `held_s` and
`gpu_hours` are the sums over all of them, with the list of invocations.

Each invocation's figures (flows/pipeline.py attribute_allocation: its replicas' time held, split by each
stage's share of the server's busy time) go into a small per-run record, `allocations.json` in the
pipeline's run directory, under the invocation's flow-run id. They are written every `BEAT_S` seconds
while the invocation's servers run, and once more at its end: an invocation killed with -9 is counted
up to its last beat (at most `BEAT_S` of its time held is lost to the record), never twice, since a
beat replaces that invocation's entry instead of adding one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from infra.errors import LeaseLost, SdgError
from infra.run.layout import PIPELINE_ALLOCATIONS
from infra.system.periodic import Periodic

log = logging.getLogger(__name__)

BEAT_S = 2.0
SUMMED = ("busy_s", "held_s", "gpu_hours")  # a stage's share, per invocation


def read_record(store) -> dict:
    """The run's record: {"invocations": [entry, ...]} in the order they first ran."""
    data = store.read_bytes(PIPELINE_ALLOCATIONS)
    if data is None:
        return {"invocations": []}
    try:
        record = json.loads(data)
        if isinstance(record, dict) and isinstance(record.get("invocations"), list):
            return record
    except ValueError:
        pass
    # Ours, written whole; unreadable only if edited by hand. The run goes on: earlier invocations
    # are then missing from the sums, which the log says.
    log.warning("%s is not a record of allocations (edited?); earlier invocations are left out of the sums",
                store.uri(PIPELINE_ALLOCATIONS))
    return {"invocations": []}


def note_invocation(store, invocation: str, allocation: dict, stages: dict[str, dict]) -> dict:
    """Write (or replace) this invocation's entry in the run's record; the record."""
    entry = {"invocation": invocation, "noted_at": round(time.time(), 3),
             **{k: allocation.get(k, 0) for k in ("gpu_hours", "held_s", "busy_s")},
             "stages": {name: {k: s.get(k, 0) for k in SUMMED} for name, s in stages.items()},
             "replicas": allocation.get("replicas", []),
             # the split by server (with_reward_servers), summed over invocations like the rest
             **({"servers": allocation["servers"]} if allocation.get("servers") else {})}
    record = read_record(store)
    invocations = record["invocations"]
    at = next((i for i, e in enumerate(invocations) if e.get("invocation") == invocation), None)
    if at is None:
        invocations.append(entry)
    else:
        invocations[at] = entry
    store.write_bytes(PIPELINE_ALLOCATIONS, json.dumps(record, indent=1).encode())
    return record


def summed(record: dict, allocation: dict, stages: dict[str, dict]) -> dict:
    """This invocation's `allocation` as the whole run's: its figures (and `servers`, the split by server)
    summed over the record's invocations, every replica listed (with its invocation), the invocations listed; each stage
    entry's `busy_s`, `held_s`, `gpu_hours` summed the same way (in place)."""
    invocations = record["invocations"]
    for name, entry in stages.items():
        for k in SUMMED:
            total = sum((e.get("stages", {}).get(name) or {}).get(k, 0) for e in invocations)
            entry[k] = round(total, 4 if k == "gpu_hours" else 3)
    held, busy = (sum(e.get(k, 0) for e in invocations) for k in ("held_s", "busy_s"))
    servers: dict[str, float] = {}
    if any(e.get("servers") for e in invocations):
        # An invocation that swapped in no reward server (a rerun's, a resumed generation's) held generators only.
        for e in invocations:
            for k, v in (e.get("servers") or {"generator_gpu_hours": e.get("gpu_hours", 0)}).items():
                servers[k] = servers.get(k, 0.0) + v
    allocation = {k: v for k, v in allocation.items() if k != "servers"}
    if servers:
        allocation["servers"] = {k: round(v, 2 if k.endswith("_s") else 4) for k, v in servers.items()}
    return {**allocation, "gpu_hours": round(sum(e.get("gpu_hours", 0) for e in invocations), 4),
            "held_s": round(held, 2), "busy_s": round(busy, 3), "busy_fraction": round(busy / held, 4) if held else None,
            "replicas": [{**r, "invocation": e["invocation"]} for e in invocations for r in e.get("replicas", [])],
            "invocations": [{k: e.get(k) for k in ("invocation", "gpu_hours", "held_s", "busy_s", "noted_at")}
                            for e in invocations]}


def with_reward_servers(allocation: dict, stages: dict[str, dict]) -> dict:
    """This invocation's allocation with the reward servers swapped into its jobs (flows/reward.py): each
    reward stage's entry gets its server's time held and GPU-hours (the generator's pool has none of
    it: its time ends at the swap), and the allocation's GPU-hours add them, split by server in `servers`.
    Also added: the generator kept past the pool for a pairs stage's check (flows/pairs.py HeldServer),
    and a resident reward server's job keeping the generator's nodes while it scores (infra/slurm/resident.py)."""
    reward_hours = reward_held = check_hours = resident_hours = 0.0
    for entry in stages.values():
        check = (entry.get("check") or {}).get("allocation")
        if check:
            entry |= {"held_s": check["held_s"], "gpu_hours": check["gpu_hours"]}
            check_hours += check["gpu_hours"]
        swap = (entry.get("reward") or {}).get("allocation")
        if not swap:
            continue  # a reward server given by url: not this run's GPUs
        held = sum(j.get("reward_held_s") or 0.0 for j in swap.get("jobs", []))
        # the stage's share: its server's hours and, resident, the generator's nodes held while it scores
        kept = swap.get("generator_kept_gpu_hours", 0.0)
        entry |= {"held_s": round(held, 3), "gpu_hours": round(swap.get("reward_gpu_hours", 0.0) + kept, 4)}
        reward_hours, reward_held = reward_hours + swap.get("reward_gpu_hours", 0.0), reward_held + held
        resident_hours += kept
    if not reward_hours and not reward_held and not check_hours:
        return allocation
    generator = allocation.get("gpu_hours", 0.0) + resident_hours
    # held_s and busy_fraction stay the generation servers' (how busy the generator was kept).
    return {**allocation, "gpu_hours": round(generator + reward_hours + check_hours, 4),
            "servers": {"generator_gpu_hours": round(generator, 4), "reward_gpu_hours": round(reward_hours, 4),
                        "reward_held_s": round(reward_held, 2),
                        **({"generator_kept_for_checks_gpu_hours": round(check_hours, 4)} if check_hours else {})}}


class InvocationLedger:
    """This invocation's entry in the run's record, kept current while its servers run (`watch`) and
    written last at its end (`close`), which returns the run's summed allocation."""

    def __init__(self, store, invocation: str, beat_s: float = BEAT_S):
        self.store, self.invocation, self.beat_s = store, invocation, beat_s
        self._beat: Periodic | None = None

    def watch(self, measure: Callable[[dict[str, dict]], dict], stages: list[str]) -> Callable[[], None]:
        """Note `measure(entries)` (the allocation so far; it fills each stage's entry) every beat; the
        call that stops it."""
        def beat() -> bool:
            entries: dict[str, dict] = {name: {} for name in stages}
            try:
                note_invocation(self.store, self.invocation, measure(entries), entries)
            except LeaseLost:
                return False  # another invocation holds the run: it writes the record now
            return True

        self._beat = Periodic(f"allocations-{self.invocation[:8]}", beat, self.beat_s, immediately=True,
                              what="the run's record of allocations not written", transient=(SdgError,),
                              logger=log).start()
        return self.stop

    def stop(self) -> None:
        if self._beat is not None:
            self._beat.stop()
            self._beat = None

    def close(self, allocation: dict, stages: dict[str, dict]) -> dict:
        """This invocation's final figures noted; the whole run's allocation (stage entries summed in place)."""
        self.stop()
        return summed(note_invocation(self.store, self.invocation, allocation, stages), allocation, stages)
