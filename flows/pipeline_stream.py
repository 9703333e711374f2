"""A pipeline's stages streamed through ONE pool of servers (flows/pipeline.py sequences it).

Every stage is a run directory as `generate` makes one (flows/generate.py prepare_run; its parts,
judgements, verdicts and states), but its shards are handed to the servers as soon as they can be
made, whatever stage they belong to (infra/pipeline/schedule.py has the rules, pure):

- a root stage's shards come from its input as planned (infra/planning.py), lazily, one at a time;
- a child's shards come from a parent shard once that shard is **final**: it and every earlier shard
  of the parent are published (and judged), and the parent's curation ran over that prefix, so its
  kept rows are exactly what a curation of the whole stage keeps (dedup: the first in input order);
- the feed hands out the deepest stage's ready shard first; with nothing ready and shards in flight
  it yields `WAIT` (the pool keeps its servers and waits on those shards).

A child stage's config hash has no input bytes to hash (its input does not exist when it starts): it
names its parent's `kept` hash instead (infra/pipeline/hashes.py), which covers everything its rows
are made from. A child made again after its parent's curation changed gets back, shard by shard,
the completions it made before for the same requests (infra/pipeline/reuse.py): `Stream.reused`. Each stage kind goes through one function (`KINDS`); `generate` is the one today.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from prefect.utilities.annotations import quote

from flows.generate import Prepared
from flows.replicas import WAIT
from infra.engines.served_model import ServedModel, check_served
from infra.errors import InputError
from infra.generation import Breaker, ShardJob, ShardResult
from infra.pipeline.model import Stage
from infra.pipeline.reuse import Reuse
from infra.pipeline.rows import carried
from infra.pipeline.schedule import Ready, choose, cut, final_prefix
from infra.planning import Plan, check_run_config, discard_partials, load_published, usable_records
from infra.prompting.dataset import Shard
from infra.recipes.curate import OpenCuration
from infra.recipes.filters import Verdict
from infra.recipes.judge import judged_current
from infra.recipes.split import stage_rows
from infra.run.layout import kept_name
from infra.run.manifest import PartInfo, config_hash
from infra.settings import Settings
from tasks.steps import curate_more, for_stage, generate_shard, judge_shard

log = logging.getLogger(__name__)


@dataclass
class StageRun:
    """One stage's progress in a streaming pipeline."""

    stage: Stage
    depth: int
    order: int
    run: Prepared
    plan: Plan  # a root's from its input; a child's grows as its parent's shards become final
    job: ShardJob
    kind: str = "generate"
    ready: deque = field(default_factory=deque)  # Shards to generate, PartInfos to judge, in shard order
    source: Iterator[Shard] | None = None  # a root's planned shards, read lazily
    peeked: Shard | None = None
    created: int = 0  # shards known so far
    settled: set[int] = field(default_factory=set)  # published and judged
    frontier: int = 0  # shards [0, frontier) are final: curated, their rows passed to the children
    closed: bool = False  # no shard will be added (a root; a child whose parent is complete)
    children: list["StageRun"] = field(default_factory=list)
    split_dropped: Counter = field(default_factory=Counter)  # kept rows this stage's split dropped
    rows_passed: int = 0  # rows passed to its children (after its split)
    results: list[ShardResult] = field(default_factory=list)
    parts: dict[int, PartInfo] = field(default_factory=dict)  # published, by shard (the plan's, then new ones)
    breaker: Breaker = field(default_factory=Breaker)
    served_by: dict = field(default_factory=dict)
    reuse: Reuse | None = None  # its completions from before a change, given back to the same requests
    curator: OpenCuration | None = None  # its curation, open while shards come

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def store(self):
        return self.run.store

    @property
    def complete(self) -> bool:
        return self.closed and self.frontier == self.created

    def has_ready(self) -> bool:
        if self.ready:
            return True
        if self.source is not None and self.peeked is None:
            self.peeked = next(self.source, None)
            if self.peeked is None:
                self.source = None
        return self.peeked is not None

    def next_index(self) -> int:
        item = self.ready[0] if self.ready else self.peeked
        return item.shard if isinstance(item, PartInfo) else item.index

    def take(self):
        if self.ready:
            return self.ready.popleft()
        item, self.peeked = self.peeked, None
        return item


