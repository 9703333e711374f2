"""Going back to generation after a reward stage, in the SAME Slurm job (issue 29, "Allocation";
flows/pipeline.py levels, infra/slurm/steps.py SwapKeeper.hand_back), on the real local Slurm
cluster: topics -> answers -> reward -> follow-ups. One job from the first generation request to the
last follow-up: the generator's step, the reward server's (a real PyTriton/Triton server with
NeMo-Aligner's contract, tests/reward_standin.py), then the generator's again as a new step; every
row scored once and followed up once; nothing left running (no job, step, stand-in process or port).
Seen from Slurm itself (squeue and `squeue -s` sampled through the run, the completion log), the
batch script's log and the manifest (each server's GPU-hours, the swap's and the way back's seconds)."""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest

from infra.reward.client import PROBE_TEXT
from infra.reward.conversation import format_conversation
from infra.slurm.client import SlurmClient
from tests.slurm_reward_cluster import nothing_left, set_up_reward_run, steps_seen
from tests.test_slurm_flow import our_jobs
from tests.test_slurm_pipeline import job_record
from tests.test_slurm_reward_swap import PIPELINE as SWAP_PIPELINE

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

# The swap test's pipeline (every answer kept), then a generating stage that reads the reward stage.
PIPELINE = SWAP_PIPELINE.replace(", keep_if: {helpfulness: 1.0}", "") + """\
  - name: followups
    from: rm
    recipe: {prompt_template: "Ask a follow-up to {{ completion }} (scored {{ reward.helpfulness }}):"}
"""


