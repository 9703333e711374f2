"""The `pipeline` flow: every stage of a pipeline file (docs/pipelines.md) on ONE allocation, the
stages streamed. The file is read and checked whole (every template rendered, every stage's
parameters validated) before anything is allocated; one pool of servers (flows/replicas.py) serves
every stage, started when there is work, released when the last shard of the last stage is in (and on
any error, and by the crash hooks, which find it by the pipeline's run id as they find a run's).

Each stage is a run directory as `generate` makes one, `{output_uri}/{run_id}/stages/{stage}/` (the
same plan, shard tasks, judge, curation and manifest), but a child's shards are generated as soon as
the parent shard they read is final, not when the parent stage ends: flows/pipeline_stream.py, with
its rules in infra/pipeline/schedule.py (deepest stage first; a parent shard is final when it and every
earlier one are curated, so dedup keeps the first in input order exactly). After the pool, each stage
is finished (its parts closed, curated, its manifest, its `rows.jsonl`), then the pipeline's manifest:
each stage's counts and its share of the allocation (`busy_s`, `gpu_hours`).

Level by level (Pipeline.level: the reward stages a stage reads through): each level's generating
stages on one pool, then its reward stages (flows/reward.py); a generating stage reading a reward stage
is in the next level, whose pool adopts the job the reward server kept (its generator's step asked for
again, infra/slurm/steps.py hand_back: no new job, no second queue wait). Pairs stages run last.

Resume: a rerun with the same run_id finds each stage's published shards as a run does, so a stage
already done generates nothing and, with every stage done, nothing is allocated. A rerun of a changed
file pays only for what the change invalidates (infra/pipeline/invalidate.py, before any allocation):
a stage whose generation settings changed is generated again with the stages after it (their old
directories moved aside); one whose filters or judge thresholds alone changed is curated again with
no server, and its children reuse the rows of parents still kept (infra/pipeline/reuse.py).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack, closing
from dataclasses import dataclass

from prefect import flow, get_run_logger
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner

from flows.artifacts import Artifacts, artifact_key, publish_stage_counts
from flows.generate import (check_limit_before_submit, finish, prepare_run, replica_count, rollover_policy,
                            planned_job, shard_switch_interval, shard_tasks_per_replica)
from flows.pairs import held_for_checks, pairs_stage
from flows.params import RunParams, resolve_run_id, run_name
from flows.pipeline_stream import StageRun, Stream, child_plan
from flows.replicas import Pool
from flows.rollovers import RolloverPlanner
from flows.reward import planned_swap, reward_stage, run_order
from flows.teardown import release_lease_on_hook, release_on_hook
from infra.backends import make_backend
from infra.errors import ConfigError, InputError
from infra.pipeline.allocations import InvocationLedger, with_reward_servers
from infra.pipeline.check import check_pipeline, file_hashes
from infra.pipeline.files import load_pipeline
from infra.pipeline.hashes import StageHash, stage_hashes
from infra.pipeline.invalidate import reconcile, superseded_store
from infra.pipeline.model import Pipeline
from infra.pipeline.outputs import export_pipeline, push_pipeline
from infra.pipeline.reuse import Reuse
from infra.pipeline.rows import stage_entry, write_stage_rows
from infra.pipeline.schedule import attribute, busy_by_stage
from infra.planning import planned_shards
from infra.recipes.judge import judged_current
from infra.run.layout import MANIFEST, STAGE_ROWS, stages_uri
from infra.run.lease import FencedStore, hold_run_lease
from infra.settings import Settings, load_settings
from infra.slurm.resident import unused_reward_servers
from infra.slurm.steps import SwapKeeper
from infra.storage import OutputStore, open_input, open_output_store
from tasks.steps import allocate, for_stage, plan, release, wait_ready

log = logging.getLogger(__name__)


@flow(
    name="pipeline",
    flow_run_name=run_name,
    task_runner=ThreadPoolTaskRunner(max_workers=8),
    on_cancellation=[release_on_hook],
    on_crashed=[release_on_hook],
    on_completion=[release_lease_on_hook],
    on_failure=[release_on_hook],  # a failure after the pool may leave a job kept for a reward swap
)
def pipeline(pipeline: str, run_id: str | None = None, output_uri: str | None = None, replicas: int | None = None,
             max_server_restarts: int | None = None, shard_size: int | None = None) -> dict:
    """Run every stage of the pipeline file `pipeline` on one allocation; publish each stage's run
    directory and the pipeline's manifest (each stage's counts, the training set)."""
    logger = get_run_logger()
    settings = load_settings()
    flow_run = get_run_context().flow_run
    the = load_pipeline(pipeline, settings)
    hashes = stage_hashes(the, file_hashes(check_pipeline(the, settings, pipeline)))  # every template rendered
    run_id = run_id or resolve_run_id(flow_run)
    output_uri = output_uri or settings.output_uri
    swap = planned_swap(the, settings, run_id, str(flow_run.id))  # a reward server started in the job: checked now
    # The pool's server kept for the pair checks (flows/pairs.py); a resident job's generator is still
    # there after the reward stages, so it is handed to them too (below), not started again.
    held = held_for_checks(the, settings, swap is not None and not swap.step.resident)
    asked = {s.name: stage_params(the, s.name, pipeline, output_uri=stages_uri(output_uri, run_id), replicas=replicas,
                                  max_server_restarts=max_server_restarts, shard_size=shard_size) for s in the.stages}
    root = open_output_store(output_uri, run_id, settings.s3, settings.work_path("staging"))
    root.preflight()
    lease = hold_run_lease(root, str(flow_run.id), flow_run.name, settings.run_lease_ttl_s)
    root = lease.fenced()
    # What a change since the last run invalidates, moved aside; what cannot change, refused (before any allocation).
    changed, superseded = reconcile(root, output_uri, run_id, hashes, {s.name: s.from_ for s in the.ordered()},
                                    {s.name: s.kind for s in the.ordered()}, settings, lambda store: FencedStore(store, lease))
    for change in changed:
        logger.info("pipeline run %s: %s", run_id, change.line)
    ledger = InvocationLedger(root, str(flow_run.id))  # this invocation's allocation, beside the run's earlier ones
    order = run_order(the)  # level by level: a generating stage reading a reward stage after it (flows/reward.py)
    levels: list[tuple[list[StageRun], Pool | None]] = []  # each level's generating stages and their pool
    done: dict[str, dict] = {}
    try:
        for level in sorted({the.level(s) for s in order if s.kind != "pairs"}):
            gen = [s for s in order if s.kind == "generate" and the.level(s) == level]
            # The job goes on to a later reward stage (swapped or resident) only when one follows; the
            # pair checks keep the last pool's server.
            reward_after = swap is not None and any(s.kind == "reward" and the.level(s) >= level
                                                    and the.reward_server(s)[0] == swap.step.server for s in order)
            last = not any(the.level(s) > level for s in gen_stages(the))
            if gen:
                jobs = LevelJobs(keep_for=swap if reward_after else None, adopt_from=swap, held=held if last else None)
                stages, pool = generate_level(gen, asked=asked, hashes=hashes, superseded=superseded, settings=settings,
                                              flow_run=flow_run, lease=lease, output_uri=output_uri, run_id=run_id,
                                              jobs=jobs, levels=levels,
                                              watch=lambda: ledger.watch(lambda entries: attribute_levels(levels, entries),
                                                                         [s.name for s in gen_stages(the)]))
                for s in stages:
                    done[s.name] = finish_stage(s, done.get(s.stage.from_), hashes[s.name], pool, flow_run, settings,
                                                run_id, first=s is stages[0])
                    publish_stage_counts(run_id, list(done.values()), [s.name for s in the.ordered()])  # the run page
                    logger.info("stage %s: %d records in, %d rows out, %d kept, %d rows for its children", s.name,
                                done[s.name]["records_in"], done[s.name]["rows_out"], done[s.name]["kept"],
                                done[s.name]["rows"])
            for stage in (s for s in order if s.kind == "reward" and the.level(s) == level):
                # scored by its own reward server once its parent is done (flows/reward.py)
                done[stage.name] = reward_stage(the, stage, reading_parent(asked[stage.name], stage), settings, lease,
                                                hashes[stage.name], swap, hold=held is not None)
        if held is not None and swap is not None and (job := swap.hand_back(settings.server.ready_timeout_s)) is not None:
            held.keep(job)  # resident: its generator step never stopped
        for stage in (s for s in order if s.kind == "pairs"):
            # from the parent's published rows: no server unless pairs.check asks (flows/pairs.py)
            done[stage.name] = pairs_stage(the, stage, output_uri, run_id, settings, lease, hashes[stage.name],
                                           str(flow_run.id), held)
    finally:
        ledger.stop()
        if swap is not None:
            swap.release()  # kept past a reward stage for a later level that failed: not held longer
    if swap is not None:  # each reward stage's jobs as they ended (a job given back was still kept at its end)
        for name, entry in done.items():
            if (entry.get("reward") or {}).get("allocation") is not None:
                entry["reward"]["allocation"] = swap.report(name)
    done = {s.name: done[s.name] for s in the.ordered()}
    if held is not None:
        held.release()  # every pairs stage is done: none is waiting for it any more
    # This invocation's allocation (the reward servers swapped into its jobs too), summed over the run's invocations.
    allocation = ledger.close(with_reward_servers(attribute_levels(levels, done), done), done)
    final = done[list(done)[-1]]
    doc = {"run_id": run_id, "pipeline": pipeline, "server": dict(zip(("name", "profile"), (the.server[0], the.server[1].profile))),
           "stages": list(done.values()), "allocation": allocation, "training_set": final["kept_parts"],
           "training_rows": final["rows_uri"], "server_launches": sum(p.launched for _, p in levels if p is not None)}
    doc["dataset"] = export_pipeline(the, doc, root, output_uri, run_id, settings, lease)  # trainer files and card
    root.write_bytes(MANIFEST, json.dumps(doc, indent=2).encode())
    push_pipeline(the, doc, root, output_uri, run_id, settings, lease)  # push_to_hub: after all is published
    logger.info("pipeline run %s complete: %d stages; manifest %s", run_id, len(done), root.uri(MANIFEST))
    return {"run_id": run_id, "manifest": root.uri(MANIFEST), "stages": {n: s["kept"] for n, s in done.items()},
            "records_written": final["rows_out"], "records_kept": final["kept"], "filtered": final["filtered"]}


def open_stage(params: RunParams, stage, order: int, parent: StageRun | None, hashes: dict[str, StageHash],
               settings: Settings, flow_run, lease, inputs: ExitStack, earlier: list[OutputStore] = ()) -> StageRun:
    """A stage prepared as a run: a root planned from its input (its shards read lazily from a second,
    pinned read), a child with its config chained to its parent's kept hash and its shards to come,
    and the completions of its `earlier` (superseded) directories to give back to the same requests."""
    params = reading_parent(params, stage)  # a child's rows are made as the parent's shards become final
    run = prepare_run(params, settings, flow_run, lease=lease, input_made_later=parent is not None)
    cfg = run.cfg
    the_plan = (for_stage(plan, stage.name)(cfg, settings, run.store) if parent is None
                else child_plan(run, settings, hashes[stage.from_].kept))
    job = planned_job(cfg, settings, the_plan, flow_run, stage=stage.name)  # the run's: output_schema, judge, samples alike
    out = StageRun(stage, 0 if parent is None else parent.depth + 1, order, run, the_plan, job,
                   parts=dict(the_plan.done), reuse=Reuse.load(list(earlier), the_plan.config, run.store) if parent else None)
    if parent is None:
        source = open_input(cfg.input_uri, settings.s3, pin=the_plan.input_pin)
        out.source = planned_shards(inputs.enter_context(source), cfg, settings, the_plan, source.verify)
        judge = cfg.curation.judge
        unjudged = [p for _, p in sorted(the_plan.done.items()) if judge is not None and not judged_current(run.store, judge, p)]
        out.ready = deque(unjudged)  # published, judged by no current judge: judged again, not generated
        out.settled = set(the_plan.done) - {p.shard for p in unjudged}
        out.created, out.closed = the_plan.shards_total, True
        check_limit_before_submit(rollover_policy(settings, run.prof), list(the_plan.done.values()))
    return out


@dataclass(frozen=True)
class LevelJobs:
    """A level's pool and the Slurm jobs beyond its own (flows/reward.py): which keeper its last released
    job goes to, and which keeper's job it starts with. One reward keeper (`swap` in the flow) may be
    both: it gives the job back to this level and takes it again for a later reward stage."""

    keep_for: SwapKeeper | None = None  # a later reward stage's: the last job released is kept (swapped or resident)
    adopt_from: SwapKeeper | None = None  # an earlier reward stage's: its kept job is the first replica (hand_back)
    held: object | None = None  # the pair checks' (flows/pairs.py): the last job released is kept for them

    def adopt(self, ready_timeout_s: float) -> Callable[[], object] | None:
        """The hand-back, called at the pool's first launch: None when there is no job to adopt."""
        keeper = self.adopt_from
        return None if keeper is None else lambda: keeper.hand_back(ready_timeout_s)


