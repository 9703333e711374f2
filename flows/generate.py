"""The `generate` flow: plan → allocate → wait ready → generate shards (kept in flight) →
release → publish manifest. Release runs as soon as generation ends and again in `finally`;
the crash and cancellation hooks find the allocation from the flow-run id alone. A server
that dies or hangs mid-run is released and replaced (`max_server_restarts`), and generation
goes on from the shards not yet published. A Slurm job nearing its time limit rolls over to a
planned successor (`slurm.max_rollovers`), which is not a failure."""

from __future__ import annotations

import itertools
import time
from dataclasses import replace
from typing import Annotated, Literal

from prefect import flow, get_run_logger
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote
from pydantic import Field

from flows import progress as console_progress
from flows.artifacts import Artifacts, publish_table
from flows.params import RunParams, document_parameters, resolve_run_id
from flows.replicas import Pool
from flows.teardown import release_lease_on_hook, release_on_hook
from infra.backends import Backend, make_backend
from infra.slurm.backend import check_launch
from infra.slurm.spec import time_limit_s
from infra.errors import ConfigError
from infra.generation import Breaker, ShardJob, ShardResult
from infra.run.lease import hold_run_lease
from infra.storage.locations import check_run_locations
from infra.run.manifest import (INPUT_REJECTS, MANIFEST, REJECTS, Manifest, PartInfo, generated_tokens, prompt_matches,
                            rejects_name, run_job_ids, run_replicas)
from infra.planning import Plan, RunConfig, load_published, planned_shards
from infra.prompting.prompt_format import default_format
from infra.recipes import RecipeParams, load_recipe
from infra.backends.rollover import Measured, RolloverPolicy, busy_s, check_time_limit, mean_shard_s
from infra.engines.served_model import ServedModel, check_served, recorded_served
from infra.recipes.curate import Curation, CurationResult, curate, remove_outputs
from infra.recipes.judge import judged_current, load_judge
from infra.recipes.params import FilterParams, JudgeParams
from infra.prompting.sampling import SamplingParams
from infra.settings import Settings, load_settings
from infra.storage import OutputStore, check_input, open_input, open_output_store
from tasks.steps import allocate, generate_shard, judge_shard, plan, release, wait_ready



