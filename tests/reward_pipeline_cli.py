"""A pipeline file run through the CLI (`nemotron-sdg run --pipeline`) with a generating stage on the
local simulated server and a reward stage scored by the real PyTriton stand-in (tests/reward_standin.py):
the setup tests/test_reward_flow.py and tests/test_pipeline_invalidate_scored.py share."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from benchmarks.faults import local_env
from infra.reward.conversation import format_conversation
from tests.test_pipeline_flow import run_cli

# The servers and defaults every such file shares; the stages (and more defaults) are the test's.
HEAD = """\
input: topics.jsonl
servers:
  main: {profile: local}
  rm: {engine: nemo-aligner, url: "URL"}
defaults:
  prompt_format: raw
  sampling: {temperature: 0.8, random_seed: 5, tokens_to_generate: TOKENS}
  batch_size: 4
"""


def pipeline_file(tokens: int, rest: str) -> str:
    """HEAD generating `tokens` a completion, then `rest` (more defaults, `stages:`); "URL" stays for the server's."""
    return HEAD.replace("TOKENS", str(tokens)) + rest


def sent(row: dict) -> str:
    """What the reward server is sent for a generated row: its prompt and completion as one conversation."""
    return format_conversation([{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}], "")


class RewardPipeline:
    """A workdir holding `topics` topics (topics.jsonl), the CLI's environment (the local simulated
    server, the test's Prefect server) and the reward stand-in (`url`, `scored`: what it was sent)."""

    def __init__(self, prefect_server, workdir: Path, reward_server, topics: int):
        (workdir / "topics.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "topic": f"topic {i}"}) + "\n"
                                                      for i in range(topics)))
        self.workdir, self.server = workdir, reward_server
        self.url, self.scored = reward_server.url, reward_server.scored
        self.env = {**os.environ, **local_env(workdir), **prefect_server.client_env(), "PREFECT_HOME": str(workdir / "prefect")}

    def run(self, text: str, run_id: str, *flags: str) -> subprocess.CompletedProcess:
        """`text` (a pipeline file, "URL" for the reward server's) as pipeline.yaml, run under `run_id`."""
        (self.workdir / "pipeline.yaml").write_text(text.replace("URL", self.url))
        return run_cli(self.workdir, self.env, "--pipeline", "pipeline.yaml", "--run-id", run_id,
                       "--output-uri", str(self.workdir / "out"), *flags)

    def stage(self, run_id: str, name: str) -> Path:
        return self.workdir / "out" / run_id / "stages" / name
