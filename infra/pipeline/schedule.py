"""A streaming pipeline's scheduling rules, pure (flows/pipeline_stream.py applies them): which ready
shard goes to the server next, when a stage's shard is final (its curation can no longer change), how
a parent shard's rows become its child's shards, and how the allocation's time is attributed to stages.

Why these rules:
- **Deepest stage first.** Finished rows reach the last stage soon after the first input is read, so a
  kill loses little; a root shard (the input, always ready) is read only when no later stage has work,
  which also bounds what is held: one parent shard's children at a time, not a whole stage.
- **A shard is final when it and every earlier shard of its stage are settled** (published, and judged
  when the stage judges). Dedup keeps "the first in input order" across the stage's shards, so shard j's
  kept rows are exact only once shards 0..j are in; a child never reads a shard past that prefix.
- **A child's shards are numbered in its parent's shard order**: parent shard p's rows start at the index
  after those of parent shards 0..p-1, cut every `shard_size` rows; the same parent rows give the same
  shards on every rerun, so resuming finds them published under the same names.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Ready:
    """A stage with work ready: its depth (0 reads an input, a child is its parent's + 1), its place in
    the file (ties between sibling stages), and its lowest ready shard."""
    stage: str
    depth: int
    order: int
    shard: int


def choose(ready: Iterable[Ready]) -> Ready | None:
    """The work to send next: the deepest stage's, then the lowest shard, then the file's order."""
    return min(ready, key=lambda r: (-r.depth, r.shard, r.order), default=None)


def final_prefix(frontier: int, created: int, settled: Collection[int]) -> int:
    """The stage's new frontier: shards [0, result) are settled, so their curation is final."""
    while frontier < created and frontier in settled:
        frontier += 1
    return frontier


def cut(rows: int, shard_size: int, base: int) -> list[tuple[int, int, int]]:
    """A child's shards from one parent shard's `rows` rows, numbered from `base`: (index, start, stop)."""
    if shard_size < 1:
        raise ValueError(f"shard_size {shard_size}: must be at least 1")
    return [(base + i, start, min(start + shard_size, rows)) for i, start in enumerate(range(0, rows, shard_size))]


def busy_by_stage(intervals: Iterable[tuple[str, float, float]]) -> dict[str, float]:
    """Seconds of server work per stage: the time at least one shard was in flight, each moment split
    evenly among the shards in flight then (a queued shard beside a computing one shares the moment, and
    so do shards on two replicas). `intervals`: (stage, started, finished) per shard."""
    events: list[tuple[float, int, str]] = []
    for stage, a, b in intervals:
        if b > a:
            events += [(a, 1, stage), (b, -1, stage)]
    events.sort(key=lambda e: (e[0], e[1]))
    out: dict[str, float] = {}
    active: dict[str, int] = {}
    last = None
    for t, step, stage in events:
        n = sum(active.values())
        if last is not None and n and t > last:
            for s, k in active.items():
                out[s] = out.get(s, 0.0) + (t - last) * k / n
        active[stage] = active.get(stage, 0) + step
        if not active[stage]:
            del active[stage]
        out.setdefault(stage, 0.0)
        last = t
    return out


def attribute(busy: Mapping[str, float], total: float) -> dict[str, float]:
    """`total` (the allocation's GPU-hours, or seconds held) split by each stage's share of the busy
    time: what the allocation cost while not generating (load, queue wait, idle) is shared the same way.
    With no busy time at all (nothing generated), nothing is attributed."""
    whole = sum(busy.values())
    return {s: (total * b / whole if whole > 0 else 0.0) for s, b in busy.items()}
