"""Runs longer than a Slurm time limit, on the real local cluster: each job's end is read from
Slurm, a successor job is started for the replica ahead of it, the old one drains, and the
rollover is planned work, never a lost server (`max_server_restarts=0` here: a failure would fail
the run). The slowest tests of the suite: few of them, one data set, 1-minute limits (Slurm's
smallest). Jobs are one-GPU and non-exclusive, so an old job and its successor (four jobs with
two replicas) share the two nodes. Timings are reported, not asserted: only generous bounds."""

import json
import logging
import threading

import pytest

from flows.generate import generate
from infra.system.commands import run_command
from infra.deadline import Deadline, poll_until
from infra.errors import ConfigError
from tests.ports import free_port
from tests.test_slurm_flow import our_jobs, prompts, slurm_env  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.integration]
ROLL_PROFILE = {"roll1x1": {"backend": "slurm", "nodes": 1, "gpus_per_node": 1, "tensor_parallel": 1,
                            "pipeline_parallel": 1}}
SHARD, BATCH = 20, 10  # two requests of 0.5 s: one shard takes about a second
RECORDS = 2400  # about 120 s of generation for one replica: two 1-minute jobs and then some
# About 80 s for one replica: past a job cut to one minute soon after it serves (its successor is
# due about 12 s before that end), not two minutes of it. Requests cannot go faster than the
# server's latency, so the run cannot end before the cut job does.
RECORDS_PAST_ONE_LIMIT = 1600


@pytest.fixture
def rollover_env(slurm_env, prefect_harness, monkeypatch):
    monkeypatch.setenv("NSDG_EXTRA_PROFILES", json.dumps(ROLL_PROFILE))
    monkeypatch.setenv("NSDG_SERVER__PORT", str(free_port(span=24)))  # launch k listens on port + k
    monkeypatch.setenv("NSDG_SERVER__READY_TIMEOUT_S", "300")  # other sessions' jobs may hold the nodes
    monkeypatch.setenv("NSDG_SLURM__TIME_LIMIT", "1")
    monkeypatch.setenv("NSDG_SLURM__EXCLUSIVE", "false")
    monkeypatch.setenv("NSDG_SLURM__MEM", "")
    monkeypatch.setenv("NSDG_SLURM__ROLLOVER_MARGIN_S", "5")
    monkeypatch.setenv("NSDG_SLURM__WARN_SIGNAL_S", "60")  # Slurm may send it a minute early: not before EndTime
    slurm_env("--load-delay", "3", "--extra-latency", "0.5")
    return slurm_env


def run_and_read(workdir, run_id: str, records: int, **kw):
    generate(input_uri=prompts(workdir / f"{run_id}.jsonl", records), output_uri="out", run_id=run_id,
             profile="roll1x1", shard_size=SHARD, batch_size=BATCH, max_server_restarts=0, **kw)
    run_dir = workdir / "out" / run_id
    manifest = json.loads((run_dir / "manifest.json").read_text())
    ids = [json.loads(line)["id"] for p in manifest["parts"] for line in (run_dir / p["name"]).read_text().splitlines()]
    assert ids == [f"s{i}" for i in range(records)]  # every record exactly once, in order
    assert manifest["server_restarts"] == 0
    assert not our_jobs(run_id)
    roll = manifest["rollovers"]
    print(f"{run_id}: {roll['count']} rollovers, {roll['late']} late, largest gap {roll['largest_gap_s']} s, "
          f"overlap {roll['overlap_gpu_hours']} GPU-h; jobs {manifest['slurm_job_ids']}")
    return manifest, roll


def test_a_run_longer_than_the_time_limit_rolls_over(rollover_env, workdir):
    """Two replicas, each with about 120 s of generation: each rolls over on its own, and a successor
    is itself succeeded when its own limit nears (one test where there were two, one replica and
    two, each about two minutes of one-minute jobs: a replica's handovers are its own either way)."""
    manifest, roll = run_and_read(workdir, "roll-2", 2 * RECORDS, replicas=2)
    assert roll["count"] >= 2 and len(manifest["slurm_job_ids"]) == roll["count"] + 2
    successors = [r for r in manifest["replicas"] if "successor_of" in r]
    assert len(successors) == roll["count"]
    replaced = {job for r in successors for job in r["successor_of"]}
    assert any(set(r["job_ids"]) & replaced for r in successors), manifest["replicas"]  # a successor's successor
    # A successor ready in time takes over with (about) no gap; generous bound. A late one (the
    # nodes held by another session's job) idles for its queue wait, which is not ours to assert.
    in_time = [h["gap_s"] for h in roll["handovers"] if h["ready_in_time"] and h["gap_s"] is not None]
    assert all(gap < 30 for gap in in_time), roll["handovers"]


