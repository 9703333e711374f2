"""The `generate` flow: plan → allocate → wait ready → generate shards (kept in flight) →
release → publish manifest. Release runs as soon as generation ends and again in `finally`;
the crash and cancellation hooks find the allocation from the flow-run id alone. A server
that dies or hangs mid-run is released and replaced (`max_server_restarts`), and generation
goes on from the shards not yet published. A Slurm job nearing its time limit rolls over to a
planned successor (`slurm.max_rollovers`), which is not a failure."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace

from prefect import flow, get_run_logger
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from flows import progress as console_progress
from flows.artifacts import Artifacts, artifact_key, publish_sample_rows, publish_table
from flows.params import RunParams, resolve_run_id, run_name, with_run_parameters
from flows.replicas import Pool
from flows.rollovers import RolloverPlanner
from flows.teardown import release_lease_on_hook, release_on_hook
from infra.backends import Backend, make_backend
from infra.slurm.backend import check_launch
from infra.slurm.parse import time_limit_s
from infra.errors import ConfigError
from infra.generation import SHARD_SWITCH_INTERVAL_S, Breaker, RowTally, ShardJob, ShardResult
from infra.run.lease import FencedStore, RunLease, hold_run_lease
from infra.storage.locations import check_run_locations
from infra.run.layout import MANIFEST
from infra.run.manifest import PartInfo
from infra.planning import Plan, RunConfig, planned_shards
from infra.prompting.prompt_format import default_format, load_prompt_format
from infra.recipes import load_recipe
from infra.backends.rollover import Measured, RolloverPolicy, busy_s, check_time_limit, mean_shard_s
from infra.engines.served_model import ServedModel, check_served
from infra.recipes.curate import Curation
from infra.recipes.judge import judged_current, load_judge
from infra.recipes.structured import Structured
from infra.settings import Settings, check_no_placeholders, load_settings
from infra.storage import OutputStore, check_input, open_input, open_output_store
from tasks.steps import (allocate, close_run_parts, curate, export, for_stage, generate_shard, judge_shard, plan, release,
                         wait_ready, write_manifest)



@flow(
    name="generate",
    flow_run_name=run_name,
    task_runner=ThreadPoolTaskRunner(max_workers=8),
    on_cancellation=[release_on_hook],
    on_crashed=[release_on_hook],
    on_completion=[release_lease_on_hook],
    on_failure=[release_lease_on_hook],
)
@with_run_parameters
def generate(**given) -> dict:
    """Generate completions for every prompt and publish them with a manifest."""
    settings = load_settings()
    flow_run = get_run_context().flow_run
    asked = RunParams(**given)  # the signature, the UI form and the CLI's flags are RunParams' fields
    run = prepare_run(asked, settings, flow_run)
    out = run_prepared(run, settings, flow_run)
    if run.params.export:  # trainer files and a dataset card, after the manifest (docs/outputs.md)
        out["dataset"] = export(run.store, run.cfg.output_uri, run.cfg.run_id, settings)
    return out


@dataclass
class Prepared:
    """A run checked, its recipe and judge read, its store opened and its lease held: what is left
    is plan, generate, finish (`run_prepared`); a pipeline prepares each stage as its input is made."""
    params: RunParams
    prof: object
    cfg: RunConfig
    store: OutputStore
    restarts_allowed: int


def prepare_run(asked: RunParams, settings: Settings, flow_run, *, lease: RunLease | None = None,
                input_made_later: bool = False) -> Prepared:
    """Every check a run makes before its first write, then its store and lease (the run's first write).
    `input_made_later`: a streamed pipeline stage's input, its parent's rows, does not exist yet."""
    logger = get_run_logger()
    prof = settings.profile(asked.profile)  # an unknown profile fails here, before anything is read
    asked.check_runnable(prof.backend)  # placeholders, the demo input on a cluster: before any read or sbatch
    check_no_placeholders(settings)
    tokenizer = settings.tokenizer_path(prof)
    if tokenizer is None and prof.backend == "slurm":
        logger.warning("no tokenizer for %s: prompts are counted as UTF-8 bytes, which over-counts English 3-4x and "
                       "can under-count where normalization expands text; set NSDG_MODEL__TOKENIZER to the model's "
                       "tokenizer (.model, tokenizer.json or the extracted .nemo directory)", settings.model.path)
    params = asked.resolved(output_uri=settings.output_uri, run_id=resolve_run_id(flow_run),
                            prompt_format=default_format(asked.prompt_format, prof.prompt_format, prof.backend, tokenizer))
    if params.sampling.tokens_to_generate >= settings.model.context_length:  # once, not once per line
        raise ConfigError(
            f"sampling.tokens_to_generate={params.sampling.tokens_to_generate} leaves no room for a prompt in the context "
            f"length {settings.model.context_length} (NSDG_MODEL__CONTEXT_LENGTH): lower tokens_to_generate.")
    if prof.backend == "slurm":
        check_launch(settings, prof, run_id=params.run_id)  # image, model path, directives: before any read
    # NSDG_ALLOWED_URIS: every location the run reads or writes, the recipe's files too, before any read.
    check_run_locations(params.input_uri, params.output_uri, params.run_id, settings.allowed_uris,
                        extra={**params.recipe.locations(), **params.judge.locations()})
    cfg = params.to_run_config(load_recipe(params.recipe, settings),  # read once
                               Curation(params.judge, params.filters, schema=params.output_schema is not None),
                               tokenizer=tokenizer)
    if params.judge.enabled:  # the judge's template read once too; sent in its own prompt format, else the run's
        judge_format = load_prompt_format(params.judge.prompt_format, tokenizer) if params.judge.prompt_format \
            else cfg.prompt_format
        if params.judge.system_prompt:
            judge_format = judge_format.with_system(params.judge.system_prompt)
        cfg = replace(cfg, curation=replace(cfg.curation, judge=load_judge(params.judge, settings, judge_format,
                                                                            cfg.sampling.add_BOS, cfg.counter)))
    restarts_allowed = settings.server.max_server_restarts if params.max_server_restarts is None else params.max_server_restarts
    store = open_output_store(cfg.output_uri, cfg.run_id, settings.s3, settings.work_path("staging"))
    if not input_made_later:
        check_input(cfg.input_uri, settings.s3)  # both before the lease, the run's first write: a refusal writes nothing
    store.preflight()
    # One run per run_id; every write from here on checks the lease is still this run's (LeaseLost if not).
    if lease is not None:  # a pipeline's stage: fenced by the pipeline's own lease, which covers its stages
        store = FencedStore(store, lease)
    else:
        store = hold_run_lease(store, str(flow_run.id), flow_run.name, settings.run_lease_ttl_s).fenced()
    return Prepared(params, prof, cfg, store, restarts_allowed)


def run_prepared(run: Prepared, settings: Settings, flow_run) -> dict:
    """Plan, generate the shards not yet published (a pool of replicas), then close, curate and
    publish the manifest."""
    logger = get_run_logger()
    params, prof, cfg, store, restarts_allowed = run.params, run.prof, run.cfg, run.store, run.restarts_allowed
    timings: dict[str, float] = {}
    key, what = artifact_key(cfg.run_id), f"run {cfg.run_id}"  # the UI artifacts' (a pipeline's stages: flows/pipeline.py)
    t0 = time.monotonic()
    the_plan = plan(cfg, settings, store)
    timings["plan"] = time.monotonic() - t0
    console_progress.planned(the_plan.rows_planned, sum(p.records + p.rejected for p in the_plan.done.values()))
    # Parts published but not judged by this judge (its template changed, or a kill came in between).
    to_judge = [p for _, p in sorted(the_plan.done.items())
                if cfg.curation.judge is not None and not judged_current(store, cfg.curation.judge, p)]
    if not the_plan.todo and not to_judge:
        logger.info("all %d shards of run %s are already published; nothing to allocate", the_plan.shards_total, cfg.run_id)
        return finish(store, cfg, the_plan, [], timings, settings, [], restarts=0, replicas=[], invocation=str(flow_run.id),
                      key=key, what=what)

    check_limit_before_submit(rollover_policy(settings, prof), list(the_plan.done.values()))  # before any sbatch
    breaker = Breaker(settings.server.breaker_window, settings.server.breaker_max_share)
    # Best-effort, off the pool's thread: an API outage must not stop the servers' feed or fail the run.
    progress = Artifacts(key, description=what)
    ui_progress = console_progress.ArtifactView(progress)  # records, rate, ETA; moves within a shard too
    ui_progress.planned(the_plan.rows_planned, sum(p.records + p.rejected for p in the_plan.done.values()))
    tally = RowTally(console_progress.generating)  # each shard's rows as they come in, to every listener
    job = planned_job(cfg, settings, the_plan, flow_run)
    if to_judge:
        logger.info("run %s: %d published part(s) to judge (the judge changed or never ran on them); no regeneration",
                    cfg.run_id, len(to_judge))

    served_by: dict[Backend, ServedModel] = {}

    def shard_job(backend: Backend, client) -> ShardJob:
        """The run's ShardJob with who makes this shard, for its state object, and the model that
        answers, for its rows: checked once per server against the one the run's first server served."""
        if (served := served_by.get(backend)) is None:
            served = ServedModel(settings.model.name, the_plan.config["served_model"], client.served)
            check_served(store, served, backend.url() or backend.status())
            served_by[backend] = served
        replica = next((rep.index for rep in pool.members if rep.backend is backend), None)
        return replace(job, model=served.label, replica=replica, job_ids=tuple(backend.job_ids))

    def on_result(result: ShardResult) -> None:
        if result.judged_only:
            return
        console_progress.advanced(result.part.records + result.part.rejected, pool.restarts, pool.planner.rollovers)
        tally.published(result.part.shard)  # after: its rows are in `done` before they leave the partial count

    def start(backend: Backend):
        allocate(backend)
        return wait_ready.submit(backend, settings, cfg.counter, prof)

    def timed_release(backend: Backend) -> None:
        t = time.monotonic()
        try:
            release(backend)  # as soon as its work ends, before the manifest; also on any error
        finally:
            _add(timings, "release", time.monotonic() - t)

    t_wall = time.time()
    # The second read of the input, pinned to what the plan read: a change stops the run.
    source = open_input(cfg.input_uri, settings.s3, pin=the_plan.input_pin)
    with source as stream, console_progress.listening(ui_progress):
        pool = Pool(
            make_backend=lambda launch, i: make_backend(settings, prof, run_id=cfg.run_id,
                                                        flow_run_id=str(flow_run.id), replica=launch, url_index=i),
            start=start,
            submit=lambda client, work, backend: submit_work(client, work, shard_job(backend, client), store, backend,
                                                             breaker, tally),
            release=timed_release,
            shards=itertools.chain(planned_shards(stream, cfg, settings, the_plan, source.verify), to_judge),
            replicas=replica_count(settings, prof, params.replicas),
            max_in_flight=shard_tasks_per_replica(settings, prof, cfg.shard_size, the_plan.samples),
            restarts_allowed=restarts_allowed,
            on_result=on_result,
            keep_alive_s=settings.server.keep_alive_s,
            planner=RolloverPlanner(rollover_policy(settings, prof)),
            switch_interval_s=shard_switch_interval(settings, prof),
        )
        try:
            results = pool.run()
        finally:
            progress.close()
            ready = pool.first_ready
            timings["queue_and_load"] = (ready or time.time()) - t_wall
            if ready:  # first replica ready -> last shard published (releases are timed apart)
                timings["generation"] = (pool.last_result_at or time.time()) - ready
    gpus = prof.billed_gpus
    return finish(store, cfg, the_plan, results, timings, settings,
                  [j for rep in pool.members for j in rep.backend.job_ids], restarts=pool.restarts,
                  replicas=[rep.summary(gpus) for rep in pool.members], invocation=str(flow_run.id),
                  rollovers=pool.planner.report(pool.members, gpus), key=key, what=what)


def rollover_policy(settings: Settings, profile) -> RolloverPolicy:
    """Planned successors for Slurm jobs (their time limit is known); none elsewhere."""
    slurm = settings.slurm
    return RolloverPolicy(factor=slurm.rollover_factor, margin_s=slurm.rollover_margin_s,
                          max_rollovers=slurm.max_rollovers if profile.backend == "slurm" else 0,
                          limit_s=time_limit_s(slurm.time_limit),
                          expected_load_s=profile.expected_load_s if slurm.expected_load_s is None else slurm.expected_load_s)


def check_limit_before_submit(policy: RolloverPolicy, done: list[PartInfo]) -> None:
    """Before any job is submitted: what this run already measured (its published shards' time)
    and the load it assumes (the policy's prior: a model's load is measured only once a job of
    this run loads it, and checked again then, before its successor is submitted) must fit in the
    time limit. A fresh run is judged by the prior alone."""
    ran = [(p.started_at, p.finished_at) for p in done if p.started_at is not None and p.finished_at is not None]
    check_time_limit(Measured(shard_s=mean_shard_s(busy_s(ran), len(ran))), policy)


def rollover_figures(rollovers: dict) -> dict:
    """The summary table's rows for planned rollovers (none when there were none)."""
    if not rollovers.get("count"):
        return {}
    return {"rollovers (planned)": rollovers["count"], "rollovers late": rollovers["late"],
            "rollover overlap GPU-hours": rollovers["overlap_gpu_hours"],
            "largest rollover gap (s)": rollovers["largest_gap_s"]}


def shard_tasks_per_replica(settings: Settings, profile, shard_size: int, samples: int) -> int:
    """Shard tasks kept running per replica. nemo-generate: one request per shard task at a time,
    `in_flight` of them open (one computing, one queued) through the replica's client, which bounds
    them (infra/engines/nemo.py); one shard task more waits for a slot, so a shard parsing a reply or
    publishing its part never leaves the server short. openai-completions: `in_flight` counts requests,
    which the replica's client pool keeps open across its shards (infra/engines/openai.py); enough
    shards run to fill it, plus one so a shard's tail never leaves the engine short (capped: the
    flow's task runner has 8 threads)."""
    in_flight = settings.in_flight(profile)
    if settings.api(profile) == "nemo-generate":
        return in_flight + 1
    return max(2, min(6, -(-in_flight // max(1, shard_size * samples)) + 1))


def shard_switch_interval(settings: Settings, profile) -> float | None:
    """The GIL switch interval while a pool generates (infra/generation.py responsive_threads):
    nemo-generate's shard threads each wait for a request slot, and the one whose slot frees must send
    at once; openai-completions keeps the interpreter's (not measured to gain)."""
    return SHARD_SWITCH_INTERVAL_S if settings.api(profile) == "nemo-generate" else None


def submit_work(client, work, job: ShardJob, store: OutputStore, backend: Backend, breaker: Breaker,
                tally: RowTally | None = None):
    """A shard to generate (and judge), or a published part (PartInfo) to judge only."""
    if isinstance(work, PartInfo):
        return judge_shard.submit(client, work, job, store, backend)
    # quote(): Prefect would otherwise walk every record of the shard twice per task run.
    return generate_shard.submit(client, quote(work), job, store, backend, breaker, tally)


def replica_count(settings: Settings, profile, requested: int | None) -> int:
    if requested is not None:
        return requested
    if profile.backend == "attach" and settings.server.urls:
        return len(settings.server.urls)
    return settings.server.replicas


def _add(timings: dict, key: str, seconds: float) -> None:
    timings[key] = timings.get(key, 0.0) + seconds


def finish(store: OutputStore, cfg: RunConfig, the_plan: Plan, results: list[ShardResult], timings, settings: Settings,
           job_ids, *, restarts: int, replicas: list[dict], invocation: str, rollovers: dict | None = None,
           key: str | None = None, what: str | None = None, stage: str | None = None) -> dict:
    """Every part in, curated, the manifest written (tasks: each retried on a transient error, named
    after a pipeline's `stage`); then the run's summary table and result."""
    logger = get_run_logger()
    parts, refused = for_stage(close_run_parts, stage)(store, cfg, the_plan)
    curated, curation_s = for_stage(curate, stage)(store, cfg.curation, parts, the_plan.config_hash)
    if curation_s is not None:
        timings["curation"] = curation_s
    manifest = for_stage(write_manifest, stage)(store, cfg, the_plan, parts, refused, curated, results, timings, settings,
                                                job_ids, restarts=restarts, replicas=replicas, invocation=invocation,
                                                rollovers=rollovers)
    written = sum(p.records for p in parts)
    manifest_uri = store.uri(MANIFEST)
    summary = {"records in": the_plan.records_in, "written": written, "rejected": the_plan.rejected + refused,
               "tokens generated": manifest.throughput["generated_tokens"], "records/s": manifest.throughput["records_per_s"],
               **{f"{phase} (s)": round(v, 2) for phase, v in timings.items()},
               "server restarts": manifest.server_restarts,
               **rollover_figures(manifest.rollovers),
               "replicas": len({(r.get("invocation"), r["replica"]) for r in manifest.replicas}),
               "GPU-hours held": round(sum(r.get("gpu_hours") or 0 for r in manifest.replicas), 3),
               "prompt found in reply": ", ".join(f"{k} {v}" for k, v in manifest.prompt_match.items()) or "—",
               "token counter": manifest.token_counter, **curation_figures(manifest.curation), "manifest": manifest_uri}
    # One row per figure: a wide one-row table is cut off in the UI.
    key, what = key or artifact_key(cfg.run_id), what or f"run {cfg.run_id}"
    publish_table(key, [{"figure": k, "value": str(v)} for k, v in summary.items()],
                  description=f"{what}: manifest at {manifest_uri}")
    kept = manifest.curation["kept_parts"] if manifest.curation else [{"name": p.name, "records": p.records} for p in parts]
    publish_first_rows(store, key, [p["name"] for p in kept if p["records"]], what)
    logger.info("run %s complete: %d records in %d parts; manifest %s", cfg.run_id, written, len(parts), manifest_uri)
    out = {"run_id": cfg.run_id, "manifest": manifest_uri, "records_written": written,
           "records_rejected": the_plan.rejected + refused}
    if manifest.curation:
        out |= {"records_kept": manifest.curation["records_kept"], "filtered": manifest.curation["filtered"]}
    return out


def publish_first_rows(store: OutputStore, key: str, names: list[str], what: str) -> None:
    """A few finished (kept) rows as a table on the run page: best-effort, from the first part that
    has any (read whole: a part is one shard); an unreadable part costs the table, not the run."""
    try:
        data = store.read_bytes(names[0]) if names else None
    except Exception as exc:  # noqa: BLE001 - a glance at the data must never fail a finished run
        get_run_logger().warning("%s: no sample rows on the run page (%s: %s)", what, type(exc).__name__, exc)
        return
    if data:
        publish_sample_rows(key, data.splitlines(), f"{what}: the first finished rows of {names[0]} "
                                                    f"({store.uri(names[0])}), cut to fit")


def curation_figures(curation: dict | None) -> dict:
    """The summary's rows for the kept records and each reason a record was dropped."""
    if not curation:
        return {}
    return {"kept": curation["records_kept"],
            **{f"filtered: {reason}": n for reason, n in curation["filtered"].items()}}


def planned_job(cfg, settings: Settings, the_plan, flow_run, stage: str | None = None) -> ShardJob:
    """What every shard task of a run (or a pipeline stage) is asked to make: one definition, so a
    run's settings reach a stage's shards the same way (the pipeline builds its stages' jobs here)."""
    return ShardJob(cfg.run_id, settings.model.name, the_plan.config_hash, cfg.sampling, cfg.batch_size,
                    prompt_format=cfg.prompt_format, samples=the_plan.samples, invocation=str(flow_run.id),
                    judge=cfg.curation.judge, requested_model=settings.model.name,
                    structured=Structured(cfg.output_schema) if cfg.output_schema is not None else None,
                    max_attempts=cfg.max_attempts, stage=stage)