def serve(stream: Stream, stages: list[StageRun], settings: Settings, flow_run, run_id: str,
          jobs: LevelJobs = LevelJobs()) -> Pool:
    """One pool for every stage of a level, sized and launched as the first stage's run would be; with
    `jobs.keep_for`, each job carries the reward server's step and the last one released is kept for it;
    with `jobs.held`, the last one released is kept for the pair checks; `jobs.adopt_from`'s kept job
    (its generator's step asked for again) is the first replica's: no new job, no queue wait. It is
    handed back at the pool's first launch, inside its run, so any error from then on releases that
    job with the other replicas (handed back before, an error on the way to the pool left it held by none)."""
    first = stages[0].run
    prof = first.prof
    swap, held = jobs.keep_for, jobs.held
    ended = jobs.adopt_from.ended if jobs.adopt_from is not None else None
    to_adopt = [adopt] if (adopt := jobs.adopt(settings.server.ready_timeout_s)) is not None else []
    adopted: list = []  # the job given back, once taken

    def is_adopted(backend) -> bool:
        return any(backend is job for job in adopted)

    keep = swap.keep if swap else held.keep if held else release

    def give_back(backend, failed: bool = False):
        # A failing pool releases every job: one kept for a later reward stage would start its swap
        # (the reward model loading on its GPUs) only for the flow's `finally` to release it.
        (release if failed else keep)(backend)
        if is_adopted(backend) and swap is None and ended is not None:
            ended(backend)  # the adopted job's record (its reward server's nodes) ends with it

    def start(backend):
        if not is_adopted(backend):
            allocate(backend)
        return wait_ready.submit(backend, settings, first.cfg.counter, prof)  # its deadline: the server's readiness

    def new_backend(launch: int, i: int):
        if to_adopt and i == 0 and (job := to_adopt.pop()()) is not None:
            adopted.append(job)
            return job
        return make_backend(settings, prof, run_id=run_id, flow_run_id=str(flow_run.id), replica=launch, url_index=i,
                            reward_step=swap.step if swap else None)

    replicas = replica_count(settings, prof, first.params.replicas)
    if (warning := unused_reward_servers(swap.step if swap else None, replicas)) is not None:
        get_run_logger().warning("pipeline run %s: %s", run_id, warning)
    return Pool(
        make_backend=new_backend,
        start=start, submit=stream.submit, release=give_back, shards=stream.feed(),
        release_failed=lambda backend: give_back(backend, failed=True),
        replicas=replicas,
        max_in_flight=shard_tasks_per_replica(settings, prof, first.cfg.shard_size,
                                              max(s.plan.samples for s in stages)),
        restarts_allowed=first.restarts_allowed, on_result=stream.on_result, report_first=True,
        keep_alive_s=settings.server.keep_alive_s, switch_interval_s=shard_switch_interval(settings, prof),
        planner=RolloverPlanner(rollover_policy(settings, prof)))


