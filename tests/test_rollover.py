"""Planned rollover's pure decisions (infra/backends/rollover.py) and the Slurm facts they read: a job's
EndTime from squeue/scontrol, the `--signal=B:USR1@<s>` directive."""

from datetime import datetime

import pytest

from infra.errors import ConfigError
from flows.generate import check_limit_before_submit
from infra.run.manifest import PartInfo
from infra.backends.rollover import (Handover, Measured, RolloverPolicy, RolloverReport, admits_shard, busy_s,
                            check_time_limit, gap_s, lead_s, mean_shard_s, overlap_s, shortest_limit_s,
                            successor_due)
from infra.slurm.parse import parse_scontrol_job, parse_slurm_time, parse_squeue_state, time_limit_s
from infra.slurm.render import sbatch_directives
from infra.slurm.spec import SbatchSpec

POLICY = RolloverPolicy(factor=1.5, margin_s=10.0, max_rollovers=3)


def test_lead_is_queue_wait_plus_load_plus_one_shard_with_margins():
    measured = Measured()
    measured.allocation(20.0, 100.0)
    measured.allocation(5.0, 140.0)  # the largest of each is planned for
    measured.shard_s = 40.0
    assert lead_s(measured, POLICY) == 1.5 * (20 + 140 + 40) + 10
    assert lead_s(Measured(), POLICY) == 10.0  # nothing measured yet: the margin alone


def test_successor_is_due_from_end_minus_lead():
    measured = Measured(queue_wait_s=10, load_s=30, shard_s=20)  # lead 1.5 * 60 + 10 = 100
    assert not successor_due(1000.0, 1101.0, measured, POLICY)
    assert successor_due(1000.0, 1100.0, measured, POLICY)
    assert not successor_due(1000.0, None, measured, POLICY)  # no end: never
    assert not successor_due(1000.0, 1001.0, measured, RolloverPolicy(max_rollovers=0))  # switched off


def test_an_ending_job_takes_only_shards_it_can_finish():
    measured = Measured(shard_s=20.0)
    # One shard in flight: a new one finishes after it, 2 * 20 * 1.5 = 60 s from now, + 10 s margin.
    assert admits_shard(1000.0, 1070.0, 1, measured, POLICY)
    assert not admits_shard(1000.0, 1069.0, 1, measured, POLICY)
    assert admits_shard(1000.0, 1040.0, 0, measured, POLICY)
    assert admits_shard(1000.0, None, 5, measured, POLICY)  # no end
    assert admits_shard(1000.0, 1001.0, 1, Measured(), POLICY)  # no shard measured yet: nothing to judge by


def test_a_short_limit_keeps_one_shard_free_before_its_end_not_the_whole_margin():
    """Issue 26: the default 60 s margin kept free before the end left a 1-minute job no room for
    any shard once one was measured; the reserve is the margin or one more shard, the shorter."""
    policy = RolloverPolicy(factor=1.25, margin_s=60.0, max_rollovers=5, limit_s=60.0)
    measured = Measured(load_s=3.0, shard_s=4.0)
    # Ready 3 s into a 60 s job: it takes shards until 60 - 5 (one shard in flight) - 5 (reserve).
    assert admits_shard(3.0, 60.0, 1, measured, policy) and admits_shard(45.0, 60.0, 1, measured, policy)
    assert not admits_shard(46.0, 60.0, 1, measured, policy)
    assert shortest_limit_s(measured, policy) == 1.25 * 7 + 5
    check_time_limit(measured, policy)  # fits: nothing raised