@flow(
    name="generate",
    task_runner=ThreadPoolTaskRunner(max_workers=8),
    on_cancellation=[release_on_hook],
    on_crashed=[release_on_hook],
    on_completion=[release_lease_on_hook],
    on_failure=[release_lease_on_hook],
)
@document_parameters
def generate(
    input_uri: Annotated[str, Field(description="prompts: a JSONL or .txt path, file:// or s3:// URI, optionally .gz")] = "examples/prompts.jsonl",
    output_uri: Annotated[str | None, Field(description="where results go (local path, file:// or s3://bucket/prefix); default NSDG_OUTPUT_URI")] = None,
    run_id: Annotated[str | None, Field(description="reuse a run id to resume it; default: derived from the flow run")] = None,
    profile: Annotated[str, Field(description="h100x16, a100x16, h200x8, local, attach, or one from NSDG_EXTRA_PROFILES")] = "local",
    sampling: Annotated[SamplingParams, Field(description="sampling parameters sent to /generate")] = SamplingParams(),
    batch_size: Annotated[int, Field(ge=1, le=128, description="prompts per PUT /generate (the server allows at most 128)")] = 32,
    shard_size: Annotated[int, Field(ge=1, le=1_000_000, description="records per output part: the unit of retry, resume and upload")] = 4000,
    prompt_field: Annotated[str, Field(description="JSONL field holding the prompt")] = "prompt",
    on_bad_input: Annotated[Literal["fail", "skip"], Field(description="fail on unusable lines, or skip them into rejects.jsonl")] = "fail",
    overlong_prompts: Annotated[Literal["reject", "truncate_left"], Field(description="prompts too long for the context: reject them, or keep their end")] = "reject",
    prompt_format: Annotated[Literal["raw", "nemotron-instruct", "chat"] | None, Field(description="how each prompt is wrapped: raw (a base model), nemotron-instruct, or chat (the model's chat template); default: the profile's (local: chat when its model has a template, else raw)")] = None,
    replicas: Annotated[int | None, Field(ge=1, le=64, description="server replicas sharing the work, each its own allocation; default NSDG_SERVER__REPLICAS (1)")] = None,
    max_server_restarts: Annotated[int | None, Field(ge=0, le=20, description="servers started anew after one dies or hangs; default NSDG_SERVER__MAX_SERVER_RESTARTS (2)")] = None,
    recipe: Annotated[RecipeParams, Field(description="prompts from a template over each record, few-shot examples, several samples per prompt")] = RecipeParams(),
    judge: Annotated[JudgeParams, Field(description="score each generated record with the same server (same allocation): a judging template, the score's pattern, a minimum score")] = JudgeParams(),
    filters: Annotated[FilterParams, Field(description="what is kept: truncation, length, repetition, regexes, exact and near duplicates; dropped records go to filtered.jsonl with their reason. Changing only these reruns no generation")] = FilterParams(),
) -> dict:
    """Generate completions for every prompt and publish them with a manifest."""
    logger = get_run_logger()
    settings = load_settings()
    flow_run = get_run_context().flow_run
    prof = settings.profile(profile)  # an unknown profile fails here, before anything is read
    tokenizer = settings.tokenizer_path(prof)
    if tokenizer is None and prof.backend == "slurm":
        logger.warning("no tokenizer for %s: prompts are counted as UTF-8 bytes, which over-counts English 3-4x and "
                       "can under-count where normalization expands text; set NSDG_MODEL__TOKENIZER to the model's "
                       "tokenizer (.model, tokenizer.json or the extracted .nemo directory)", settings.model.path)
    params = RunParams(
        input_uri=input_uri, output_uri=output_uri or settings.output_uri,
        run_id=run_id or resolve_run_id(flow_run), profile=profile, sampling=sampling,
        batch_size=batch_size, shard_size=shard_size, prompt_field=prompt_field, on_bad_input=on_bad_input,
        overlong_prompts=overlong_prompts, tokenizer=tokenizer,
        prompt_format=default_format(prompt_format, prof.prompt_format, prof.backend, tokenizer), recipe=recipe,
        judge=judge, filters=filters,
    )
    if sampling.tokens_to_generate >= settings.model.context_length:  # once, not once per line
        raise ConfigError(
            f"sampling.tokens_to_generate={sampling.tokens_to_generate} leaves no room for a prompt in the context "
            f"length {settings.model.context_length} (NSDG_MODEL__CONTEXT_LENGTH): lower tokens_to_generate.")
    if prof.backend == "slurm":
        check_launch(settings, prof, run_id=params.run_id)  # image, model path, directives: before any read
    # NSDG_ALLOWED_URIS: every location the run reads or writes, the recipe's files too, before any read.
    check_run_locations(params.input_uri, params.output_uri, params.run_id, settings,
                        extra={**params.recipe.locations(), **params.judge.locations()})
    cfg = params.to_run_config(load_recipe(params.recipe, settings), Curation(params.judge, params.filters))  # read once
    if params.judge.enabled:  # the judge's template read once too; it is sent in the run's prompt format
        cfg = replace(cfg, curation=replace(cfg.curation, judge=load_judge(params.judge, settings, cfg.prompt_format,
                                                                            cfg.sampling.add_BOS, cfg.counter)))
    restarts_allowed = settings.server.max_server_restarts if max_server_restarts is None else max_server_restarts
    store = open_output_store(cfg.output_uri, cfg.run_id, settings)
    check_input(cfg.input_uri, settings)  # both before the lease, the run's first write: a refusal writes nothing
    store.preflight()
    # One run per run_id; every write from here on checks the lease is still this run's (LeaseLost if not).
    store = hold_run_lease(store, str(flow_run.id), flow_run.name, settings.run_lease_ttl_s).fenced()
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    the_plan = plan(cfg, settings, store)
    timings["plan"] = time.monotonic() - t0
    console_progress.planned(the_plan.rows_planned, sum(p.records + p.rejected for p in the_plan.done.values()))
    # Parts published but not judged by this judge (its template changed, or a kill came in between).
    to_judge = [p for _, p in sorted(the_plan.done.items())
                if cfg.curation.judge is not None and not judged_current(store, cfg.curation.judge, p)]
    if not the_plan.todo and not to_judge:
        logger.info("all %d shards of run %s are already published; nothing to allocate", the_plan.shards_total, cfg.run_id)
        return finish(store, cfg, the_plan, [], timings, settings, [], restarts=0, replicas=[], invocation=str(flow_run.id))

    check_limit_before_submit(rollover_policy(settings, prof), list(the_plan.done.values()))  # before any sbatch
    breaker = Breaker(settings.server.breaker_window, settings.server.breaker_max_share)
    # Best-effort, off the pool's thread: an API outage must not stop the servers' feed or fail the run.
    progress = Artifacts(_artifact_key(cfg.run_id), description=f"shards of run {cfg.run_id}")
    progress.progress(100.0 * len(the_plan.done) / the_plan.shards_total)
    job = ShardJob(cfg.run_id, settings.model.name, the_plan.config_hash, cfg.sampling, cfg.batch_size,
                   prompt_format=cfg.prompt_format, samples=the_plan.samples, invocation=str(flow_run.id),
                   judge=cfg.curation.judge, requested_model=settings.model.name)
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
    published = [len(the_plan.done)]

    def on_result(result: ShardResult) -> None:
        if result.judged_only:
            return
        published[0] += 1
        console_progress.advanced(result.part.records + result.part.rejected, pool.restarts, pool.rollovers)
        progress.progress(100.0 * published[0] / the_plan.shards_total)

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
    source = open_input(cfg.input_uri, settings, pin=the_plan.input_pin)
    with source as stream:
        pool = Pool(
            make_backend=lambda launch, i: make_backend(settings, prof, run_id=cfg.run_id, flow_run_id=str(flow_run.id),
                                                        replica=launch, url_index=i),
            start=start,
            submit=lambda client, work, backend: submit_work(client, work, shard_job(backend, client), store, backend, breaker),
            release=timed_release,
            shards=itertools.chain(planned_shards(stream, cfg, settings, the_plan, source.verify), to_judge),
            replicas=replica_count(settings, prof, replicas),
            max_in_flight=shard_tasks_per_replica(settings, prof, cfg.shard_size, the_plan.samples),
            restarts_allowed=restarts_allowed,
            on_result=on_result,
            keep_alive_s=settings.server.keep_alive_s,
            rollover=rollover_policy(settings, prof),
        )
        try:
            results = pool.run()
        finally:
            progress.close()
            ready = pool.first_ready
            timings["queue_and_load"] = (ready or time.time()) - t_wall
            if ready:  # first replica ready -> last shard published (releases are timed apart)
                timings["generation"] = (pool.last_result_at or time.time()) - ready
    gpus = prof.nodes * prof.gpus_per_node if prof.backend == "slurm" else 0
    return finish(store, cfg, the_plan, results, timings, settings,
                  [j for rep in pool.members for j in rep.backend.job_ids], restarts=pool.restarts,
                  replicas=[rep.summary(gpus) for rep in pool.members], invocation=str(flow_run.id),
                  rollovers=pool.rollover_report(gpus))


