"""A pipeline's reward stage (docs/pipelines.md, "Reward stage"): the rows it reads (its parent's
`rows.jsonl`, or its own input) scored by its reward server, filtered by `reward.keep_if`, in its run
directory `stages/{stage}/` as a generating stage's (infra/reward/stage.py). flows/pipeline.py calls
`reward_stage` for a stage of kind reward, after its parent has finished.

The reward server is one someone runs (its `url`: NeMo-Aligner's serve_reward_model.py, a vLLM
pooling server, a hosted endpoint); it is waited for only when a part has no current replies, so a
rerun that changes a threshold, or finds every part scored, needs no server. A server that stops
answering mid-stage is waited for again (`server.ready_timeout_s`), at most `max_server_restarts`
times; the parts already scored are kept.

Or the server is started in the generator's own Slurm job (`swap_with`, infra/slurm/steps.py):
`planned_swap` checks it whole before any job is submitted; the pool's release of the generator's job
becomes the swap (its step stopped, the reward server's started), this stage waits for that server
and releases the job after its last score. A lost swapped server is replaced by a new job whose
first step is the reward server's. Or it is resident (`resident: true`, infra/slurm/resident.py): the
job has its nodes too, both servers start at once, and the pool's release keeps the job, unswapped.
When a generating stage reads a reward stage, the job is not released after the last score: the next
level's pool takes it back (`hand_back`: the generator's step asked for again, or, resident, still there).
"""

from __future__ import annotations

from dataclasses import replace as dc_replace

from prefect import get_run_logger

from flows.params import RunParams
from infra.backends import make_backend
from infra.pipeline.hashes import StageHash
from infra.pipeline.model import Pipeline, Stage
from infra.pipeline.rows import stage_entry, write_stage_rows
from infra.prompting.tokens import token_counter
from infra.reward.client import DEFAULT_MODEL, reward_client, wait_reward_ready
from infra.reward.stage import RewardScorer
from infra.run.lease import FencedStore, RunLease
from infra.settings import Settings
from infra.slurm.resident import ResidentKeeper
from infra.slurm.steps import SwapKeeper, swap_step
from infra.storage import open_output_store
from tasks.reward import score_reward_stage
from tasks.steps import release


def planned_swap(the: Pipeline, settings: Settings, run_id: str, flow_run_id: str) -> SwapKeeper | None:
    """The reward server started in the generator's Slurm job (`servers.<rm>.swap_with`), its launch
    checked whole (the job's spec with its reward step) before anything is submitted; None without one."""
    step = swap_step(settings, the.servers, the.server[0], run_id)
    if step is None:
        return None
    prof = settings.profile(the.server[1].profile)
    srv = settings.server
    common = dict(new_job=lambda: make_backend(settings, prof, run_id=run_id, flow_run_id=flow_run_id, reward_step=step),
                  release=release, ready_timeout_s=srv.ready_timeout_s, poll_s=srv.ready_poll_s,
                  gpus=prof.nodes * prof.gpus_per_node)
    if step.resident:  # both servers at once, each on its own nodes of the job (infra/slurm/resident.py)
        # With nothing left to generate, a job of the reward server's nodes alone, its step the only one run.
        alone = settings.profile(the.servers[step.server].profile)
        common["new_job"] = lambda: make_backend(settings, alone, run_id=run_id, flow_run_id=flow_run_id,
                                                 reward_step=dc_replace(step, resident=False, nodes=None))
        return ResidentKeeper(step, reward_gpus=step.nodes * prof.gpus_per_node, **common)
    return SwapKeeper(step, **common)


