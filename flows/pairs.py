"""A pipeline's pairs stage (infra/pipeline/pairs_stage.py), and the server its optional order-swap
check asks (`pairs.check`, infra/recipes/pair_check.py). flows/pipeline.py calls `pairs_stage` for a
stage of kind pairs, after the generating stages, when the pipeline's pool has released its server.

Without a check the stage runs on the CPU. With one, a server is reached only when an answer is
missing from the stage's checkpoint: the one at `pairs.check.url`, used as is (nothing started or
stopped; spoken to with the API of the pipeline server's profile), else the pipeline's generation server, started through the same tasks a run uses
(`allocate`, `wait-until-ready`, `release`) and released when the check ends (and on any error, and
by the crash hooks, which find it by the pipeline's run id). The stage's entry says which it was.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from prefect import get_run_logger

from infra.backends import make_backend
from infra.pipeline.hashes import StageHash
from infra.pipeline.model import Pipeline, Stage
from infra.pipeline.pairs_stage import CheckServer, run_pairs
from infra.prompting.prompt_format import default_format, load_prompt_format
from infra.prompting.tokens import token_counter
from infra.run.card import strip_userinfo
from infra.run.lease import RunLease
from infra.settings import Settings
from tasks.steps import allocate, release, wait_ready


def pairs_stage(the: Pipeline, stage: Stage, output_uri: str, run_id: str, settings: Settings, lease: RunLease | None,
                hashes: StageHash, flow_run_id: str) -> dict:
    """Pair the parent's rows (and check them when asked); the stage's entry in the pipeline's manifest."""
    check = stage.pairs.check if stage.pairs is not None else None
    if check is None:
        return run_pairs(the, stage, output_uri, run_id, settings, lease, hashes)
    logger = get_run_logger()
    server_name, server = the.server
    prof = settings.profile(server.profile)
    if check.url is not None:  # someone else's server, attached as the attach profile does, spoken to as the pipeline's
        settings = settings.model_copy(update={"server": settings.server.model_copy(update={"url": check.url, "urls": []})})
        prof = prof.model_copy(update={"backend": "attach"})
    tokenizer = settings.tokenizer_path(prof)
    fmt = load_prompt_format(default_format(check.prompt_format or stage.prompt_format, prof.prompt_format, prof.backend,
                                            tokenizer), tokenizer)
    counter = token_counter(tokenizer)
    held = []

    def connect():
        backend = make_backend(settings, prof, run_id=run_id, flow_run_id=flow_run_id)
        held.append(backend)
        if check.url is None:
            logger.info("stage %s: starting server %r (profile %s) for the pair check", stage.name, server_name,
                        server.profile)
        allocate(backend)
        client = wait_ready(backend, settings, counter, prof)
        served = getattr(client, "served", None) or {}
        model = PurePosixPath(str(served.get("root") or "")).name or served.get("id") or settings.model.name
        where = (f"at {strip_userinfo(check.url)}" if check.url is not None
                 else f"(server `{server_name}`, profile `{server.profile}`, started for the check)")
        reached.said.update({"server": "url" if check.url is not None else "started", "model": model,
                             "said": f"checked in both orders by `{model}` {where}"})
        return client

    # An answer is reused only from the same server and model (the url, else the profile and what it loads).
    model_at = settings.local.model_dir if prof.backend == "local" else settings.model.path
    reached = CheckServer(connect, check.url or f"profile:{server.profile} {settings.model.name} {model_at}", fmt,
                          settings.model.context_length, counter, batch_size=stage.batch_size,
                          said={"server": "none (every answer checkpointed)"})
    try:
        entry = run_pairs(the, stage, output_uri, run_id, settings, lease, hashes, check_server=reached)
    finally:
        for backend in held:
            release(backend)
    got = entry.get("check") or {}
    logger.info("stage %s: pair check: %d pairs checked, %d answers asked, %d reused, dropped %s; server: %s", stage.name,
                got.get("pairs_checked", 0), got.get("answers_asked", 0), got.get("answers_reused", 0),
                got.get("dropped") or "none", got.get("server"))
    return entry
