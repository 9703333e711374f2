"""The job a reward server kept, given back to a later level's generation (flows/pipeline.py
generate_level, serve): it is handed back at the pool's first launch, inside the pool's run, so an
error on the way to the pool leaves it with its keeper (released by the flow's `finally`), never held
by no one. No cluster: the keeper is a stand-in that counts what is asked of it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import flows.pipeline as pipeline
from infra.settings import load_settings


class Keeper:
    def __init__(self):
        self.kept, self.released, self.handed = "job-7", [], 0

    def hand_back(self, ready_s):
        self.handed += 1
        job, self.kept = self.kept, None
        return job

    def release(self):
        if self.kept is not None:
            self.released.append(self.kept)
            self.kept = None

    def ended(self, backend):
        pass


class Held:
    def keep(self, backend):
        pass

    def watch(self, pool):
        raise RuntimeError("the pair checks' watch failed")


class Stream:
    def __init__(self, stages, settings):
        self.stages = stages

    def has_work(self):
        return True

    def feed(self):
        return iter(())

    def submit(self, *a):
        raise AssertionError("no shard is submitted")

    def on_result(self, result):
        pass


def test_an_error_before_the_pool_runs_leaves_the_kept_job_with_its_keeper(monkeypatch):
    settings = load_settings()
    prof = settings.profile("local")
    stage = SimpleNamespace(name="follow", from_="scored")
    run = SimpleNamespace(prof=prof, cfg=SimpleNamespace(counter=None, shard_size=10), params=SimpleNamespace(replicas=1),
                          restarts_allowed=0)
    monkeypatch.setattr(pipeline, "open_stage", lambda *a, **k: SimpleNamespace(name=stage.name, run=run,
                                                                                plan=SimpleNamespace(samples=1)))
    monkeypatch.setattr(pipeline, "Stream", Stream)
    monkeypatch.setattr(pipeline, "superseded_store", lambda *a: None)
    keeper = Keeper()
    with pytest.raises(RuntimeError, match="watch failed"):
        pipeline.generate_level([stage], asked={stage.name: None}, hashes={}, superseded={stage.name: []},
                                settings=settings, flow_run=None, lease=None, output_uri="/tmp/x", run_id="run-1",
                                jobs=pipeline.LevelJobs(adopt_from=keeper, held=Held()), watch=lambda: None, levels=[])
    keeper.release()  # the flow's `finally` (swap.release())
    assert keeper.released == ["job-7"], f"handed back {keeper.handed} time(s) and released by no one"


class Job:
    """A stand-in Slurm job: what the pool asks of a backend before its first readiness wait."""

    job_ids = ["job-9"]

    def __init__(self):
        self.released = 0

    def start(self):
        raise RuntimeError("sbatch: error: Batch job submission failed")

    def release(self):
        self.released += 1

    def status(self):
        return "job-9 pending"


class SwapKeeper:
    step = SimpleNamespace(resident=False, server="scorer", nodes=1)

    def __init__(self):
        self.kept = []

    def keep(self, backend):
        self.kept.append(backend)


def test_a_failing_pool_releases_its_job_instead_of_keeping_it_for_a_later_reward_stage(monkeypatch):
    """flows/pipeline.py serve: a level's pool whose run raises gives its jobs back with a release,
    not to the reward keeper (which would stop the generator and start the reward model loading on
    those GPUs, only for the flow's `finally` to release the job once the error is raised)."""
    settings = load_settings()
    prof = settings.profile("local")
    job = Job()
    monkeypatch.setattr(pipeline, "make_backend", lambda *a, **k: job)
    monkeypatch.setattr(pipeline, "allocate", lambda backend: backend.start())  # the task's body, without Prefect
    monkeypatch.setattr(pipeline, "release", lambda backend: backend.release())
    run = SimpleNamespace(prof=prof, cfg=SimpleNamespace(counter=None, shard_size=10), params=SimpleNamespace(replicas=1),
                          restarts_allowed=0)
    stage = SimpleNamespace(name="answers", run=run, plan=SimpleNamespace(samples=1))
    keeper = SwapKeeper()
    pool = pipeline.serve(Stream([stage], settings), [stage], settings, SimpleNamespace(id="flow-1"), "run-1",
                          pipeline.LevelJobs(keep_for=keeper))
    with pytest.raises(RuntimeError, match="submission failed"):
        pool.run()
    assert (job.released, keeper.kept) == (1, [])
