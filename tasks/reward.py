"""The reward stage's task (infra/reward/stage.py): its parts' replies are checkpointed, so a retry
scores only the parts not yet scored."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from infra.reward.stage import RewardScorer, run_reward_stage_on
from tasks.steps import retry_transient


@task(name="reward-stage", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=[10], retry_condition_fn=retry_transient,
      task_run_name="reward-{stage}")
def score_reward_stage(store, scorer: RewardScorer, input_uri: str, s3, stage: str, **kwargs) -> dict:
    return run_reward_stage_on(store, scorer, input_uri, s3, **kwargs)
