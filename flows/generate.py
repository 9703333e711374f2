"""The `generate` flow: plan → allocate → wait ready → generate shards (kept in flight) →
release → publish manifest. Release runs as soon as generation ends and again in `finally`;
the crash and cancellation hooks find the allocation from the flow-run id alone. A server
that dies or hangs mid-run is released and replaced (`max_server_restarts`), and generation
goes on from the shards not yet published."""

from __future__ import annotations

import time
from collections import deque
from typing import Annotated, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.context import get_run_context
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from flows.params import RunParams, resolve_run_id
from flows.teardown import release_on_hook
from infra.backends import Backend, make_backend
from infra.dataset import iter_shards
from infra.errors import ServerLost, TransientServerError
from infra.generation import Breaker, ShardJob, ShardResult
from infra.manifest import INPUT_REJECTS, MANIFEST, REJECTS, Manifest, rejects_name
from infra.planning import Plan, RunConfig, load_published, usable_records
from infra.sampling import SamplingParams
from infra.settings import Settings, load_settings
from infra.storage import OutputStore, open_input, open_output_store
from tasks.steps import allocate, generate_shard, plan, release, wait_ready

# A server that was serving and then died or hung: worth a new allocation.
RESTARTABLE = (ServerLost, TransientServerError)


@flow(
    name="generate",
    task_runner=ThreadPoolTaskRunner(max_workers=8),
    on_cancellation=[release_on_hook],
    on_crashed=[release_on_hook],
)
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
    max_server_restarts: Annotated[int | None, Field(ge=0, le=20, description="servers started anew after one dies or hangs; default NSDG_SERVER__MAX_SERVER_RESTARTS (2)")] = None,
) -> dict:
    """Generate completions for every prompt and publish them with a manifest."""
    logger = get_run_logger()
    settings = load_settings()
    flow_run = get_run_context().flow_run
    prof = settings.profile(profile)  # an unknown profile fails here, before anything is read
    params = RunParams(
        input_uri=input_uri, output_uri=output_uri or settings.output_uri,
        run_id=run_id or resolve_run_id(flow_run), profile=profile, sampling=sampling,
        batch_size=batch_size, shard_size=shard_size, prompt_field=prompt_field, on_bad_input=on_bad_input,
        overlong_prompts=overlong_prompts, tokenizer=settings.tokenizer_path(prof),
    )
    cfg = params.to_run_config()
    restarts_allowed = settings.server.max_server_restarts if max_server_restarts is None else max_server_restarts
    store = open_output_store(cfg.output_uri, cfg.run_id, settings)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    the_plan = plan(cfg, settings, store)
    timings["plan"] = time.monotonic() - t0
    if not the_plan.todo:
        logger.info("all %d shards of run %s are already published; nothing to allocate", the_plan.shards_total, cfg.run_id)
        return finish(store, cfg, the_plan, [], timings, settings, [], restarts=0)

    job_ids: list[str] = []
    results: list[ShardResult] = []
    breaker = Breaker(settings.server.breaker_window, settings.server.breaker_max_share)
    progress = create_progress_artifact(100.0 * len(the_plan.done) / the_plan.shards_total,
                                        key=f"progress-{_artifact_key(cfg.run_id)}", description=f"shards of run {cfg.run_id}")
    for attempt in range(restarts_allowed + 1):
        backend = make_backend(settings, prof, run_id=cfg.run_id, flow_run_id=str(flow_run.id))
        try:
            t = time.monotonic()
            allocate(backend)
            client = wait_ready(backend, settings, cfg.tokenizer)
            _add(timings, "queue_and_load", time.monotonic() - t)
            t = time.monotonic()
            try:
                results += generate_all(client, backend, cfg, the_plan, store, settings, breaker, progress)
            finally:
                _add(timings, "generation", time.monotonic() - t)
            break
        except RESTARTABLE as exc:
            if attempt == restarts_allowed:
                raise
            logger.warning("server lost mid-run (%s); releasing it and starting server %d of %d",
                           exc, attempt + 2, restarts_allowed + 1)
            the_plan.done = load_published(store, the_plan.config_hash)  # what is published is what is done
        finally:
            t = time.monotonic()
            release(backend)  # as soon as generation ends, before the manifest; also on any error
            _add(timings, "release", time.monotonic() - t)
            job_ids += backend.job_ids
    return finish(store, cfg, the_plan, results, timings, settings, job_ids, restarts=attempt)


