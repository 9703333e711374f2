"""A pipeline on the real local Slurm cluster (issue 24): three stages are ONE Slurm job, held from
before the first request to after the last, and released as soon as the last stage is done (before
the pipeline's manifest is written). Seen from Slurm itself: squeue sampled through the run, and the
job's record in the completion log (sacct --completion: its start and end)."""

from __future__ import annotations

import json
import threading
from collections import Counter
from datetime import datetime

import pytest

from infra.deadline import Deadline, poll_until
from infra.slurm.client import SlurmClient
from infra.system.commands import run_command
from tests.fixtures_slurm import simulated_server_command, slurm_test_env
from tests.ports import free_port
from tests.test_slurm_flow import our_jobs

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

PIPELINE = """\
input: topics.jsonl
servers:
  main: {profile: test1x8}
defaults:
  prompt_format: raw
  sampling: {random_seed: 3, tokens_to_generate: 6}
  batch_size: 4
stages:
  - name: words
    recipe: {prompt_template: "Topic: {{ topic }}\\nWords:"}
    split: {parser: regex, pattern: '(\\S+)', into: word, max_items: 2}
  - name: facts
    from: words
    recipe: {prompt_template: "About {{ word }}:"}
  - name: notes
    from: facts
    recipe: {prompt_template: "Note on {{ word }}: {{ completion }}"}
"""
STAGES = ("words", "facts", "notes")


def job_record(job_id: str) -> dict[str, str]:
    """The finished job's line in the completion log (the local cluster has no accounting store)."""
    def read():
        out = run_command(["sacct", "--completion", "--parsable2", "-n", "-j", job_id, "-o", "JobID,State,Start,End"],
                          timeout=30, check=False).stdout
        lines = [line.split("|") for line in out.splitlines() if line.startswith(f"{job_id}|")]
        return dict(zip(("job_id", "state", "start", "end"), lines[-1])) if lines else None
    return poll_until(read, deadline=Deadline(60), interval=1.0, what=f"job {job_id}'s record in the completion log")


def at(slurm_time: str) -> float:
    return datetime.fromisoformat(slurm_time).timestamp()  # the controller's local time, as this host's


def test_three_stages_are_one_slurm_job_released_when_the_last_stage_is_done(slurm_cluster, prefect_harness, workdir,
                                                                            monkeypatch):
    from flows.pipeline import pipeline

    for name, value in slurm_test_env(workdir, free_port(span=8)).items():
        monkeypatch.setenv(name, value)
    (workdir / "topics.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "topic": f"topic {i}"}) + "\n"
                                                  for i in range(4)))
    (workdir / "pipeline.yaml").write_text(PIPELINE)
    seen: set[str] = set()  # every job of this run squeue listed while the pipeline ran
    stop = threading.Event()

    def watch():
        while not stop.wait(0.5):
            seen.update(j.job_id for j in our_jobs("slurm-pipe"))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        pipeline("pipeline.yaml", run_id="slurm-pipe", output_uri=str(workdir / "out"))
    finally:
        stop.set()
        watcher.join(10)
    run_dir = workdir / "out" / "slurm-pipe"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [s["stage"] for s in manifest["stages"]] == list(STAGES) and manifest["server_launches"] == 1
    stage_manifests = [json.loads((run_dir / "stages" / s / "manifest.json").read_text()) for s in STAGES]
    # Every stage generated rows, all on the same one job; squeue never listed another, none is left.
    assert all(m["records_written"] > 0 for m in stage_manifests)
    [job_id] = {j for m in stage_manifests for j in m["slurm_job_ids"]}
    assert seen == {job_id} and not our_jobs("slurm-pipe")
    assert len(list((workdir / "jobs" / "slurm-pipe").iterdir())) == 1  # one job directory: one sbatch
    # The job held the GPUs from before the first stage's first shard to after the last one's, and
    # was cancelled (released) before the pipeline's manifest was written: not left for a time limit.
    parts = [p for m in stage_manifests for p in m["parts"]]
    record = job_record(job_id)
    assert record["state"].startswith("CANCELLED"), record
    first_request, last_reply = min(p["started_at"] for p in parts), max(p["finished_at"] for p in parts)
    assert at(record["start"]) <= first_request and at(record["end"]) + 1 >= last_reply, (record, first_request, last_reply)
    assert at(record["end"]) <= (run_dir / "manifest.json").stat().st_mtime + 1, record  # Slurm's times are whole seconds


