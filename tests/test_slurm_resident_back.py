"""A generating stage after a reward stage with both servers resident in ONE Slurm job (issue 29;
infra/slurm/resident.py ResidentKeeper.hand_back), on the real local Slurm cluster: the generator's
step never stopped, so the later stage uses it as it is: one job, one generator step, one reward
step, nothing swapped (no step request), every row scored and followed up once, the reward server's
nodes counted until the job's release, the pair check asking that same generator (held, not started
again), and nothing left running."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from infra.reward.client import PROBE_TEXT
from infra.slurm.client import SlurmClient
from tests.slurm_reward_cluster import nothing_left, set_up_reward_run, steps_seen
from tests.test_slurm_reward_swap_back import PIPELINE

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

RESIDENT = PIPELINE.replace("rm: {engine: nemo-aligner, swap_with: main, port: RM_PORT}",
                            "rm: {engine: nemo-aligner, resident: true, profile: test1x8, port: RM_PORT}") + """\
  - name: pairs
    kind: pairs
    from: rm
    pairs: {score: sample, min_margin: 1, check: {seed: 5}}
"""


def test_a_stage_after_the_reward_stage_uses_the_resident_generator_in_the_same_job(slurm_cluster, prefect_harness,
                                                                                   pytriton_env, workdir, monkeypatch):
    from flows.pipeline import pipeline

    rm_port, scored_log = set_up_reward_run(workdir, monkeypatch, pytriton_env, RESIDENT)
    client = SlurmClient()
    jobs, steps = steps_seen(client, "back", lambda: pipeline("pipeline.yaml", run_id="back", output_uri=str(workdir / "out")))
    run_dir = workdir / "out" / "back"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    answers, rm, followups, pairs = manifest["stages"]

    # One job for the three stages; its generator step served both generating stages (never restarted).
    [job_id] = json.loads((run_dir / "stages" / "answers" / "manifest.json").read_text())["slurm_job_ids"]
    assert json.loads((run_dir / "stages" / "followups" / "manifest.json").read_text())["slurm_job_ids"] == [job_id]
    assert jobs == {job_id} and sorted(name for _, name in steps) == ["nsdg-generator", "nsdg-reward"], (jobs, steps)
    [job_dir] = list((workdir / "jobs" / "back").iterdir())
    assert "step-request" not in {p.name for p in job_dir.iterdir()}  # nothing swapped, either way

    rows = [json.loads(line) for line in (run_dir / "stages" / "answers" / "rows.jsonl").read_text().splitlines()]
    scored = [t for line in scored_log.read_text().splitlines() if (t := json.loads(line)["text"]) != PROBE_TEXT]
    assert len(rows) == 8 and len(scored) == 8 and max(Counter(scored).values()) == 1
    follow = [json.loads(line) for line in (run_dir / "stages" / "followups" / "rows.jsonl").read_text().splitlines()]
    assert len(follow) == followups["rows_out"] == rm["kept"] == 8

    # The reward server's nodes from the job's start to its release (after the follow-ups); the
    # generator's nodes kept while it scored, counted once.
    alloc = rm["reward"]["allocation"]
    assert alloc["mode"] == "resident" and [j["job_id"] for j in alloc["jobs"]] == [job_id]
    assert alloc["reward_gpu_hours"] > 0 and alloc["generator_kept_gpu_hours"] > 0
    assert answers["gpu_hours"] > 0 and followups["gpu_hours"] > 0
    assert {r["level"] for r in manifest["allocation"]["replicas"]} == {0, 1}
    # The pair check asked the same job's generator, kept for it (not started again in a new job).
    assert pairs["check"]["server"] == "held" and pairs["check"]["allocation"]["held_s"] >= 0, pairs["check"]
    nothing_left(client, job_id, scored_log, rm_port, "back")