def _add(timings: dict, key: str, seconds: float) -> None:
    timings[key] = timings.get(key, 0.0) + seconds


def generate_all(client, backend: Backend, cfg: RunConfig, the_plan: Plan, store: OutputStore, settings: Settings,
                 breaker: Breaker, progress) -> list[ShardResult]:
    """Keep `max_in_flight` shard tasks running: each sends its batches one after another, so
    the server always has one request computing and one queued, across shard boundaries.
    On any failure the server is released first (so the other shards stop at once) and every
    shard task is waited for, so none is still publishing when a new server takes over."""
    job = ShardJob(cfg.run_id, settings.model.name, the_plan.config_hash, cfg.sampling, cfg.batch_size)
    window, results = deque(), []
    published = len(the_plan.done)

    def collect() -> None:
        nonlocal published
        results.append(window.popleft().result())
        published += 1
        update_progress_artifact(progress, 100.0 * published / the_plan.shards_total)

    try:
        with open_input(cfg.input_uri, settings) as stream:
            records = usable_records(stream, cfg, settings, the_plan.format)
            for shard in iter_shards(records, cfg.shard_size, skip=frozenset(the_plan.done)):
                if len(window) >= settings.server.max_in_flight:
                    collect()
                window.append(generate_shard.submit(client, shard, job, store, backend, breaker))
            while window:
                collect()
    except BaseException:
        backend.release()
        wait(list(window))
        raise
    return results


def _artifact_key(run_id: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in run_id.lower())[:60]


def merge_rejects(store: OutputStore, parts, input_rejected: int) -> int:
    """rejects.jsonl = the plan's input rejects + every part's server rejects. Returns how many
    records the server refused."""
    refused = sum(p.rejected for p in parts)
    if refused or input_rejected:
        chunks = [store.read_bytes(INPUT_REJECTS) or b""]
        chunks += [store.read_bytes(rejects_name(p.name)) or b"" for p in parts if p.rejected]
        store.write_bytes(REJECTS, b"".join(chunks))
    return refused


def finish(store: OutputStore, cfg: RunConfig, the_plan: Plan, results: list[ShardResult], timings, settings: Settings,
           job_ids, *, restarts: int) -> dict:
    logger = get_run_logger()
    parts = sorted(load_published(store, the_plan.config_hash).values(), key=lambda p: p.shard)
    written = sum(p.records for p in parts)
    refused = merge_rejects(store, parts, the_plan.rejected)
    tokens = sum(r.generated_tokens for r in results)
    gen_s = timings.get("generation", 0.0)
    new_records = sum(r.part.records for r in results)
    if len(parts) != the_plan.shards_total or written + refused != the_plan.records_in:
        raise RuntimeError(
            f"run {cfg.run_id}: {len(parts)} of {the_plan.shards_total} parts with {written} records written and "
            f"{refused} refused, but {the_plan.records_in} planned; no manifest published. Rerun with the same run_id."
        )
    manifest = Manifest(
        run_id=cfg.run_id, config_hash=the_plan.config_hash, config=the_plan.config, model=settings.model.name,
        profile=cfg.profile, input_uri=cfg.input_uri, records_in=the_plan.records_in, records_written=written,
        records_rejected=the_plan.rejected + refused, parts=parts, slurm_job_ids=list(job_ids),
        timings_s={k: round(v, 3) for k, v in timings.items()},
        throughput={"records_per_s": round(new_records / gen_s, 3) if gen_s else None, "generated_tokens": tokens},
        rejects=REJECTS if (the_plan.rejected or refused) else None, server_restarts=restarts,
    )
    store.write_bytes(MANIFEST, manifest.to_json())
    manifest_uri = store.uri(MANIFEST)
    create_table_artifact(
        [{"records in": the_plan.records_in, "written": written, "rejected": the_plan.rejected + refused,
          "tokens generated": tokens, "server restarts": restarts,
          **{f"{k} s": round(v, 2) for k, v in timings.items()},
          "records/s": manifest.throughput["records_per_s"], "manifest": manifest_uri}],
        key=f"summary-{_artifact_key(cfg.run_id)}", description=f"run {cfg.run_id}: manifest at {manifest_uri}",
    )
    logger.info("run %s complete: %d records in %d parts; manifest %s", cfg.run_id, written, len(parts), manifest_uri)
    return {"run_id": cfg.run_id, "manifest": manifest_uri, "records_written": written,
            "records_rejected": the_plan.rejected + refused}
