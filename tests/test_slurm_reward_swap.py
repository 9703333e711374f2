"""A reward server swapped into the generator's Slurm job (issue 29, "Allocation"; infra/slurm/steps.py),
on the real local Slurm cluster: ONE job from the first generation request to the last reward score,
the generator's step then the reward server's (a real PyTriton/Triton server with NeMo-Aligner's
contract, tests/reward_standin.py, started by the batch script as a new step), every row scored once,
and nothing left running afterwards: no job, no step, no stand-in process. Seen from Slurm itself
(squeue and `squeue -s` sampled through the run, the completion log) and from the manifest (each
server's GPU-hours, the swap's seconds)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from infra.reward.client import PROBE_TEXT
from infra.reward.conversation import format_conversation
from infra.slurm.client import SlurmClient
from tests.slurm_reward_cluster import nothing_left, set_up_reward_run, steps_seen
from tests.test_slurm_flow import our_jobs

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

PIPELINE = """\
input: topics.jsonl
servers:
  main: {profile: test1x8}
  rm: {engine: nemo-aligner, swap_with: main, port: RM_PORT}
defaults:
  prompt_format: raw
  sampling: {temperature: 0.8, random_seed: 5, tokens_to_generate: 6}
  batch_size: 4
  filters: {drop_truncated: false}
stages:
  - name: answers
    recipe: {prompt_template: "Answer about {{ topic }}:", samples_per_prompt: 2}
  - name: rm
    from: answers
    kind: reward
    reward: {weights: {helpfulness: 0.3, correctness: 0.74}, keep_if: {helpfulness: 1.0}, batch_size: 3}
"""










def test_generator_then_reward_server_in_one_slurm_job_nothing_left(slurm_cluster, prefect_harness, pytriton_env,
                                                                    workdir, monkeypatch):
    from flows.pipeline import pipeline

    rm_port, scored_log = set_up_reward_run(workdir, monkeypatch, pytriton_env, PIPELINE)
    client = SlurmClient()
    jobs, steps = steps_seen(client, "swap", lambda: pipeline("pipeline.yaml", run_id="swap", output_uri=str(workdir / "out")))
    run_dir = workdir / "out" / "swap"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    answers, rm = manifest["stages"]

    # One job, queued once (one sbatch, one job directory), whose steps were the generator's then the reward's.
    [job_id] = {j for s in ("answers",) for j in json.loads((run_dir / "stages" / s / "manifest.json").read_text())
                ["slurm_job_ids"]}
    assert jobs == {job_id} and [n for _, n in steps] == ["nsdg-generator", "nsdg-reward"], (jobs, steps)
    [job_dir] = list((workdir / "jobs" / "swap").iterdir())
    sbatch = (job_dir / "sbatch.sh").read_text()  # the rendered job shows the plan: both steps, one allocation
    assert "srun --job-name=nsdg-generator" in sbatch and "srun --job-name=nsdg-reward" in sbatch
    assert str(scored_log) in (job_dir / "reward-launcher.sh").read_text()
    swap = rm["reward"]["allocation"]
    assert [j["job_id"] for j in swap["jobs"]] == [job_id] and manifest["server_launches"] == 1
    log = next(job_dir.glob("*.err")).read_text() + next(job_dir.glob("*.out")).read_text()
    assert "step reward asked for (request 1)" in log

    # Every row of the generating stage scored once by the stand-in the reward step ran.
    rows = [json.loads(line) for line in (run_dir / "stages" / "answers" / "rows.jsonl").read_text().splitlines()]
    sent = [format_conversation([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
                                "") for r in rows]
    scored = [json.loads(line)["text"] for line in scored_log.read_text().splitlines()]
    assert len(rows) == 8 and Counter(t for t in scored if t != PROBE_TEXT) == Counter(sent)
    assert rm["reward"]["parts_scored"] >= 1 and rm["reward"]["server_restarts"] == 0

    # Each server's GPU-hours and the swap's seconds; the generator's step stopped, not the job.
    assert swap["generator_gpu_hours"] > 0 and swap["reward_gpu_hours"] > 0 and swap["swap_s"] > 0
    assert swap["jobs"][0]["generator_stop_s"] >= 0 and answers["gpu_hours"] > 0
    # The pipeline's allocation counts both servers' GPUs: the reward stage's share is its server's.
    assert rm["gpu_hours"] == swap["reward_gpu_hours"]
    servers = manifest["allocation"]["servers"]
    assert servers["reward_gpu_hours"] == swap["reward_gpu_hours"]
    assert manifest["allocation"]["gpu_hours"] == pytest.approx(servers["generator_gpu_hours"] + swap["reward_gpu_hours"], abs=2e-4)

    # Released after the last score: no job, no step, no stand-in process left.
    nothing_left(client, job_id, scored_log, rm_port)

    # Another reward checkpoint on a rerun: nothing to generate, so ONE job whose only step is the
    # reward server's (its request written before sbatch); every row scored again, once.
    (workdir / "pipeline.yaml").write_text(PIPELINE.replace("RM_PORT", f"{rm_port}, model_path: /models/rm-v2"))
    again, steps2 = steps_seen(client, "swap", lambda: pipeline("pipeline.yaml", run_id="swap", output_uri=str(workdir / "out")))
    rm2 = json.loads((run_dir / "manifest.json").read_text())["stages"][1]
    [job2] = again
    assert job2 != job_id and [n for _, n in steps2] == ["nsdg-reward"], (again, steps2)
    assert [j["job_id"] for j in rm2["reward"]["allocation"]["jobs"]] == [job2]
    assert rm2["reward"]["allocation"]["generator_gpu_hours"] == 0 and rm2["reward"]["parts_scored"] >= 1
    scored = [json.loads(line)["text"] for line in scored_log.read_text().splitlines()]
    assert Counter(t for t in scored if t != PROBE_TEXT) == Counter(sent * 2)
    nothing_left(client, job2, scored_log, rm_port)


def test_a_reward_server_that_fails_to_start_stops_the_run_with_nothing_left(slurm_cluster, prefect_harness, workdir,
                                                                            monkeypatch):
    from flows.pipeline import pipeline
    from infra.errors import ServerLost

    failing = ["bash", "-c", "echo 'reward checkpoint not found' >&2; exit 3"]
    set_up_reward_run(workdir, monkeypatch, None, PIPELINE, topics=2, reward_command=failing)
    client = SlurmClient()
    with pytest.raises(ServerLost) as caught:
        steps_seen(client, "swap", lambda: pipeline("pipeline.yaml", run_id="swap", output_uri=str(workdir / "out")))
    message = str(caught.value)
    [job_id] = json.loads((workdir / "out" / "swap" / "stages" / "answers" / "manifest.json").read_text())["slurm_job_ids"]
    assert message.startswith("the reward server 'rm' ended before it was ready: Slurm job ") and "FAILED" in message
    assert "reward checkpoint not found" in message  # the step's own error, in the log tail it quotes
    assert not our_jobs("swap") and not client.steps(job_id)
