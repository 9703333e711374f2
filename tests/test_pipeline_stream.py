"""`run --pipeline` streams its stages through one server, on the local simulated server through the CLI:
a child's shard is generated while its parent stage still has shards to generate, and each stage's
counts and share of the allocation are in the manifest."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks.faults import local_env, local_servers
from tests.test_pipeline_flow import PIPELINE, STAGES, run_cli

pytestmark = pytest.mark.integration
TOPICS = 16
SHARD = 2  # 8 shards of words: its children's shards come while its later shards are still to do (3 shard tasks at once)


def setup(workdir, prefect_server) -> tuple[dict, list[str]]:
    (workdir / "topics.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "topic": f"topic {i}"}) + "\n"
                                                  for i in range(TOPICS)))
    # facts dedups across its shards: a kill between its shards must not change which duplicate is kept
    (workdir / "pipeline.yaml").write_text(PIPELINE)
    env = {**os.environ, **local_env(workdir, "--extra-latency", "0.05"), **prefect_server.client_env(),
           "PREFECT_HOME": str(workdir / "prefect")}
    return env, ["--pipeline", "pipeline.yaml", "--output-uri", str(workdir / "out"), "--shard-size", str(SHARD)]


def parts(run_dir, stage: str) -> list[dict]:
    return json.loads((run_dir / "stages" / stage / "manifest.json").read_text())["parts"]


def test_a_child_shard_runs_before_its_parent_stage_ends_and_the_manifest_splits_the_allocation(prefect_server, workdir):
    env, flags = setup(workdir, prefect_server)
    done = run_cli(workdir, env, *flags, "--run-id", "s1")
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = workdir / "out" / "s1"
    words, facts, notes = (parts(run_dir, s) for s in STAGES)
    assert len(words) == TOPICS // SHARD
    # Streaming: facts' first shard and notes' first shard were handed out before words' last shard was
    # (deepest first; not sequential stages). Order of events, not speed: the pool hands one shard at a time.
    assert min(p["started_at"] for p in facts) < max(p["started_at"] for p in words)
    assert min(p["started_at"] for p in notes) < max(p["started_at"] for p in words)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["server_launches"] == 1
    alloc, stages = manifest["allocation"], {s["stage"]: s for s in manifest["stages"]}
    assert alloc["held_s"] > 0 and sum(s["held_s"] for s in stages.values()) == pytest.approx(alloc["held_s"], abs=0.01)
    assert sum(s["busy_s"] for s in stages.values()) == pytest.approx(alloc["busy_s"], abs=0.01)
    for name, s in stages.items():
        assert s["busy_s"] > 0 and s["generated_tokens"] > 0 and s["seconds"] > 0, (name, s)
        assert s["gpu_hours"] == 0  # the local profile holds no GPUs
    assert stages["facts"]["kept"] + sum(stages["facts"]["filtered"].values()) == stages["facts"]["rows_out"]
    assert local_servers(workdir) == 0