def rollover_policy(settings: Settings, profile) -> RolloverPolicy:
    """Planned successors for Slurm jobs (their time limit is known); none elsewhere."""
    slurm = settings.slurm
    return RolloverPolicy(factor=slurm.rollover_factor, margin_s=slurm.rollover_margin_s,
                          max_rollovers=slurm.max_rollovers if profile.backend == "slurm" else 0,
                          limit_s=time_limit_s(slurm.time_limit))


def check_limit_before_submit(policy: RolloverPolicy, done: list[PartInfo]) -> None:
    """Before any job is submitted: what this run already measured (its published shards' time;
    a model's load is measured only once a job of this run loads it, and checked again then,
    before its successor is submitted) must fit in the time limit."""
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
    """Shard tasks kept running per replica. nemo-generate: one request per shard task at a time, so
    `in_flight` of them (one computing, one queued). openai-completions: `in_flight` counts requests,
    which the replica's client pool keeps open across its shards (infra/engines/openai.py); enough
    shards run to fill it, plus one so a shard's tail never leaves the engine short (capped: the
    flow's task runner has 8 threads)."""
    in_flight = settings.in_flight(profile)
    if settings.api(profile) == "nemo-generate":
        return in_flight
    return max(2, min(6, -(-in_flight // max(1, shard_size * samples)) + 1))


def submit_work(client, work, job: ShardJob, store: OutputStore, backend: Backend, breaker: Breaker):
    """A shard to generate (and judge), or a published part (PartInfo) to judge only."""
    if isinstance(work, PartInfo):
        return judge_shard.submit(client, work, job, store, backend)
    # quote(): Prefect would otherwise walk every record of the shard twice per task run.
    return generate_shard.submit(client, quote(work), job, store, backend, breaker)


def replica_count(settings: Settings, profile, requested: int | None) -> int:
    if requested is not None:
        return requested
    if profile.backend == "attach" and settings.server.urls:
        return len(settings.server.urls)
    return settings.server.replicas


def _add(timings: dict, key: str, seconds: float) -> None:
    timings[key] = timings.get(key, 0.0) + seconds


def _artifact_key(run_id: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in run_id.lower())[:60]


def merge_rejects(store: OutputStore, parts, input_rejected: int) -> int:
    """rejects.jsonl = the plan's input rejects + every part's server rejects. Returns how many
    records the server refused."""
    refused = sum(p.rejected for p in parts)
    if refused or input_rejected:
        chunks = [store.read_bytes(INPUT_REJECTS) or b""] if input_rejected else []
        chunks += [store.read_bytes(rejects_name(p.name)) or b"" for p in parts if p.rejected]
        store.write_bytes(REJECTS, b"".join(chunks))
    return refused


def earlier_manifest(store: OutputStore, chash: str) -> Manifest | None:
    """The manifest an earlier invocation of this run published under the same config, if any."""
    data = store.read_bytes(MANIFEST)
    if data is None:
        return None
    try:
        manifest = Manifest.from_json(data)
    except (ValueError, KeyError, TypeError):  # unreadable: rebuilt from the states
        return None
    return manifest if manifest.config_hash == chash else None


def finish(store: OutputStore, cfg: RunConfig, the_plan: Plan, results: list[ShardResult], timings, settings: Settings,
           job_ids, *, restarts: int, replicas: list[dict], invocation: str, rollovers: dict | None = None) -> dict:
    """The manifest of the whole run, from every part's state object; an invocation that generated
    nothing leaves a complete manifest as it is."""
    logger = get_run_logger()
    parts = sorted(load_published(store, the_plan.config_hash).values(), key=lambda p: p.shard)
    written = sum(p.records for p in parts)
    refused = merge_rejects(store, parts, the_plan.rejected)
    gen_s = timings.get("generation", 0.0)
    new_records = sum(r.part.records for r in results if not r.judged_only)
    if len(parts) != the_plan.shards_total or written + refused != the_plan.rows_planned:
        raise RuntimeError(
            f"run {cfg.run_id}: {len(parts)} of {the_plan.shards_total} parts with {written} records written and "
            f"{refused} refused, but {the_plan.rows_planned} planned; no manifest published. Rerun with the same run_id."
        )
    store.abort_incomplete_uploads()  # every part is in: nothing of this run may still be uploading
    curated = curate_run(store, cfg, parts, the_plan.config_hash, timings)
    earlier = earlier_manifest(store, the_plan.config_hash)
    if not results and earlier is not None and earlier.parts == parts and earlier.curation == curated:
        logger.info("run %s: its manifest is complete and describes these parts; left as it is", cfg.run_id)
        manifest = earlier
    else:
        # The model the run's first server reported (an invocation that started none: what the settings serve).
        served = recorded_served(store) or ServedModel(settings.model.name, the_plan.config["served_model"])
        manifest = Manifest(
            run_id=cfg.run_id, config_hash=the_plan.config_hash, config=the_plan.config, model=served.label,
            served_model=served.as_manifest(), requested_model=settings.model.name,
            profile=cfg.profile, input_uri=cfg.input_uri, records_in=the_plan.records_in, records_written=written,
            records_rejected=the_plan.rejected + refused, parts=parts,
            slurm_job_ids=run_job_ids(earlier, parts, list(job_ids)),
            # A rerun that generated nothing (a new filter, a new judge) keeps the generating invocation's figures.
            timings_s={**(earlier.timings_s if earlier and not new_records else {}), **{k: round(v, 3) for k, v in timings.items()}},
            throughput={"records_per_s": round(new_records / gen_s, 3) if gen_s and new_records else
                        (earlier.throughput.get("records_per_s") if earlier else None),
                        "generated_tokens": generated_tokens(parts)},
            rejects=REJECTS if (the_plan.rejected or refused) else None,
            server_restarts=(earlier.server_restarts if earlier else 0) + restarts,
            replicas=run_replicas(earlier, parts, replicas, invocation), rollovers=rollovers or {},
            token_counter=cfg.counter.description, prompt_match=prompt_matches(parts), curation=curated,
        )
        store.write_bytes(MANIFEST, manifest.to_json())
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
    publish_table(_artifact_key(cfg.run_id), [{"figure": k, "value": str(v)} for k, v in summary.items()],
                  description=f"run {cfg.run_id}: manifest at {manifest_uri}")
    logger.info("run %s complete: %d records in %d parts; manifest %s", cfg.run_id, written, len(parts), manifest_uri)
    out = {"run_id": cfg.run_id, "manifest": manifest_uri, "records_written": written,
           "records_rejected": the_plan.rejected + refused}
    if manifest.curation:
        out |= {"records_kept": manifest.curation["records_kept"], "filtered": manifest.curation["filtered"]}
    return out


def curate_run(store: OutputStore, cfg: RunConfig, parts: list[PartInfo], chash: str, timings: dict) -> dict | None:
    """The judge's scores, the filters and dedup over every part (no server): the manifest's `curation`.
    With the stage off, an earlier pass's kept and filtered files go: the manifest will not name them."""
    if not cfg.curation.enabled:
        remove_outputs(store)
        return None
    t = time.monotonic()
    result: CurationResult = curate(store, parts, cfg.curation, chash)
    timings["curation"] = time.monotonic() - t
    return {**result.as_manifest(), "config": cfg.curation.fingerprint()}


def curation_figures(curation: dict | None) -> dict:
    """The summary's rows for the kept records and each reason a record was dropped."""
    if not curation:
        return {}
    return {"kept": curation["records_kept"],
            **{f"filtered: {reason}": n for reason, n in curation["filtered"].items()}}