@dataclass(frozen=True)
class Waiting:
    """A child shard waiting for a server, held as the bytes of its lines in its parent shard's rows
    (~150 B a row in benchmarks/pipeline_rss.py) rather than as records (~1.4 KB a row: each holds its
    parent row's fields, parsed): up to a parent shard's children per shard task in flight wait at once.
    `shard` makes its records again from those lines when it is handed out, as `Stream.add_shards`
    first made them: the same line numbers (its first line's number is kept by as many empty lines,
    which a JSONL read skips), the same checks, the same count."""

    index: int
    first_line: int  # its first record's line in its parent shard's rows (1-based)
    rows: bytes  # the lines from its first record's to its last's
    offset: int  # the child's input lines before its parent shard's rows
    count: int  # its records

    def shard(self, cfg, settings: Settings) -> Shard:
        stream = io.BytesIO(b"\n" * (self.first_line - 1) + self.rows)
        records = [replace(r, line=self.offset + r.line) for r in usable_records(stream, cfg, settings, "jsonl")]
        if len(records) != self.count:  # a defect (the checks are per line), never a shard of other records
            raise RuntimeError(f"pipeline: child shard {self.index} made {len(records)} records from its parent's rows, "
                               f"{self.count} when they were counted; rerun with the same run_id to resume")
        return Shard(self.index, records)


@dataclass(frozen=True)
class Work:
    """One item for a server: a shard to generate (or a published part to judge) of one stage."""
    stage: str
    item: object

    @property
    def index(self) -> int:  # the task name's shard number
        return self.item.index if isinstance(self.item, Shard) else self.item.shard


def generate_kind(stage: StageRun, client, item, backend, job: ShardJob) -> object:
    """A `generate` stage's work: a shard generated (and judged), or a published part judged."""
    if isinstance(item, PartInfo):
        return judge_shard.submit(  # named judge-{stage}-shard-N by its job (tasks/steps.py)
            client, item, job, stage.store, backend)
    return generate_shard.submit(  # named generate-{stage}-shard-N by its job
        client, quote(item), job, stage.store, backend, stage.breaker, None)


# One function per stage kind: (stage, client, item, backend, job) -> the task's future.
KINDS: dict[str, Callable] = {"generate": generate_kind}


def stage_job(stage: StageRun, backend, client, replica: int | None) -> ShardJob:
    """The stage's ShardJob with who makes this shard; the served model checked once per stage and server."""
    if (served := stage.served_by.get(backend)) is None:
        served = ServedModel(stage.job.requested_model, stage.plan.config["served_model"], client.served)
        check_served(stage.store, served, backend.url() or backend.status())
        stage.served_by[backend] = served
    return replace(stage.job, model=served.label, replica=replica, job_ids=tuple(backend.job_ids))


