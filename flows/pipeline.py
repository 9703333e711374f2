"""The `pipeline` flow: every stage of a pipeline file (docs/pipelines.md) on ONE allocation, stage by
stage in dependency order. The file is read and checked whole (every template rendered, every stage's
parameters validated) before anything is allocated; the servers are started once, when the first
stage with work left starts, kept ready between stages and released after the last one (and in
`finally`, and by the crash hooks, which find them by the pipeline's run id as they find a run's).

Each stage is a run as `generate` makes it (the same plan, shard tasks, pool, curation and manifest:
flows/generate.py prepare_run and run_prepared), in its own run directory
`{output_uri}/{run_id}/stages/{stage}/`. A stage reading a parent reads the parent's `rows.jsonl`:
the parent's kept rows after its split, with derived ids and lineage (infra/pipeline/rows.py).
Stages run one after another: a stage starts when its parent has finished (streaming rows from one
stage into the next is a later slice).

Resume: a rerun with the same run_id finds each stage's published shards as a run does, so a stage
already done generates nothing and, with every stage done, nothing is allocated. A stage whose
generation settings changed since the run began (infra/pipeline/hashes.py: its own or a parent's)
is refused before any allocation: start a new run.
"""

from __future__ import annotations

import json
import logging
import time

from prefect import flow, get_run_logger
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner

from flows.artifacts import publish_stage_counts
from flows.generate import PoolCarry, prepare_run, run_prepared
from flows.params import RunParams, resolve_run_id, run_name
from flows.teardown import release_lease_on_hook, release_on_hook
from infra.errors import ConfigError, InputError
from infra.pipeline.check import check_pipeline, file_hashes
from infra.pipeline.files import load_pipeline
from infra.pipeline.hashes import StageHash, stage_hashes
from infra.pipeline.model import Pipeline
from infra.pipeline.rows import write_stage_rows
from infra.run.layout import MANIFEST, PIPELINE_HASHES, STAGE_ROWS, stages_uri
from infra.run.lease import hold_run_lease
from infra.settings import load_settings
from infra.storage import OutputStore, open_output_store
from tasks.steps import release

log = logging.getLogger(__name__)


@flow(
    name="pipeline",
    flow_run_name=run_name,
    task_runner=ThreadPoolTaskRunner(max_workers=8),
    on_cancellation=[release_on_hook],
    on_crashed=[release_on_hook],
    on_completion=[release_lease_on_hook],
    on_failure=[release_lease_on_hook],
)
def pipeline(pipeline: str, run_id: str | None = None, output_uri: str | None = None, replicas: int | None = None,
             max_server_restarts: int | None = None) -> dict:
    """Run every stage of the pipeline file `pipeline` on one allocation; publish each stage's run
    directory and the pipeline's manifest (each stage's counts, the training set)."""
    logger = get_run_logger()
    settings = load_settings()
    flow_run = get_run_context().flow_run
    the = load_pipeline(pipeline, settings)
    hashes = stage_hashes(the, file_hashes(check_pipeline(the, settings, pipeline)))  # every template rendered
    run_id = run_id or resolve_run_id(flow_run)
    output_uri = output_uri or settings.output_uri
    asked = {s.name: stage_params(the, s.name, pipeline, output_uri=stages_uri(output_uri, run_id), replicas=replicas,
                                  max_server_restarts=max_server_restarts) for s in the.stages}
    root = open_output_store(output_uri, run_id, settings.s3, settings.work_path("staging"))
    root.preflight()
    lease = hold_run_lease(root, str(flow_run.id), flow_run.name, settings.run_lease_ttl_s)
    root = lease.fenced()
    check_hashes(root, hashes, run_id)  # a changed stage: refused before any allocation
    carry = PoolCarry(run_id)
    stages: list[dict] = []
    done: dict[str, dict] = {}
    try:
        for stage in the.ordered():
            params = asked[stage.name]
            if stage.from_ is not None and not (parent := done[stage.from_])["rows"]:
                raise InputError(f"pipeline run {run_id}: stage {stage.from_!r} left no rows for stage {stage.name!r} "
                                 f"({parent['rows_out']} generated, {parent['kept']} kept, filtered "
                                 f"{parent['filtered'] or 'none'}, split dropped {parent['split_dropped'] or 'none'}); "
                                 f"loosen the filters or split of {stage.from_!r}, or give it more input")
            if stage.from_ is not None:  # the parent's kept rows after its split
                params = RunParams(**{**dict(params), "input_uri": f"{params.output_uri}/{stage.from_}/{STAGE_ROWS}"})
            run = prepare_run(params, settings, flow_run, lease=lease)
            out = run_prepared(run, settings, flow_run, stage=carry)
            rows = write_stage_rows(run.store, stage.name, stage.split)
            manifest = json.loads(run.store.read_bytes(MANIFEST))
            stages.append({"stage": stage.name, "from": stage.from_, "input": params.input_uri,
                           "config_hash": hashes[stage.name].generation, "kept_hash": hashes[stage.name].kept,
                           "records_in": manifest["records_in"], "rows_out": out["records_written"],
                           "rejected": out["records_rejected"], "kept": out.get("records_kept", out["records_written"]),
                           "filtered": out.get("filtered", {}), "split_dropped": rows["split_dropped"],
                           "rows": rows["rows"], "rows_uri": rows["rows_uri"], "kept_parts": rows["kept_parts"],
                           "manifest": out["manifest"]})
            done[stage.name] = stages[-1]
            publish_stage_counts(run_id, stages, [s.name for s in the.ordered()])  # the run page's progress by stage
            logger.info("stage %s: %d records in, %d rows out, %d kept, %d rows for its children",
                        stage.name, manifest["records_in"], out["records_written"], stages[-1]["kept"], rows["rows"])
    finally:
        release_all(carry)
    final = stages[-1]
    doc = {"run_id": run_id, "pipeline": pipeline, "server": dict(zip(("name", "profile"), (the.server[0], the.server[1].profile))),
           "stages": stages, "training_set": final["kept_parts"], "training_rows": final["rows_uri"],
           "server_launches": carry.launched}
    root.write_bytes(MANIFEST, json.dumps(doc, indent=2).encode())
    logger.info("pipeline run %s complete: %d stages; manifest %s", run_id, len(stages), root.uri(MANIFEST))
    return {"run_id": run_id, "manifest": root.uri(MANIFEST), "stages": {s["stage"]: s["kept"] for s in stages},
            "records_written": final["rows_out"], "records_kept": final["kept"], "filtered": final["filtered"]}