def test_a_limit_too_short_for_load_and_one_shard_is_refused_with_the_limit_that_works():
    policy = RolloverPolicy(factor=1.25, margin_s=5.0, max_rollovers=5, limit_s=60.0)
    with pytest.raises(ConfigError, match=r"too short.* = 72 s; set NSDG_SLURM__TIME_LIMIT=00:02:00 or more"):
        check_time_limit(Measured(load_s=50.0, shard_s=4.0), policy)
    with pytest.raises(ConfigError, match=r"NSDG_SLURM__TIME_LIMIT=01:15:00"):
        check_time_limit(Measured(load_s=3590.0, shard_s=4.0), RolloverPolicy(margin_s=5.0, limit_s=3600.0))
    check_time_limit(Measured(), policy)  # neither a load nor a shard known: nothing to judge by
    check_time_limit(Measured(load_s=40.0), policy)  # a load measured, no shard yet: 1.25 x 40 fits
    with pytest.raises(ConfigError, match=r"load 50 s measured \+ shard 0 s \(none measured yet\).* = 62 s"):
        check_time_limit(Measured(load_s=50.0), policy)  # the load alone does not fit: no shard could
    check_time_limit(Measured(load_s=50.0, shard_s=4.0), RolloverPolicy(max_rollovers=0, limit_s=60.0))  # off
    check_time_limit(Measured(load_s=50.0, shard_s=4.0), RolloverPolicy(limit_s=None))  # no limit


def test_before_any_job_the_published_shards_time_is_checked():
    def part(i, start, end):
        return PartInfo(f"part-{i:05d}.jsonl", i, 20, "x", 1, "h", 0, 19, started_at=start, finished_at=end)

    policy = RolloverPolicy(factor=1.25, margin_s=60.0, limit_s=60.0)
    check_limit_before_submit(policy, [])  # a fresh run: nothing measured yet
    check_limit_before_submit(policy, [part(0, 0.0, 8.0), part(1, 4.0, 12.0)])  # 6 s a shard: fits
    with pytest.raises(ConfigError, match="NSDG_SLURM__TIME_LIMIT=00:02:00"):  # 1.25 * 45 + 56.25 s
        check_limit_before_submit(policy, [part(0, 0.0, 45.0)])
    assert busy_s([(0.0, 8.0), (4.0, 12.0), (20.0, 21.0)]) == 13.0


def test_a_fresh_run_is_judged_by_the_assumed_load_until_one_is_measured():
    """Issue 26: before the first job nothing is measured, so a limit too short for the model's load
    was submitted anyway (every job loads and is dropped). The prior (slurm.expected_load_s, else
    the profile's) is judged before the first sbatch; the first measured load replaces it."""
    policy = RolloverPolicy(factor=1.25, margin_s=60.0, limit_s=600.0, expected_load_s=900.0)
    with pytest.raises(ConfigError, match=r"\(600 s\) is too short.*load 900 s assumed \(NSDG_SLURM__EXPECTED_LOAD_S, "
                                          r"else the profile's expected_load_s\).* = 1125 s; set "
                                          r"NSDG_SLURM__TIME_LIMIT=00:19:00 or more"):
        check_limit_before_submit(policy, [])  # a fresh run
    with pytest.raises(ConfigError, match=r"load 900 s assumed .*\+ shard 60 s measured.* = 1260 s"):
        check_limit_before_submit(policy, [PartInfo("part-00000.jsonl", 0, 20, "x", 1, "h", 0, 19,
                                                    started_at=0.0, finished_at=60.0)])  # 1.25 x 960 + 60
    check_time_limit(Measured(load_s=300.0, shard_s=10.0), policy)  # measured: 400 s, the prior is not used
    check_limit_before_submit(RolloverPolicy(factor=1.25, limit_s=600.0, expected_load_s=400.0), [])  # 500 s fits
    check_limit_before_submit(RolloverPolicy(limit_s=600.0, expected_load_s=900.0, max_rollovers=0), [])  # off


def test_the_prior_comes_from_the_setting_else_the_profile():
    from flows.generate import rollover_policy
    from infra.settings import Settings

    settings = Settings()
    assert rollover_policy(settings, settings.profile("h100x16")).expected_load_s == 120.0  # 340B: the low end
    assert rollover_policy(settings, settings.profile("local")).expected_load_s == 0.0
    tuned = Settings(slurm={"expected_load_s": 1500})
    assert rollover_policy(tuned, tuned.profile("h100x16")).expected_load_s == 1500.0
    with pytest.raises(ConfigError, match="NSDG_SLURM__TIME_LIMIT=00:03:00"):  # 1.25 x 120 s: 150 s
        check_limit_before_submit(rollover_policy(Settings(slurm={"time_limit": "2"}), settings.profile("h100x16")), [])


