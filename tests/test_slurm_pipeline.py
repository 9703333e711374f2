"""A pipeline on the real local Slurm cluster (issue 24): three stages are ONE Slurm job, held from
before the first request to after the last, and released as soon as the last stage is done (before
the pipeline's manifest is written). Seen from Slurm itself: squeue sampled through the run, and the
job's record in the completion log (sacct --completion: its start and end)."""

from __future__ import annotations

import json
import threading
from datetime import datetime

import pytest

from infra.deadline import Deadline, poll_until
from infra.system.commands import run_command
from tests.fixtures_slurm import slurm_test_env
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
