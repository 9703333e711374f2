"""ResidentKeeper's way back (infra/slurm/resident.py): the job a resident reward server kept, given
to a later level's generation and released by that pool again. No cluster: the job is a stand-in
that answers what the keeper asks (its state, its scheduled end); the Slurm behaviour itself is
tests/test_slurm_resident_back.py's."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

from infra.slurm.resident import ResidentKeeper
from infra.slurm.steps import RewardStep

STEP = RewardStep(server="rm", tensor_parallel=8, pipeline_parallel=1, model_path="/m", port=None, script="s",
                  image="i", resident=True, nodes=1)


class Job:
    def __init__(self, dead=None, end=None, job_id="41"):
        self.job_id, self.dead, self.end = job_id, dead, end
        self.spec = SimpleNamespace(reward=STEP)  # its job carries the reward step

    def dead_reason(self):
        return self.dead

    def scheduled_end(self):
        return self.end

    def running_at(self):
        return time.time() - 60


def keeper_with(job):
    released = []
    keeper = ResidentKeeper(STEP, new_job=lambda: None, release=released.append, ready_timeout_s=5, poll_s=0.1, gpus=8,
                            reward_gpus=8)
    keeper.keep(job)  # the first level's pool released it: kept for the resident reward step
    assert keeper.kept is job and not released
    return keeper, released


def test_a_lost_kept_job_is_not_given_back_and_the_log_says_a_new_one_is_submitted(caplog):
    caplog.set_level(logging.WARNING, logger="infra.slurm")
    job = Job()
    keeper, released = keeper_with(job)
    job.dead = "FAILED (exit 1)"
    assert keeper.hand_back(30.0) is None and released == [job]
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("41" in m and "FAILED (exit 1)" in m and "a new job is submitted" in m for m in said), said


def test_a_job_given_back_whose_end_is_near_is_released_not_kept_again_for_scoring():
    """As a first keep does: its time limit would cut the scoring short (a new job scores instead)."""
    job = Job()
    keeper, released = keeper_with(job)
    assert keeper.hand_back(30.0) is job and keeper.kept is None
    job.end = "its time limit is 2 min away"
    keeper.keep(job)  # the later level's pool releases it, with another reward stage to come
    assert keeper.kept is None and released == [job] and "released_at" in keeper.swaps[-1]


def test_a_job_given_back_and_released_after_another_replicas_job_has_one_record_and_is_the_one_kept():
    """Two replicas in the later level: the adopted job and a new one (its own resident reward server).
    The new one released first was kept; the adopted one released last is kept instead (the last
    released is kept), with its own record continued: not a second record from its job's start
    beside an old one left open (its reward nodes counted twice, to the report's time)."""
    adopted, other = Job(), Job(job_id="42")
    keeper, released = keeper_with(adopted)
    assert keeper.hand_back(30.0) is adopted
    keeper.keep(other)
    assert keeper.kept is other
    keeper.keep(adopted)
    assert keeper.kept is adopted and released == [other]
    assert [s["job_id"] for s in keeper.swaps] == ["42", "41"]  # the kept job's record last (connect, release)
    assert "released_at" in keeper.swaps[0] and "released_at" not in keeper.swaps[1]
    keeper.release()
    assert released == [other, adopted] and all("released_at" in s for s in keeper.swaps)