def test_slurm_time_limits_in_seconds():
    assert [time_limit_s(t) for t in ("1", "1:30", "04:00:00", "1-00", "1-02:03", "1-02:03:04")] == [
        60.0, 90.0, 14400.0, 86400.0, 93780.0, 93784.0]
    assert time_limit_s("0") is None  # Slurm: no limit


def test_shard_time_gap_and_overlap():
    assert mean_shard_s(90.0, 3) == 30.0 and mean_shard_s(0.0, 0) is None
    assert gap_s(100.0, 103.5) == 3.5
    assert gap_s(100.0, 90.0) == 0.0  # the successor started before the old one finished
    assert gap_s(None, 5.0) is None
    assert overlap_s(50.0, 80.0) == 30.0 and overlap_s(80.0, 50.0) == 0.0 and overlap_s(None, 1.0) == 0.0


def test_report_sums_overlap_gpu_hours_and_keeps_the_largest_gap():
    report = RolloverReport([Handover(0, ["1"], ["2"], 100.0, True, overlap_s=1800.0, gap_s=2.0),
                             Handover(0, ["2"], ["3"], 200.0, False, overlap_s=0.0, gap_s=40.0)])
    summary = report.summary(gpus=8)
    assert summary["count"] == 2 and summary["late"] == 1
    assert summary["overlap_gpu_hours"] == 4.0 and summary["largest_gap_s"] == 40.0
    assert [h["new_jobs"] for h in summary["handovers"]] == [["2"], ["3"]]
    assert RolloverReport().summary(8) == {"count": 0, "late": 0, "overlap_gpu_hours": 0.0, "largest_gap_s": None,
                                            "handovers": []}


def test_end_time_of_a_running_job_from_squeue_and_scontrol():
    end = datetime(2026, 12, 2, 5, 31, 7).timestamp()
    assert parse_slurm_time("2026-12-02T05:31:07") == end
    assert parse_slurm_time("N/A") is None and parse_slurm_time("Unknown") is None and parse_slurm_time("") is None
    running = parse_squeue_state("3", "3|RUNNING|None|node1|2026-12-02T05:31:07\n")
    assert running.end_time == end and running.nodes == ["node1"]
    # A pending job's end is Slurm's guess, not its limit; an old 4-field line has none.
    assert parse_squeue_state("3", "3|PENDING|Priority||2026-12-02T05:31:07\n").end_time is None
    assert parse_squeue_state("3", "3|RUNNING|None|node1\n").end_time is None
    line = ("JobId=7 JobName=nsdg-x JobState=RUNNING Reason=None TimeLimit=00:01:00 "
            "StartTime=2026-12-02T05:30:07 EndTime=2026-12-02T05:31:07 NodeList=node1")
    assert parse_scontrol_job("7", line).end_time == end


def spec(**kw) -> SbatchSpec:
    return SbatchSpec(job_name="nsdg-roll", job_dir="/shared/jobs/roll", comment="nsdg run=roll", nodes=1,
                      tasks_per_node=8, gpus_per_node=8, tensor_parallel=8, pipeline_parallel=1, **kw)


def test_the_job_asks_for_a_batch_level_warning_signal():
    assert "#SBATCH --signal=B:USR1@300" in sbatch_directives(spec())
    assert "#SBATCH --signal=B:USR1@45" in sbatch_directives(spec(warn_signal_s=45))
    assert not any("--signal" in d for d in sbatch_directives(spec(warn_signal_s=0)))
    # A site's own --signal wins: one directive, never two.
    own = sbatch_directives(spec(extra_directives=["--signal=B:USR2@600"]))
    assert [d for d in own if "--signal" in d] == ["#SBATCH --signal=B:USR2@600"]
    with pytest.raises(ConfigError, match="warn_signal_s"):
        spec(warn_signal_s="300; rm -rf /")


def test_plain_progress_lines_name_the_rollovers():
    import io

    from flows.progress import PlainLines

    out = io.StringIO()
    lines = PlainLines(out, every_s=0.0)
    lines.planned(40, 0)
    lines.advanced(20, 0)
    assert "rollovers" not in out.getvalue().splitlines()[-1]  # none yet: the line stays as it was
    lines.advanced(20, 0, 2)
    assert out.getvalue().splitlines()[-1].endswith("server restarts 0, rollovers 2")