def generate_level(gen: list, *, asked: dict[str, RunParams], hashes: dict[str, StageHash], superseded: dict[str, list],
                   settings: Settings, flow_run, lease, output_uri: str, run_id: str, jobs: LevelJobs,
                   watch: Callable[[], None], levels: list) -> tuple[list[StageRun], Pool | None]:
    """One level's generating stages streamed on one pool (flows/pipeline_stream.py). A stage reading
    a reward stage (done at the level before) reads its rows.jsonl as a first stage reads its input. With
    work to do, the job the reward server kept (`jobs.adopt_from`) is given back to the generator and adopted."""
    stages: list[StageRun] = []
    pool = None
    with ExitStack() as inputs:
        for stage in gen:
            parent = next((s for s in stages if s.name == stage.from_), None)  # a generating parent of this level
            stages.append(open_stage(asked[stage.name], stage, len(stages), parent, hashes, settings, flow_run, lease,
                                     inputs, [superseded_store(output_uri, run_id, n, settings) for n in superseded[stage.name]]))
        stream = Stream(stages, settings)
        levels.append((stages, None))
        if not stream.has_work():
            get_run_logger().info("pipeline run %s: stage(s) %s: every shard is already published; nothing to allocate",
                                  run_id, ", ".join(s.name for s in stages))
            return stages, None
        pool = serve(stream, stages, settings, flow_run, run_id, jobs)
        levels[-1] = (stages, pool)
        if jobs.held is not None:
            jobs.held.watch(pool)
        stream.progress = {s.name: inputs.enter_context(closing(Artifacts(artifact_key(f"{run_id}-{s.name}"),
                                                                          f"pipeline run {run_id}, stage {s.name}")))
                           for s in stages}
        stream.replica_of = lambda backend: next((r.index for r in pool.members if r.backend is backend), None)
        if len(levels) == 1 or all(p is None for _, p in levels[:-1]):
            watch()  # one beat for every level (stopped by the flow)
        pool.run()  # releases every replica when the last shard is in, and on any error
    return stages, pool


