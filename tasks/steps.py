"""One task per retryable step. Logic lives in infra/; these add the retry policy and the name
shown in the Prefect UI. No caching: the output location is the record of what is done."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from infra.backends import Backend
from infra.backends.ready import wait_until_ready
from infra.prompting.dataset import Shard
from infra.errors import StorageError, TransientServerError
from infra.generation import Breaker, RowTally, ShardJob, ShardResult, run_judge, run_shard
from infra.recipes.curate import Curation, OpenCuration, curate_run
from infra.run.card import export_run
from infra.run.finish import close_parts, publish_manifest
from infra.run.manifest import Manifest, PartInfo
from infra.planning import Plan, RunConfig, make_plan
from infra.prompting.tokens import ByteEstimate, TokenCounter
from infra.settings import Profile, Settings
from infra.storage import OutputStore


def retry_transient(task, task_run, state) -> bool:
    """Retry only what may succeed a second time: a server hiccup or a storage error."""
    try:
        state.result()
    except (TransientServerError, StorageError):
        return True
    except BaseException:
        return False
    return False


def for_stage(step, stage: str | None):
    """The task named after a pipeline's stage (`curate-answers`), as its shard tasks are
    (`generate-answers-shard-3`); the task itself for a plain run."""
    return step.with_options(task_run_name=f"{step.name}-{stage}") if stage else step


@task(name="plan", cache_policy=NO_CACHE)
def plan(cfg: RunConfig, settings: Settings, store: OutputStore) -> Plan:
    return make_plan(cfg, settings, store)


@task(name="allocate", cache_policy=NO_CACHE)
def allocate(backend: Backend) -> list[str]:
    backend.start()
    return list(backend.job_ids)


@task(name="wait-until-ready", cache_policy=NO_CACHE)
def wait_ready(backend: Backend, settings: Settings, counter: TokenCounter = ByteEstimate(), profile: Profile | None = None):
    return wait_until_ready(backend, settings, counter=counter, profile=profile)


@task(name="generate-shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=retry_transient, task_run_name="generate-{job.stage_prefix}shard-{shard.index}")
def generate_shard(client, shard: Shard, job: ShardJob, store: OutputStore, backend: Backend,
                   breaker: Breaker, tally: RowTally | None = None) -> ShardResult:
    return run_shard(client, shard, job, store, dead_reason=backend.dead_reason, breaker=breaker, tally=tally)


@task(name="judge-shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=retry_transient, task_run_name="judge-{job.stage_prefix}shard-{part.shard}")
def judge_shard(client, part: PartInfo, job: ShardJob, store: OutputStore, backend: Backend) -> ShardResult:
    return run_judge(client, part, job, store, dead_reason=backend.dead_reason)


@task(name="release", cache_policy=NO_CACHE)
def release(backend: Backend) -> None:
    backend.release()


@task(name="close-parts", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient)
def close_run_parts(store: OutputStore, cfg: RunConfig, the_plan: Plan) -> tuple[list[PartInfo], int]:
    return close_parts(store, cfg, the_plan)


@task(name="curate", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient)
def curate(store: OutputStore, curation: Curation, parts: list[PartInfo], chash: str) -> tuple[dict | None, float | None]:
    return curate_run(store, curation, parts, chash)


@task(name="curate", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient)
def curate_more(stage: OpenCuration, parts: list[PartInfo]) -> int:
    """A streamed stage's newly final parts curated, its dedup tables kept open (a retry rebuilds them).
    Returns how many parts have verdicts, not the verdicts: Prefect links a task's result, one layer
    deep, to its state (per shard, for the whole flow run), and the caller reads them from the store."""
    return len(stage.extend(parts))


@task(name="publish-manifest", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=retry_transient)
def write_manifest(store: OutputStore, cfg: RunConfig, the_plan: Plan, parts: list[PartInfo], refused: int,
                   curated: dict | None, results: list[ShardResult], timings: dict[str, float], settings: Settings,
                   job_ids: list[str], *, restarts: int, replicas: list[dict], invocation: str,
                   rollovers: dict | None = None) -> Manifest:
    return publish_manifest(store, cfg, the_plan, parts, refused, curated, results, timings, settings, job_ids,
                            restarts=restarts, replicas=replicas, invocation=invocation, rollovers=rollovers)


@task(name="export", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient)
def export(store: OutputStore, output_uri: str, run_id: str, settings: Settings) -> dict:
    return export_run(store, output_uri, run_id, settings)
