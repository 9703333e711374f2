"""The `generate` flow: plan → allocate → wait ready → generate shards (kept in flight) →
release → publish manifest. Release runs as soon as generation ends and again in `finally`;
the crash and cancellation hooks find the allocation from the flow-run id alone."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Annotated, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from flows.params import RunParams, resolve_run_id
from flows.teardown import release_on_hook
from infra.backends import make_backend
from infra.dataset import iter_shards
from infra.generation import ShardJob, ShardResult
from infra.manifest import MANIFEST, REJECTS, Manifest
from infra.planning import RunConfig, usable_records
from infra.sampling import SamplingParams
from infra.settings import load_settings
from infra.storage import open_input, open_output_store
from tasks.steps import allocate, generate_shard, plan, release, wait_ready

log = logging.getLogger(__name__)


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
    shard_size: Annotated[int, Field(ge=1, le=1_000_000, description="records per output part: the unit of retry, resume and upload")] = 1000,
    prompt_field: Annotated[str, Field(description="JSONL field holding the prompt")] = "prompt",
    on_bad_input: Annotated[Literal["fail", "skip"], Field(description="fail on unusable lines, or skip them into rejects.jsonl")] = "fail",
) -> dict:
    """Generate completions for every prompt and publish them with a manifest."""
    logger = get_run_logger()
    settings = load_settings()
    flow_run = get_run_context().flow_run
    params = RunParams(
        input_uri=input_uri, output_uri=output_uri or settings.output_uri,
        run_id=run_id or resolve_run_id(flow_run), profile=profile, sampling=sampling,
        batch_size=batch_size, shard_size=shard_size, prompt_field=prompt_field, on_bad_input=on_bad_input,
    )
    cfg = params.to_run_config()
    prof = settings.profile(cfg.profile)
    store = open_output_store(cfg.output_uri, cfg.run_id, settings)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    the_plan = plan(cfg, settings, store)
    timings["plan"] = time.monotonic() - t0
    if not the_plan.todo:
        logger.info("all %d shards of run %s are already published; nothing to allocate", the_plan.shards_total, cfg.run_id)
        return finish(store, cfg, the_plan, [], timings, settings, [], logger)

    backend = make_backend(settings, prof, run_id=cfg.run_id, flow_run_id=str(flow_run.id))
    results: list[ShardResult] = []
    try:
        t = time.monotonic()
        allocate(backend)
        client = wait_ready(backend, settings)
        timings["queue_and_load"] = time.monotonic() - t
        t = time.monotonic()
        results = generate_all(client, backend, cfg, the_plan, store, settings)
        timings["generation"] = time.monotonic() - t
    finally:
        t = time.monotonic()
        release(backend)  # as soon as generation ends, before the manifest; also on any error
        timings["release"] = time.monotonic() - t
    return finish(store, cfg, the_plan, results, timings, settings, backend.job_ids, logger)


def generate_all(client, backend, cfg: RunConfig, the_plan, store, settings) -> list[ShardResult]:
    """Keep `max_in_flight` shard tasks running: each sends its batches one after another, so
    the server always has one request computing and one queued, across shard boundaries."""
    job = ShardJob(cfg.run_id, settings.model.name, the_plan.config_hash, cfg.sampling, cfg.batch_size)
    todo = len(the_plan.todo)
    progress = create_progress_artifact(0.0, key=f"progress-{_artifact_key(cfg.run_id)}",
                                        description=f"shards of run {cfg.run_id}")
    window, results = deque(), []
    with open_input(cfg.input_uri, settings) as stream:
        records = usable_records(stream, cfg, settings, the_plan.format)
        for shard in iter_shards(records, cfg.shard_size, skip=frozenset(the_plan.done)):
            if len(window) >= settings.server.max_in_flight:
                results.append(window.popleft().result())
                update_progress_artifact(progress, 100.0 * len(results) / todo)
            window.append(generate_shard.submit(client, shard, job, store, backend))
        while window:
            results.append(window.popleft().result())
            update_progress_artifact(progress, 100.0 * len(results) / todo)
    return results


def _artifact_key(run_id: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in run_id.lower())[:60]


def finish(store, cfg: RunConfig, the_plan, results: list[ShardResult], timings, settings, job_ids, logger) -> dict:
    parts = sorted([*the_plan.done.values(), *(r.part for r in results)], key=lambda p: p.shard)
    written = sum(p.records for p in parts)
    tokens = sum(r.generated_tokens for r in results)
    gen_s = timings.get("generation", 0.0)
    manifest = Manifest(
        run_id=cfg.run_id, config_hash=the_plan.config_hash, config=the_plan.config, model=settings.model.name,
        profile=cfg.profile, input_uri=cfg.input_uri, records_in=the_plan.records_in, records_written=written,
        records_rejected=the_plan.rejected, parts=parts, slurm_job_ids=list(job_ids),
        timings_s={k: round(v, 3) for k, v in timings.items()},
        throughput={"records_per_s": round(sum(r.part.records for r in results) / gen_s, 3) if gen_s else None,
                    "generated_tokens": tokens},
        rejects=REJECTS if the_plan.rejected else None,
    )
    if written != the_plan.records_in:
        raise RuntimeError(f"run {cfg.run_id}: {written} records written but {the_plan.records_in} planned; not publishing a manifest")
    store.write_bytes(MANIFEST, manifest.to_json())
    manifest_uri = store.uri(MANIFEST)
    create_table_artifact(
        [{"records in": the_plan.records_in, "written": written, "rejected": the_plan.rejected,
          "tokens generated": tokens, **{f"{k} s": round(v, 2) for k, v in timings.items()},
          "records/s": manifest.throughput["records_per_s"], "manifest": manifest_uri}],
        key=f"summary-{_artifact_key(cfg.run_id)}", description=f"run {cfg.run_id}: manifest at {manifest_uri}",
    )
    logger.info("run %s complete: %d records in %d parts; manifest %s", cfg.run_id, written, len(parts), manifest_uri)
    return {"run_id": cfg.run_id, "manifest": manifest_uri, "records_written": written, "records_rejected": the_plan.rejected}