def attribute_levels(levels: list[tuple[list[StageRun], Pool | None]], done: dict[str, dict]) -> dict:
    """attribute_allocation over each level's pool, summed: a stage's entry gets its own level's share."""
    parts = [attribute_allocation(stages, {n: e for n, e in done.items() if n in {s.name for s in stages}}, pool)
             for stages, pool in levels]
    for entry in done.values():
        for k in ("busy_s", "held_s", "gpu_hours"):
            entry.setdefault(k, 0.0)
    held, busy = sum(p["held_s"] for p in parts), sum(p["busy_s"] for p in parts)
    return {"gpu_hours": round(sum(p["gpu_hours"] for p in parts), 4), "held_s": round(held, 2), "busy_s": round(busy, 3),
            "busy_fraction": round(busy / held, 4) if held else None,
            "replicas": [{**r, **({"level": i} if len(parts) > 1 else {})} for i, p in enumerate(parts) for r in p["replicas"]],
            "attribution": "allocation split by each stage's share of the server's busy time (shards in flight)"
                           + ("; each level's pool (the stages after a reward stage) apart" if len(parts) > 1 else "")}


def gen_stages(the: Pipeline) -> list:
    return [s for s in the.stages if s.kind == "generate"]


def finish_stage(s: StageRun, parent: dict | None, hashes: StageHash, pool: Pool | None, flow_run, settings: Settings,
                 run_id: str, *, first: bool) -> dict:
    """The stage's end as a run's (parts closed, curated, its manifest), its rows.jsonl, its counts."""
    if parent is not None and not s.plan.records_in:
        raise InputError(f"pipeline run {run_id}: stage {s.stage.from_!r} left no rows for stage {s.name!r} "
                         f"({parent['rows_out']} generated, {parent['kept']} kept, filtered "
                         f"{parent['filtered'] or 'none'}, split dropped {parent['split_dropped'] or 'none'}); "
                         f"loosen the filters or split of {s.stage.from_!r}, or give it more input")
    ran = [(r.started_at, r.finished_at) for r in s.results]
    seconds = max(b for _, b in ran) - min(a for a, _ in ran) if ran else 0.0
    gpus = s.run.prof.billed_gpus
    members = pool.members if pool is not None else []
    out = finish(s.store, s.run.cfg, s.plan, s.results, {"generation": seconds} if ran else {}, settings,
                 [j for rep in members for j in rep.backend.job_ids],
                 restarts=pool.restarts if pool is not None and first else 0,  # the pool's, counted once
                 replicas=[rep.summary(gpus) for rep in members], invocation=str(flow_run.id),
                 rollovers=pool.planner.report(members, gpus) if pool is not None and first else None,
                 key=artifact_key(f"{run_id}-{s.name}"), what=f"pipeline run {run_id}, stage {s.name}", stage=s.name)
    rows = write_stage_rows(s.store, s.name, s.stage.split)
    manifest = json.loads(s.store.read_bytes(MANIFEST))
    return stage_entry(s.stage, s.run.cfg.input_uri, hashes, records_in=manifest["records_in"],
                       rows_out=out["records_written"], rejected=out["records_rejected"],
                       kept=out.get("records_kept", out["records_written"]), filtered=out.get("filtered", {}), rows=rows,
                       manifest=out["manifest"], generated_tokens=manifest["throughput"]["generated_tokens"],
                       seconds=round(seconds, 3))