class Stream:
    """The feed of every stage's ready shards (`feed`, for flows.replicas.Pool), the pool's results
    back in (`on_result`), and what each stage passed on."""

    def __init__(self, stages: list[StageRun], settings: Settings):
        self.stages = {s.name: s for s in stages}
        self.by_hash = {s.plan.config_hash: s for s in stages}
        self.settings = settings
        self.outstanding = 0  # handed out, no result yet (a requeued one stays outstanding)
        self.replica_of: Callable[[object], int | None] = lambda backend: None  # the pool's, once it exists
        # Each stage's progress bar on the run page (flows/artifacts.py Artifacts, by stage name), set
        # by the flow: the share of its known shards published; "+" while its parent may add more.
        self.progress: dict[str, object] = {}
        for s in stages:  # a stage reading a reward stage (done before this pool) is a first stage here
            if s.stage.from_ in self.stages:
                self.stages[s.stage.from_].children.append(s)
        for s in stages:
            if s.stage.from_ not in self.stages:
                self.advance(s)  # a resumed run: the published prefix is final already, its children get shards

    def has_work(self) -> bool:
        return any(s.has_ready() for s in self.stages.values())

    def feed(self) -> Iterator:
        while True:
            pick = choose(Ready(s.name, s.depth, s.order, s.next_index()) for s in self.stages.values() if s.has_ready())
            if pick is None:
                if all(s.complete for s in self.stages.values()):
                    return
                if self.outstanding == 0:  # no shard in flight can make more ready: a defect, never a hang
                    stuck = [s.name for s in self.stages.values() if not s.complete]
                    raise RuntimeError(f"pipeline: stage(s) {', '.join(stuck)} have shards left but none is ready and "
                                       "none in flight; rerun with the same run_id to resume")
                yield WAIT
                continue
            self.outstanding += 1
            stage = self.stages[pick.stage]
            item = stage.take()
            yield Work(pick.stage, item.shard(stage.run.cfg, self.settings) if isinstance(item, Waiting) else item)

    def submit(self, client, work: Work, backend):
        stage = self.stages[work.stage]
        job = stage_job(stage, backend, client, self.replica_of(backend))
        return KINDS[stage.kind](stage, client, work.item, backend, job)

    def on_result(self, result: ShardResult) -> None:
        stage = self.by_hash[result.part.config_hash]
        self.outstanding -= 1
        stage.results.append(result)
        stage.parts[result.part.shard] = result.part
        stage.settled.add(result.part.shard)
        self.advance(stage)
        for s in (stage, *stage.children):  # a child's shard count grows as this stage's become final
            if (bar := self.progress.get(s.name)) is not None and s.created:
                bar.progress(100.0 * len(s.settled) / s.created,
                             f"{len(s.settled)} of {s.created}{'' if s.closed else '+'} shards")

    def advance(self, stage: StageRun) -> None:
        """Curate the stage's settled prefix; pass each newly final shard's kept rows to its children."""
        new = final_prefix(stage.frontier, stage.created, stage.settled)
        if new > stage.frontier:
            curation = stage.run.cfg.curation
            if curation.enabled:
                # One curation open across the stage's shards, its dedup tables fed in input order (each
                # part read once; rebuilt once from the published parts after a restart).
                stage.curator = stage.curator or OpenCuration(stage.store, curation, stage.plan.config_hash)
                # Quoted: Prefect would otherwise walk every part since shard 0 on each call and record each
                # as an input of the task run (the shard task that made it): quadratic in the stage's shards.
                for_stage(curate_more, stage.name)(stage.curator, quote([stage.parts[i] for i in range(new)]))
            for shard in range(stage.frontier, new):
                self.pass_on(stage, shard)
            stage.frontier = new
        if stage.complete and stage.curator is not None:
            stage.curator.close()  # its verdicts are published; the stage's end reads them
            stage.curator = None
        if stage.complete:
            for child in stage.children:
                if not child.closed:
                    child.closed = True
                    self.advance(child)

    def pass_on(self, stage: StageRun, shard: int) -> None:
        """Parent shard `shard`'s kept rows, cut by the stage's split, as its children's next shards."""
        if not stage.children:
            return
        part = stage.parts[shard].name
        data = stage.store.read_bytes(kept_name(part) if stage.run.cfg.curation.enabled else part) or b""
        lines: list[str] = []
        for line in data.decode("utf-8").splitlines():
            if line.strip():
                got = stage_rows(carried(json.loads(line)), stage.name, stage.stage.split)
                if isinstance(got, Verdict):
                    stage.split_dropped[got.filter] += 1
                else:
                    lines += [json.dumps(r, ensure_ascii=False) for r in got]
        stage.rows_passed += len(lines)
        for child in stage.children:
            self.add_shards(child, "".join(f"{x}\n" for x in lines).encode("utf-8"), len(lines))

    def add_shards(self, child: StageRun, rows: bytes, count: int) -> None:
        cfg, plan = child.run.cfg, child.plan
        offset = plan.records_in + plan.rejected  # the child's input lines so far: its records' line numbers
        records = [replace(r, line=offset + r.line) for r in
                   usable_records(io.BytesIO(rows), cfg, self.settings, "jsonl")]
        if len(records) < count and cfg.on_bad_input == "fail":
            raise InputError(f"pipeline stage {child.name!r}: {count - len(records)} of its parent's rows do not make a "
                             "prompt (its template fails on them, or they do not fit the context); fix the template "
                             "or set on_bad_input: skip for this stage")
        plan.records_in += len(records)
        plan.rejected += count - len(records)
        lines = rows.split(b"\n")
        for index, a, b in cut(len(records), cfg.shard_size, child.created):
            if index in plan.done:
                part = plan.done[index]
                judge = cfg.curation.judge
                if judge is not None and not judged_current(child.store, judge, part):
                    child.ready.append(part)
                else:
                    child.settled.add(index)
            elif child.reuse is not None:  # its completions from before are matched to its records now
                if not self.reused(child, shard := Shard(index, records[a:b])):
                    child.ready.append(shard)
            else:
                first, last = records[a].line - offset, records[b - 1].line - offset
                child.ready.append(Waiting(index, first, b"\n".join(lines[first - 1:last]) + b"\n", offset, b - a))
        child.created += len(cut(len(records), cfg.shard_size, 0))
        plan.shards_total = child.created
        self.advance(child)


    @staticmethod
    def reused(child: StageRun, shard: Shard) -> bool:
        """The shard's results from before a change put in its spill (infra/pipeline/reuse.py); when
        they are all of them and nothing is left to ask (no judge, no schema to check again), its
        part is written here, with no server: whether it was."""
        if child.reuse is None or not child.reuse.prepare(child.store, shard, child.job):
            return False
        if child.job.judge is not None or child.job.structured is not None:
            return False
        child.parts[shard.index] = child.reuse.publish(child.store, shard, child.job)
        child.settled.add(shard.index)
        return True


def child_plan(run: Prepared, settings: Settings, parent_kept: str) -> Plan:
    """A child stage's plan before any of its rows exist: its config names its parent's kept hash in
    place of the input's bytes; its published shards under that config; records counted as they come."""
    cfg, store = run.cfg, run.store
    discard_partials(store)
    store.abort_incomplete_uploads()
    config = cfg.fingerprint(f"rows of parent kept {parent_kept}", "jsonl", settings)
    chash = config_hash(config)
    check_run_config(store, config, chash)
    return Plan(cfg.run_id, cfg.input_uri, "jsonl", 0, 0, 0, config, chash, load_published(store, chash),
                samples=cfg.recipe.samples)