def test_a_limit_too_short_to_hand_over_loses_nothing_and_says_so(rollover_env, workdir, caplog):
    """Loading takes 42 s of a 1-minute job: no successor can be ready before its predecessor's
    end (at 35 s it now can: the old job serves until its own end, beside its successor), yet load +
    one shard fit the limit, so nothing refuses it. The old job's shards go back to the queue, the
    successor finishes them, and the log says the limit is too short."""
    rollover_env("--load-delay", "42", "--extra-latency", "0.5")
    caplog.set_level(logging.WARNING, logger="flows.rollovers")
    _, roll = run_and_read(workdir, "roll-short", 400)
    assert roll["count"] >= 1 and roll["late"] >= 1
    assert any("raise NSDG_SLURM__TIME_LIMIT" in r.getMessage() for r in caplog.records)


def test_a_limit_shortened_from_outside_is_seen(rollover_env, workdir, monkeypatch):
    """The job starts with 10 minutes, far more than the run needs; once it serves, its limit is cut
    to one minute with `scontrol update`. The successor is started from the new end."""
    monkeypatch.setenv("NSDG_SLURM__TIME_LIMIT", "00:10:00")
    run_dir = workdir / "out" / "roll-cut"
    cut = []

    def shorten():
        poll_until(lambda: True if list(run_dir.glob("part-*.state.json")) else None,
                   deadline=Deadline(300), interval=0.2, what="the first published part")
        job = our_jobs("roll-cut")[0]
        run_command(["scontrol", "update", f"JobId={job.job_id}", "TimeLimit=1"], timeout=30)
        cut.append(job.job_id)

    cutter = threading.Thread(target=shorten, daemon=True)
    cutter.start()
    manifest, roll = run_and_read(workdir, "roll-cut", RECORDS_PAST_ONE_LIMIT)
    cutter.join(timeout=5)
    assert cut and roll["count"] >= 1
    assert roll["handovers"][0]["old_jobs"] == cut


def test_a_lead_longer_than_the_limit_does_not_thrash(rollover_env, workdir, monkeypatch):
    """Issue 26: the default 60 s margin on a 1-minute limit makes the lead (1.25 x (queue wait + load
    + shard) + 60 s) longer than any job: every job wants a successor from its first second. Each
    job still serves until its own end is near (beside its successor: both are paid for), and a
    successor's successor waits until it has served and its predecessor is gone: a few rollovers,
    not one per load (it was 50 in 4 minutes, 20 of 420 records, then ServerLost)."""
    monkeypatch.delenv("NSDG_SLURM__ROLLOVER_MARGIN_S")  # the default, 60 s
    monkeypatch.setenv("NSDG_SLURM__MAX_ROLLOVERS", "6")  # the thrash stops here, not after 50 jobs
    rollover_env("--load-delay", "3", "--extra-latency", "2")  # a batch of 10 takes 2 s
    manifest, roll = run_and_read(workdir, "roll-thrash", 600)
    assert 1 <= roll["count"] <= 4, roll["handovers"]
    replaced = {job for r in manifest["replicas"] for job in r.get("successor_of", [])}
    assert all(r["records"] > 0 for r in manifest["replicas"] if set(r["job_ids"]) & replaced), manifest["replicas"]


def test_a_limit_too_short_for_load_and_one_shard_is_refused_before_the_successor(rollover_env, workdir):
    """Loading takes 50 s of a 1-minute job: once the load and a shard are measured, no successor is
    submitted (it would load and be dropped, and its successor too); the job serves until its end,
    then the run stops with the limit that would work. A rerun with it resumes."""
    rollover_env("--load-delay", "50", "--extra-latency", "0.5")
    with pytest.raises(ConfigError, match=r"too short for a job to load the model.*NSDG_SLURM__TIME_LIMIT=00:02:00"):
        generate(input_uri=prompts(workdir / "in.jsonl", 2000), output_uri="out", run_id="roll-refuse",
                 profile="roll1x1", shard_size=SHARD, batch_size=BATCH, max_server_restarts=0)
    assert len(list((workdir / "jobs" / "roll-refuse").iterdir())) == 1  # one job, no successor submitted
    assert list((workdir / "out" / "roll-refuse").glob("part-*.jsonl"))  # what it served is kept
    assert not our_jobs("roll-refuse")