def attribute_allocation(stages: list[StageRun], done: dict[str, dict], pool: Pool | None) -> dict:
    """This invocation's allocation (GPU-hours and seconds held, over every replica) attributed to the
    stages by their share of the server's busy time (infra/pipeline/schedule.py busy_by_stage): a
    moment with shards of two stages in flight counts half for each; loading and idle time is shared
    in the same proportion. Each stage's entry gains `busy_s`, `held_s`, `gpu_hours`."""
    busy = busy_by_stage((s.name, r.started_at, r.finished_at) for s in stages for r in s.results)
    busy = {s.name: busy.get(s.name, 0.0) for s in stages}
    prof = stages[0].run.prof
    gpus = prof.billed_gpus
    summaries = [rep.summary(gpus) for rep in pool.members] if pool is not None else []
    gpu_hours, held_s = sum(x["gpu_hours"] for x in summaries), sum(x["held_s"] for x in summaries)
    by_gpu, by_held = attribute(busy, gpu_hours), attribute(busy, held_s)
    for name, entry in done.items():  # a pairs stage ran on the CPU: none of the server's time
        entry |= {"busy_s": round(busy.get(name, 0.0), 3), "held_s": round(by_held.get(name, 0.0), 3),
                  "gpu_hours": round(by_gpu.get(name, 0.0), 4)}
    served = sum(busy.values())
    return {"gpu_hours": round(gpu_hours, 4), "held_s": round(held_s, 2), "busy_s": round(served, 3),
            "busy_fraction": round(served / held_s, 4) if held_s else None, "replicas": summaries,
            "attribution": "allocation split by each stage's share of the server's busy time (shards in flight)"}


