"""The run's end, after its last shard: every planned part published (`close_parts`: the
rejects merged, no upload left open), then the manifest written from every part's state
(`publish_manifest`). Curation runs in between (infra/recipes/curate.py: `curate_run`).
Each step is idempotent, so a transient storage error is retried by running it again
(tasks/steps.py)."""

from __future__ import annotations

import logging

from infra.engines.served_model import ServedModel, recorded_served
from infra.generation import ShardResult
from infra.planning import Plan, RunConfig, load_published
from infra.run.layout import MANIFEST, REJECTS
from infra.run.manifest import (Manifest, PartInfo, earlier_manifest, generated_tokens, merge_rejects, prompt_matches,
                                run_job_ids, run_replicas)
from infra.settings import Settings
from infra.storage import OutputStore
from infra.storage.spill import discard_spills

log = logging.getLogger(__name__)


def close_parts(store: OutputStore, cfg: RunConfig, the_plan: Plan) -> tuple[list[PartInfo], int]:
    """Every part of the run, by shard, and how many records the server refused; raises when a
    planned part or record is missing (no manifest then)."""
    parts = sorted(load_published(store, the_plan.config_hash).values(), key=lambda p: p.shard)
    written = sum(p.records for p in parts)
    refused = merge_rejects(store, parts, the_plan.rejected)
    if len(parts) != the_plan.shards_total or written + refused != the_plan.rows_planned:
        raise RuntimeError(
            f"run {cfg.run_id}: {len(parts)} of {the_plan.shards_total} parts with {written} records written and "
            f"{refused} refused, but {the_plan.rows_planned} planned; no manifest published. Rerun with the same run_id."
        )
    store.abort_incomplete_uploads()  # every part is in: nothing of this run may still be uploading
    discard_spills(store.staging_dir())  # nor any shard's finished requests kept for its next try
    return parts, refused


def publish_manifest(store: OutputStore, cfg: RunConfig, the_plan: Plan, parts: list[PartInfo], refused: int,
                     curated: dict | None, results: list[ShardResult], timings: dict[str, float], settings: Settings,
                     job_ids: list[str], *, restarts: int, replicas: list[dict], invocation: str,
                     rollovers: dict | None = None) -> Manifest:
    """The manifest of the whole run, from every part's state object; an invocation that generated
    nothing leaves a complete manifest as it is."""
    written = sum(p.records for p in parts)
    gen_s = timings.get("generation", 0.0)
    new_records = sum(r.part.records for r in results if not r.judged_only)
    earlier = earlier_manifest(store, the_plan.config_hash)
    if not results and earlier is not None and earlier.parts == parts and earlier.curation == curated:
        log.info("run %s: its manifest is complete and describes these parts; left as it is", cfg.run_id)
        return earlier
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
    return manifest
