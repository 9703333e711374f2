"""A reward server resident beside the generator in ONE Slurm job (issue 29, "Allocation";
infra/slurm/resident.py), on the real local Slurm cluster (2 nodes): the job holds the generator's
node and the reward server's (1 each, from their profiles), both steps start at once on disjoint
nodes, the reward stage scores through the real PyTriton stand-in (tests/reward_standin.py) with no
swap, every row once, both servers' GPU-hours land in the manifest, and nothing is left running; a
rerun with nothing to generate holds the reward server's node alone."""

from __future__ import annotations

import json
import subprocess
from collections import Counter

import pytest

from infra.reward.client import PROBE_TEXT
from infra.reward.conversation import format_conversation
from infra.slurm.client import SlurmClient
from tests.slurm_reward_cluster import nothing_left, sampled_jobs, set_up_reward_run
from tests.test_slurm_reward_swap import PIPELINE

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

RESIDENT = PIPELINE.replace("rm: {engine: nemo-aligner, swap_with: main, port: RM_PORT}",
                            "rm: {engine: nemo-aligner, resident: true, profile: test1x8, port: RM_PORT}")


def sampled(run) -> tuple[set[str], list[dict[str, str]]]:
    """`run()` while `squeue -s` is sampled: the run's jobs, and each sample's {step name: node}."""
    samples: list[dict[str, str]] = []

    def sample(job_id: str) -> None:
        out = subprocess.run(["squeue", "-h", "-s", "-j", job_id, "-o", "%j|%N"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
        if seen := dict(line.split("|", 1) for line in out.split() if line.startswith("nsdg-")):
            samples.append(seen)

    return sampled_jobs("resident", run, sample), samples


def test_both_servers_resident_in_one_slurm_job_on_their_own_nodes_nothing_left(slurm_cluster, prefect_harness,
                                                                                pytriton_env, workdir, monkeypatch):
    from flows.pipeline import pipeline

    rm_port, scored_log = set_up_reward_run(workdir, monkeypatch, pytriton_env, RESIDENT)
    jobs, samples = sampled(lambda: pipeline("pipeline.yaml", run_id="resident", output_uri=str(workdir / "out")))
    run_dir = workdir / "out" / "resident"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    answers, rm = manifest["stages"]

    # One job, queued once, of 2 nodes; both steps listed at once, each on a node of its own.
    [job_id] = json.loads((run_dir / "stages" / "answers" / "manifest.json").read_text())["slurm_job_ids"]
    assert jobs == {job_id}, jobs
    both = [s for s in samples if set(s) == {"nsdg-generator", "nsdg-reward"}]
    assert both, samples
    assert all(s["nsdg-generator"] != s["nsdg-reward"] for s in both), both
    [job_dir] = list((workdir / "jobs" / "resident").iterdir())
    sbatch = (job_dir / "sbatch.sh").read_text()
    assert "#SBATCH -N 2" in sbatch and "GENERATOR_NODES=1" in sbatch and "REWARD_NODES=1" in sbatch
    log = next(job_dir.glob("*.err")).read_text() + next(job_dir.glob("*.out")).read_text()
    assert "starting step generator" in log and "starting step reward on node(s) 1..1" in log
    assert "step-request" not in {p.name for p in job_dir.iterdir()}  # nothing swapped

    # Every row of the generating stage scored once.
    rows = [json.loads(line) for line in (run_dir / "stages" / "answers" / "rows.jsonl").read_text().splitlines()]
    sent = [format_conversation([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
                                "") for r in rows]
    scored = [json.loads(line)["text"] for line in scored_log.read_text().splitlines()]
    assert len(rows) == 8 and Counter(t for t in scored if t != PROBE_TEXT) == Counter(sent)
    assert rm["reward"]["server_restarts"] == 0 and manifest["server_launches"] == 1

    # Both servers' GPU-hours: the reward server's from the job's start, the generator's kept nodes too.
    alloc = rm["reward"]["allocation"]
    assert alloc["mode"] == "resident" and [j["job_id"] for j in alloc["jobs"]] == [job_id] and alloc["swap_s"] == 0
    assert alloc["reward_gpu_hours"] > 0 and alloc["jobs"][0]["reward_ready_s"] is not None
    assert answers["gpu_hours"] > 0 and rm["gpu_hours"] == pytest.approx(
        alloc["reward_gpu_hours"] + alloc["generator_kept_gpu_hours"], abs=2e-4)
    servers = manifest["allocation"]["servers"]
    assert servers["reward_gpu_hours"] == alloc["reward_gpu_hours"]
    assert manifest["allocation"]["gpu_hours"] == pytest.approx(servers["generator_gpu_hours"] + servers["reward_gpu_hours"],
                                                                abs=2e-4)

    # Released when both are done: no job, no step, no stand-in process, no port.
    client = SlurmClient()
    nothing_left(client, job_id, scored_log, rm_port, "resident")

    # Another reward checkpoint on a rerun: nothing to generate, so ONE job of the reward server's node
    # alone, whose only step is the reward server's; every row scored again, once.
    (workdir / "pipeline.yaml").write_text(RESIDENT.replace("RM_PORT", f"{rm_port}, model_path: /models/rm-v2"))
    again, samples2 = sampled(lambda: pipeline("pipeline.yaml", run_id="resident", output_uri=str(workdir / "out")))
    rm2 = json.loads((run_dir / "manifest.json").read_text())["stages"][1]
    [job2] = again
    assert job2 != job_id and {n for s in samples2 for n in s} == {"nsdg-reward"}, (again, samples2)
    [job_dir2] = [d for d in (workdir / "jobs" / "resident").iterdir() if d != job_dir]
    assert "#SBATCH -N 1" in (job_dir2 / "sbatch.sh").read_text()
    assert [j["job_id"] for j in rm2["reward"]["allocation"]["jobs"]] == [job2]
    assert rm2["reward"]["allocation"]["generator_kept_gpu_hours"] == 0 and rm2["reward"]["parts_scored"] >= 1
    scored = [json.loads(line)["text"] for line in scored_log.read_text().splitlines()]
    assert Counter(t for t in scored if t != PROBE_TEXT) == Counter(sent * 2)
    nothing_left(client, job2, scored_log, rm_port, "resident")