def test_generator_reward_server_then_generator_again_in_one_slurm_job(slurm_cluster, prefect_harness, pytriton_env,
                                                                      workdir, monkeypatch):
    from flows.pipeline import pipeline

    rm_port, scored_log = set_up_reward_run(workdir, monkeypatch, pytriton_env, PIPELINE)
    client = SlurmClient()
    jobs, steps = steps_seen(client, "back", lambda: pipeline("pipeline.yaml", run_id="back", output_uri=str(workdir / "out")))
    run_dir = workdir / "out" / "back"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    answers, rm, followups = manifest["stages"]

    # ONE job (queued once: one sbatch, one job directory) for all three phases; its steps were the
    # generator's, the reward server's, then the generator's again as a new step.
    ids = {s: json.loads((run_dir / "stages" / s / "manifest.json").read_text())["slurm_job_ids"]
           for s in ("answers", "followups")}
    [job_id] = set(ids["answers"])
    assert ids["followups"] == [job_id] and jobs == {job_id}, (ids, jobs)
    assert [name for _, name in steps] == ["nsdg-generator", "nsdg-reward", "nsdg-generator"], steps
    assert len({step_id for step_id, _ in steps}) == 3  # three steps, the generator's twice
    [job_dir] = list((workdir / "jobs" / "back").iterdir())
    log = next(job_dir.glob("*.err")).read_text() + next(job_dir.glob("*.out")).read_text()
    assert "step reward asked for (request 1)" in log and "step generator asked for (request 2)" in log

    # Every answer scored once; every scored row followed up once (no row lost or repeated across the swaps).
    rows = [json.loads(line) for line in (run_dir / "stages" / "answers" / "rows.jsonl").read_text().splitlines()]
    sent = [format_conversation([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
                                "") for r in rows]
    scored = [json.loads(line)["text"] for line in scored_log.read_text().splitlines()]
    assert len(rows) == 8 and Counter(t for t in scored if t != PROBE_TEXT) == Counter(sent)
    kept = [json.loads(line) for line in (run_dir / "stages" / "rm" / "rows.jsonl").read_text().splitlines()]
    follow = [json.loads(line) for line in (run_dir / "stages" / "followups" / "rows.jsonl").read_text().splitlines()]
    assert len(kept) == rm["kept"] == 8 and len(follow) == followups["rows_out"] == 8
    assert sorted(f["prompt"] for f in follow) == sorted(
        f"Ask a follow-up to {k['completion']} (scored {k['reward']['helpfulness']}):" for k in kept)

    # Each server's GPU-hours and the seconds of both swaps; the followups' share is the second pool's.
    swap = rm["reward"]["allocation"]
    assert [j["job_id"] for j in swap["jobs"]] == [job_id]
    assert swap["reward_gpu_hours"] > 0 and swap["swap_s"] > 0 and swap["jobs"][0]["back_s"] >= 0
    assert answers["gpu_hours"] > 0 and followups["gpu_hours"] > 0 and rm["gpu_hours"] == swap["reward_gpu_hours"]
    alloc = manifest["allocation"]
    assert {r["level"] for r in alloc["replicas"]} == {0, 1} and {tuple(r["job_ids"]) for r in alloc["replicas"]} == {(job_id,)}
    # The job handed back to the follow-ups was running long before: that pool's replica counts its own time,
    # not the levels before it (its load, the generator's restart, is what a successor's lead time plans for).
    [back] = [r for r in alloc["replicas"] if r["level"] == 1]
    assert 0 < back["allocated_s"] <= back["held_s"] and 0 <= back["load_s"] <= back["held_s"], back
    assert alloc["servers"]["reward_gpu_hours"] == swap["reward_gpu_hours"]
    assert alloc["gpu_hours"] == pytest.approx(alloc["servers"]["generator_gpu_hours"] + swap["reward_gpu_hours"], abs=2e-4)

    # Released after the last follow-up: no job, no step, no stand-in process, nothing on the reward port.
    nothing_left(client, job_id, scored_log, rm_port, run_id="back")

    # A rerun finds every stage done (the follow-ups' input, the reward stage's rows, read again the same):
    # nothing submitted, nothing scored or generated again.
    again, _ = steps_seen(client, "back", lambda: pipeline("pipeline.yaml", run_id="back", output_uri=str(workdir / "out")))
    rerun = json.loads((run_dir / "manifest.json").read_text())
    assert not again and rerun["server_launches"] == 0 and rerun["stages"][1]["reward"]["parts_scored"] == 0
    assert [json.loads(line) for line in (run_dir / "stages" / "followups" / "rows.jsonl").read_text().splitlines()] == follow
    assert len(scored_log.read_text().splitlines()) == len(scored)


def test_a_generator_step_lost_after_the_way_back_is_replaced_by_a_new_job(slurm_cluster, prefect_harness,
                                                                           pytriton_env, workdir, monkeypatch):
    """The second generator step killed (`scancel JOB.STEP`) once the follow-ups' first shard is
    published: the batch script ends the job (a step ended with no new request), the pool replaces it
    with a new job (a second queue wait: what a lost step costs), and every follow-up row is there once."""
    from flows.pipeline import pipeline

    # Each request answered 0.5 s late, so the follow-ups' shards are still in flight when the step is killed.
    rm_port, scored_log = set_up_reward_run(workdir, monkeypatch, pytriton_env, PIPELINE, "--extra-latency", "0.5")
    client, killed = SlurmClient(), []
    first_part = workdir / "out" / "back" / "stages" / "followups" / "part-00000.jsonl"

    def kill_second_generator_step():
        while not killed:
            for job in our_jobs("back"):
                gens = [s for s, name in client.steps(job.job_id) if name == "nsdg-generator"]
                if first_part.exists() and gens and "step generator asked for" in "".join(
                        p.read_text() for p in (workdir / "jobs" / "back").glob("*/*.err")):
                    client.cancel_step(gens[0])
                    killed.append(gens[0])
            threading.Event().wait(0.1)

    killer = threading.Thread(target=kill_second_generator_step, daemon=True)
    killer.start()
    try:
        jobs, steps = steps_seen(client, "back", lambda: pipeline("pipeline.yaml", run_id="back", output_uri=str(workdir / "out"),
                                                             shard_size=2))
    finally:
        killed.append("stop")
        killer.join(10)
    run_dir = workdir / "out" / "back"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    [job1] = json.loads((run_dir / "stages" / "answers" / "manifest.json").read_text())["slurm_job_ids"]
    follow_jobs = json.loads((run_dir / "stages" / "followups" / "manifest.json").read_text())["slurm_job_ids"]
    assert killed[0] != "stop" and killed[0].startswith(f"{job1}.")  # the second generator step of the first job
    assert follow_jobs[0] == job1 and len(follow_jobs) == 2 and jobs == set(follow_jobs), (follow_jobs, jobs)
    follow = [json.loads(line) for line in (run_dir / "stages" / "followups" / "rows.jsonl").read_text().splitlines()]
    kept = [json.loads(line) for line in (run_dir / "stages" / "rm" / "rows.jsonl").read_text().splitlines()]
    assert len(follow) == len(kept) == 8 and len({f["prompt"] for f in follow}) == 8
    assert manifest["stages"][2]["gpu_hours"] > 0
    assert job_record(job1)["state"].startswith("FAILED") and not client.steps(job1)  # ended with its lost step
    nothing_left(client, follow_jobs[1], scored_log, rm_port, run_id="back")
