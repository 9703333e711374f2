"""A pipeline's pairs stage (infra/pipeline/pairs_stage.py), and the server its optional order-swap
check asks (`pairs.check`, infra/recipes/pair_check.py). flows/pipeline.py calls `pairs_stage` for a
stage of kind pairs, after the generating stages, when the pipeline's pool has released its server.

Without a check the stage runs on the CPU. With one, a server is reached only when an answer is
missing from the stage's checkpoint: the one at `pairs.check.url`, used as is (nothing started or
stopped; spoken to with the API of the pipeline server's profile), else the pipeline's generation
server. That one is asked while the pool still holds it (`HeldServer`: the pool's last replica is
kept past its release until the last such check is done, so no second model load and, on Slurm, no
second queue wait); only when there was no pool (every generating stage already done), the kept
server died, or its job is the reward server's (`swap_with`), is it started again through the tasks
a run uses (`allocate`, `wait-until-ready`, `release`) and released when the check ends. Either is
released on any error too, by the crash hooks, which find it by the pipeline's run id. The stage's
entry says which it was (`server`: held, started, url, or none).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import PurePosixPath

from prefect import get_run_logger

from infra.backends import make_backend
from infra.backends.ready import wait_until_ready
from infra.errors import DeadlineExceeded, ServerNotReady
from infra.pipeline.hashes import StageHash
from infra.pipeline.model import Pipeline, Stage
from infra.pipeline.pairs_stage import CheckServer, run_pairs
from infra.prompting.prompt_format import default_format, load_prompt_format
from infra.prompting.tokens import token_counter
from infra.run.card import strip_userinfo
from infra.run.lease import RunLease
from infra.settings import Settings
from tasks.steps import allocate, release, wait_ready


class HeldServer:
    """The pipeline's generation server kept past the pool's release for the pairs stages that check
    on it (`pairs.check` with no url). It stands for the pool's release: a replica released while no
    other serves (the pool's last, `watch`) is kept, unless dead or ended by schedule; any other is
    released at once (one done while others still work, a rolled-over one), and so is one kept before,
    so no job is held longer for the check than the pool's last. It is released when the last of those
    stages is done (`done`), or by `release` on any way out. `report` gives the time it was kept."""

    def __init__(self, stages: list[str], gpus: int):
        self.waiting, self.gpus = set(stages), gpus
        self.others_serve: Callable[[object], bool] = lambda backend: False
        self.kept = None
        self.kept_at = 0.0
        self.held_s = 0.0
        self.reported = 0.0

    def watch(self, pool) -> None:
        """The pool whose release this stands for: a replica is kept only when none of its others serves."""
        self.others_serve = lambda backend: any(r.state != "released" and r.backend is not backend for r in pool.members)

    def keep(self, backend) -> None:
        if (not self.waiting or self.others_serve(backend) or backend.dead_reason() is not None
                or backend.scheduled_end() is not None):
            release(backend)
            return
        self.release()
        self.kept, self.kept_at = backend, time.time()

    def release(self) -> None:
        if self.kept is not None:
            backend, self.kept = self.kept, None
            self.held_s += time.time() - self.kept_at
            release(backend)

    def done(self, stage: str) -> None:
        self.waiting.discard(stage)
        if not self.waiting:
            self.release()

    def report(self) -> dict:
        """The time kept since the last report: a stage's share (the first one's holds the wait for it)."""
        total = self.held_s + (time.time() - self.kept_at if self.kept is not None else 0.0)
        held, self.reported = total - self.reported, total
        return {"held_s": round(held, 3), "gpu_hours": round(self.gpus * held / 3600, 4)}


def held_for_checks(the: Pipeline, settings: Settings, swapped: bool) -> HeldServer | None:
    """A HeldServer when a pairs stage checks on the pipeline's server and its job is not the reward
    server's (a swap stops the generator at the pool's release: that check starts it again)."""
    stages = [s.name for s in the.stages if s.pairs is not None and s.pairs.check is not None and s.pairs.check.url is None]
    if not stages or swapped:
        return None
    prof = settings.profile(the.server[1].profile)
    return HeldServer(stages, prof.billed_gpus)


def pairs_stage(the: Pipeline, stage: Stage, output_uri: str, run_id: str, settings: Settings, lease: RunLease | None,
                hashes: StageHash, flow_run_id: str, held: HeldServer | None = None) -> dict:
    """Pair the parent's rows (and check them when asked); the stage's entry in the pipeline's manifest."""
    try:
        return _pairs_stage(the, stage, output_uri, run_id, settings, lease, hashes, flow_run_id, held)
    finally:
        if held is not None:
            held.done(stage.name)


def _pairs_stage(the: Pipeline, stage: Stage, output_uri: str, run_id: str, settings: Settings, lease: RunLease | None,
                 hashes: StageHash, flow_run_id: str, held: HeldServer | None) -> dict:
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
    started = []
    how = {"url": f"at {strip_userinfo(check.url or '')}",
           "held": f"(server `{server_name}`, profile `{server.profile}`, kept from the generating stages)",
           "started": f"(server `{server_name}`, profile `{server.profile}`, started for the check)"}

    def kept_client():
        """The pool's server, still loaded: ready again within a read timeout, else released (None)."""
        if check.url is not None or held is None or held.kept is None:
            return None
        logger.info("stage %s: asking server %r (profile %s), kept from the generating stages, for the pair check",
                    stage.name, server_name, server.profile)
        try:
            return wait_until_ready(held.kept, settings, timeout=settings.server.read_timeout_s, counter=counter, profile=prof)
        except (ServerNotReady, DeadlineExceeded) as exc:
            logger.warning("stage %s: the kept server does not answer (%s); starting it again for the check", stage.name, exc)
            held.release()
            return None

    def connect():
        client, mode = kept_client(), "held"
        if client is None:
            backend = make_backend(settings, prof, run_id=run_id, flow_run_id=flow_run_id)
            started.append(backend)
            mode = "url" if check.url is not None else "started"
            if check.url is None:
                logger.info("stage %s: starting server %r (profile %s) for the pair check", stage.name, server_name,
                            server.profile)
            allocate(backend)
            client = wait_ready(backend, settings, counter, prof)
        served = getattr(client, "served", None) or {}
        model = PurePosixPath(str(served.get("root") or "")).name or served.get("id") or settings.model.name
        reached.said.update({"server": mode, "model": model, "said": f"checked in both orders by `{model}` {how[mode]}"})
        return client

    # An answer is reused only from the same server and model (the url, else the profile and what it loads).
    model_at = settings.local.model_dir if prof.backend == "local" else settings.model.path
    reached = CheckServer(connect, check.url or f"profile:{server.profile} {settings.model.name} {model_at}", fmt,
                          settings.model.context_length, counter, batch_size=stage.batch_size,
                          said={"server": "none (every answer checkpointed)"})
    try:
        entry = run_pairs(the, stage, output_uri, run_id, settings, lease, hashes, check_server=reached)
    finally:
        for backend in started:
            release(backend)
    if held is not None and (entry.get("check") or {}).get("server") == "held":
        held.done(stage.name)  # released now, so the time kept is final
        entry["check"]["allocation"] = held.report()
    got = entry.get("check") or {}
    logger.info("stage %s: pair check: %d pairs checked, %d answers asked, %d reused, dropped %s; server: %s", stage.name,
                got.get("pairs_checked", 0), got.get("answers_asked", 0), got.get("answers_reused", 0),
                got.get("dropped") or "none", got.get("server"))
    return entry