def test_one_replica_lost_while_stage_2_is_in_flight_loses_nothing(slurm_cluster, prefect_harness, workdir, monkeypatch):
    """replicas=2; one replica's job is cancelled from outside (scancel) while facts, the second stage, has
    shards published and more to do: its shards go back to the queue, the pipeline finishes, and every
    stage generated each of its records exactly once (its parent's rows.jsonl, one row per record)."""
    from flows.pipeline import pipeline

    for name, value in slurm_test_env(workdir, free_port(span=8)).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NSDG_SERVER__COMMAND", json.dumps(simulated_server_command("--extra-latency", "0.5")))
    (workdir / "topics.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "topic": f"topic {i}"}) + "\n"
                                                  for i in range(16)))
    (workdir / "pipeline.yaml").write_text(PIPELINE)
    run_dir, jobs = workdir / "out" / "slurm-lose", workdir / "jobs" / "slurm-lose"
    cancelled: list[tuple[str, int]] = []  # the job, and facts' parts published when it was cancelled

    def serving_job() -> str | None:
        # A job whose server answered the probe and a real batch: one still starting would test a
        # replica that never served instead.
        for err in jobs.glob("*/*.err"):
            if err.read_text(errors="replace").count('"PUT /generate HTTP/1.1" 200') >= 2:
                return err.stem.rsplit("-", 1)[-1]
        return None

    def cancel_one():
        facts = run_dir / "stages" / "facts"
        poll_until(lambda: True if list(facts.glob("part-*.state.json")) else None, deadline=Deadline(180),
                   interval=0.2, what="facts' first published part")
        job_id = poll_until(serving_job, deadline=Deadline(60), interval=0.1, what="a job serving batches")
        published = len(list(facts.glob("part-*.state.json")))
        SlurmClient().cancel(job_id)
        cancelled.append((job_id, published))

    killer = threading.Thread(target=cancel_one, daemon=True)
    killer.start()
    pipeline("pipeline.yaml", run_id="slurm-lose", output_uri=str(workdir / "out"), replicas=2, shard_size=2)
    killer.join(timeout=10)
    [(job_id, published)] = cancelled
    manifest = json.loads((run_dir / "manifest.json").read_text())
    parent = [json.loads(line)["id"] for line in (workdir / "topics.jsonl").read_text().splitlines()]
    for stage in STAGES:
        d = run_dir / "stages" / stage
        m = json.loads((d / "manifest.json").read_text())
        ids = [json.loads(line)["id"] for p in m["parts"] for line in (d / p["name"]).read_text().splitlines()]
        assert Counter(ids) == Counter({i: 1 for i in parent}), stage  # each record once: none lost, none twice
        if stage == "facts":
            assert 0 < published < len(m["parts"])  # the replica was lost with stage 2 in flight
        parent = [json.loads(line)["id"] for line in (d / "rows.jsonl").read_text().splitlines()]
    assert manifest["stages"][-1]["rows"] == len(parent) > 0
    used = {j for s in STAGES for j in json.loads((run_dir / "stages" / s / "manifest.json").read_text())["slurm_job_ids"]}
    assert job_id in used and len(used) >= 2 and not our_jobs("slurm-lose")
    # The card's GPU-hours are the run's allocation, once (each stage's manifest lists the same replicas).
    assert manifest["allocation"]["gpu_hours"] > 0
    card = (run_dir / "README.md").read_text()
    assert f"GPU-hours held by the run's servers: {round(manifest['allocation']['gpu_hours'], 3):g}." in card
