"""The worked example with a reward stage (examples/pipeline/pipeline-reward.yaml, `make
pipeline-reward`, tools/pipeline-reward.sh): the file passes `check --pipeline`; the script starts the
PyTriton stand-in as the reward server, runs a pipeline to its SFT and DPO files and a card naming the
reward model, and stops the stand-in (no Triton process left). The script runs here on a small
pipeline on the simulated server; the example itself on the real model is `make pipeline-reward`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from benchmarks.faults import local_env
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[1]
SMALL = """\
input: topics.jsonl
servers:
  main: {profile: local}
  rm: {engine: nemo-aligner, url: "http://127.0.0.1:PORT"}
exports: {user_field: topic}
defaults:
  prompt_format: raw
  sampling: {temperature: 0.9, random_seed: 3, tokens_to_generate: 6}
stages:
  - name: answers
    recipe: {prompt_template: "Tell me about {{ topic }}:", samples_per_prompt: 2}
  - name: rm
    kind: reward
    from: answers
    reward: {weights: {helpfulness: 0.3, correctness: 0.74, coherence: 0.46, complexity: 0.47, verbosity: -0.33},
             keep_if: {correctness: 1.0}}
  - name: prefs
    kind: pairs
    from: rm
    pairs: {score: reward.reward}
"""


def test_the_reward_example_passes_check_and_make_runs_the_script(workdir):
    env = {**os.environ, **local_env(workdir)}
    ok = subprocess.run([sys.executable, "-m", "flows.cli", "check", "--pipeline",
                         str(REPO / "examples/pipeline/pipeline-reward.yaml")], cwd=workdir, env=env, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "rm" in ok.stdout and "pairs best_vs_worst by reward.reward" in ok.stdout
    make = subprocess.run(["make", "-n", "pipeline-reward", "VENV=/nonexistent", "STAMP="], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert "bash tools/pipeline-reward.sh" in make.stdout, make.stdout + make.stderr


def triton_processes(port: int) -> list[str]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "reward_standin.py" in cmd and str(port) in cmd:
            found.append(cmd)
    return found


@pytest.mark.integration
def test_the_script_serves_the_stand_in_runs_the_pipeline_and_stops_it(prefect_server, workdir, pytriton_env):
    port = free_port()
    (workdir / "topics.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "topic": f"topic {i}"}) + "\n" for i in range(3)))
    (workdir / "small.yaml").write_text(SMALL.replace("PORT", str(port)))
    env = {**os.environ, **local_env(workdir), **prefect_server.client_env(), "PREFECT_HOME": str(workdir / "prefect"),
           "PY": sys.executable, "NSDG": str(Path(sys.executable).parent / "nemotron-sdg"), "REWARD_PORT": str(port),
           "PIPELINE_FILE": str(workdir / "small.yaml"), "OUT": str(workdir / "out"), "RUN_ID": "ex"}
    done = subprocess.run(["bash", str(REPO / "tools/pipeline-reward.sh")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = workdir / "out" / "ex"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [s["stage"] for s in manifest["stages"]] == ["answers", "rm", "prefs"]
    exports = {e["config"]: e["rows"] for e in manifest["dataset"]["exports"]}
    # The SFT set is the reward stage's kept rows: the answers its keep_if dropped do not reach it.
    assert manifest["stages"][0]["kept"] == 6 > manifest["stages"][1]["kept"]
    assert exports["sft"] == manifest["stages"][1]["kept"]
    assert exports["dpo_nemo_aligner"] == manifest["stages"][2]["pairs"] > 0
    # exports.user_field: the user's turn is the row's topic, not the prompt the model was sent.
    topics = {f"topic {i}" for i in range(3)}
    sft = [json.loads(line) for line in (run_dir / "data" / "sft.jsonl").read_text().splitlines()]
    assert {r["messages"][0]["content"] for r in sft} <= topics and len(sft) == exports["sft"]
    dpo = [json.loads(line) for line in (run_dir / "data" / "dpo-trl.jsonl").read_text().splitlines()]
    assert dpo and {r["prompt"][0]["content"] for r in dpo} <= topics
    assert "scored by reward model `reward_model`" in (run_dir / "README.md").read_text()
    assert (workdir / "out" / "ex-reward-server" / "scored.jsonl").read_text().count("\n") >= 6
    assert triton_processes(port) == []