def reading_parent(params: RunParams, stage) -> RunParams:
    """A stage with a parent reads the parent's kept rows after its split (`stages/{parent}/rows.jsonl`)."""
    if stage.from_ is None:
        return params
    return RunParams(**{**dict(params), "input_uri": f"{params.output_uri}/{stage.from_}/{STAGE_ROWS}"})


def stage_params(the: Pipeline, name: str, uri: str, *, output_uri: str, replicas: int | None,
                 max_server_restarts: int | None, shard_size: int | None = None) -> RunParams:
    """A stage's run parameters: its settings, the pipeline's server profile, its run directory (named
    after the stage) under the pipeline's; a child's input is set when its parent's rows exist."""
    stage = the.stage(name)
    server_name, server = the.server
    if server.engine is not None:
        raise ConfigError(f"pipeline {uri}: servers.{server_name}.engine: not supported by run --pipeline yet; "
                          "set the engine in the profile (NSDG_LOCAL__ENGINE, NSDG_EXTRA_PROFILES) and drop it here")
    try:
        return RunParams(**dict(stage.settings), profile=server.profile, output_uri=output_uri, run_id=name,
                         input_uri=the.input_of(stage) or "-", replicas=replicas, max_server_restarts=max_server_restarts,
                         **({"shard_size": shard_size} if shard_size is not None else {}))
    except ConfigError as exc:
        raise ConfigError(f"pipeline {uri}: stage {name!r}: {exc}".replace("\n", " ")) from None