def reward_stage(the: Pipeline, stage: Stage, params: RunParams, settings: Settings, lease: RunLease,
                 hashes: StageHash, swap: SwapKeeper | None = None, hold: bool = False) -> dict:
    """Score the stage's rows, curate them, write its rows for its children; its entry in the
    pipeline's manifest (the keys a generating stage's has, and `reward`). With `hold`, a job kept for
    it is not released after the last score (a resident generator handed to the pair checks)."""
    logger = get_run_logger()
    name, server = the.reward_server(stage)
    swapped = swap if swap is not None and swap.step.server == name else None
    store = FencedStore(open_output_store(params.output_uri, stage.name, settings.s3, settings.work_path("staging")), lease)
    store.preflight()
    # The generator's tokenizer: Nemotron-4-340B-Reward shares Nemotron-4's; another reward model's
    # context check is as exact as that tokenizer is for it (docs/pipelines.md).
    counter = token_counter(settings.tokenizer_path(settings.profile(the.server[1].profile)))
    model = server.model or DEFAULT_MODEL.get(server.engine, "")
    # The checkpoint names the model a swapped server loads (a served name alone would not change with it).
    scorer = RewardScorer(stage.reward_params, counter, {"engine": server.engine, "model": model,
                                                         **({"checkpoint": server.model_path} if server.model_path else {})})
    srv = settings.server

    def client_at(url: str):
        return reward_client(server.engine, url, model, connect_timeout=srv.connect_timeout_s,
                             read_timeout=srv.read_timeout_s, throttle_tries=srv.throttle_tries,
                             throttle_wait_s=srv.throttle_wait_s)

    def connect():
        if swapped is not None:
            logger.info("stage %s: waiting for reward server %r (%s, a step of the generator's Slurm job)", stage.name,
                        name, server.engine)
            return swapped.connect(client_at)
        logger.info("stage %s: waiting for reward server %r (%s at %s)", stage.name, name, server.engine, server.url)
        return wait_reward_ready(client_at(server.url), srv.ready_timeout_s, srv.ready_poll_s)

    def replace(old, exc):
        old.close()
        if swapped is not None:  # its job is given back; a new one starts with the reward server's step
            swapped.release()
        return connect()

    restarts = srv.max_server_restarts if params.max_server_restarts is None else params.max_server_restarts
    # The job is kept past this stage for a later reward stage of its server, or given back to the
    # generator when a generating stage reads a reward stage (flows/pipeline.py, level by level).
    later = hold or any(s.kind == "generate" and the.level(s) > the.level(stage) for s in the.stages)
    last = not later and [s.name for s in run_order(the) if s.kind == "reward"
                          and the.reward_server(s)[0] == name][-1] == stage.name
    if swapped is not None:
        swapped.claim(stage.name)
    try:
        out = score_reward_stage(store, scorer, params.input_uri, settings.s3, stage.name, shard_size=params.shard_size,
                                 filters=stage.filters, connect=connect, replace=replace, restarts_allowed=restarts,
                                 generation_hash=hashes.generation)
    finally:
        if swapped is not None:
            swapped.claim(stage.name)  # a job started for it while it scored (a lost server replaced)
        if swapped is not None and last:  # the job is held no longer than its last score
            swapped.release()
    rows = write_stage_rows(store, stage.name, None)
    logger.info("stage %s (reward): %d rows in, %d kept, filtered %s; %d part(s) scored, %d reused, %d server restart(s)",
                stage.name, out["records_written"], out["records_kept"], out["filtered"] or "none", out["parts_scored"],
                out["parts_reused"], out["server_restarts"])
    return stage_entry(stage, params.input_uri, hashes, records_in=out["records_written"],
                       rows_out=out["records_written"], kept=out["records_kept"], filtered=out["filtered"], rows=rows,
                       manifest=out["manifest"],
                       reward={"server": name, "engine": server.engine, "model": model,
                               **{k: out[k] for k in ("parts_scored", "parts_reused", "server_restarts", "scoring_s")},
                               **({"allocation": swapped.report(stage.name)} if swapped is not None else {})})


def run_order(the: Pipeline) -> list[Stage]:
    """The order the pipeline runs its stages in: level by level (the reward stages a stage reads
    through: Pipeline.level), parents first within a level; pairs stages last (none reads them, and
    a pair check keeps the last pool's server)."""
    return sorted(the.ordered(), key=lambda s: (s.kind == "pairs", the.level(s)))