def stage_params(the: Pipeline, name: str, uri: str, *, output_uri: str, replicas: int | None,
                 max_server_restarts: int | None) -> RunParams:
    """A stage's run parameters: its settings, the pipeline's server profile, its run directory (named
    after the stage) under the pipeline's; a child's input is set when its parent's rows exist."""
    stage = the.stage(name)
    server_name, server = the.server
    if server.engine is not None:
        raise ConfigError(f"pipeline {uri}: servers.{server_name}.engine: not supported by run --pipeline yet; "
                          "set the engine in the profile (NSDG_LOCAL__ENGINE, NSDG_EXTRA_PROFILES) and drop it here")
    if stage.output_schema is not None:
        raise ConfigError(f"pipeline {uri}: stage {name!r}: output_schema: not supported by run --pipeline yet "
                          "(structured output is a later slice); drop it, or use split")
    try:
        return RunParams(**dict(stage.settings), profile=server.profile, output_uri=output_uri, run_id=name,
                         input_uri=the.input_of(stage) or "-", replicas=replicas, max_server_restarts=max_server_restarts)
    except ConfigError as exc:
        raise ConfigError(f"pipeline {uri}: stage {name!r}: {exc}".replace("\n", " ")) from None


def check_hashes(root: OutputStore, hashes: dict[str, StageHash], run_id: str) -> None:
    """Record each stage's hashes at the run's first start; on a rerun, refuse a stage whose generation
    changed (its parts, and its children's, would mix two configurations)."""
    now = {name: {"generation": h.generation, "kept": h.kept} for name, h in hashes.items()}
    data = root.read_bytes(PIPELINE_HASHES)
    if data is not None:
        before = json.loads(data)
        changed = [n for n, h in now.items() if n in before and before[n]["generation"] != h["generation"]]
        if changed:
            raise ConfigError(f"pipeline run {run_id}: stage(s) {', '.join(changed)} changed since the run began (their "
                              "settings, templates or a parent's); rerun with the original file to resume, or start "
                              "a new run (--new-run)")
    root.write_bytes(PIPELINE_HASHES, json.dumps(now, indent=2, sort_keys=True).encode())


def release_all(carry: PoolCarry) -> None:
    """Every replica any stage started and kept, after the last stage or on any exit."""
    for rep in carry.members:
        if rep.state == "released":
            continue
        try:
            release(rep.backend)
        except Exception as exc:  # logged, never raised: the others still get theirs (as Pool._retire)
            rep.release_error = f"{type(exc).__name__}: {exc}"
            log.error("releasing replica %d (%s) failed: %s; cancel it by hand", rep.index, rep.backend.status(), exc)
        finally:
            rep.released_at = time.time()
            if (close := getattr(rep.client, "close", None)) is not None:
                close()
