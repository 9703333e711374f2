"""`nemotron-sdg run --pipeline` with a reward stage, through the CLI: a generating stage on the local
simulated server, then a reward stage scored by a real PyTriton server with NeMo-Aligner's contract
(tests/reward_standin.py): every row scored once, the kept rows carry the attributes, the pipeline's
training set is the reward stage's kept rows; a rerun with a new threshold needs no reward server."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

from benchmarks.faults import local_env
from infra.reward.client import PROBE_TEXT
from infra.reward.conversation import format_conversation
from infra.reward.scores import HELPSTEER2
from tests.reward_standin import rewards_of
from tests.test_pipeline_flow import jsonl, run_cli

pytestmark = pytest.mark.integration

PIPELINE = """\
input: topics.jsonl
servers:
  main: {profile: local}
  rm: {engine: nemo-aligner, url: "URL"}
defaults:
  prompt_format: raw
  sampling: {temperature: 0.8, random_seed: 5, tokens_to_generate: 8}
  batch_size: 4
  filters: {drop_truncated: false}
stages:
  - name: answers
    recipe: {prompt_template: "Answer about {{ topic }}:", samples_per_prompt: 2}
  - name: rm
    from: answers
    kind: reward
    reward: {weights: {helpfulness: 0.3, correctness: 0.74, coherence: 0.46, complexity: 0.47, verbosity: -0.33},
             keep_if: {helpfulness: MIN}, batch_size: 3}
"""


def test_a_reward_stage_scores_every_row_once_and_a_new_threshold_needs_no_server(prefect_server, workdir, reward_server):
    (workdir / "topics.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "topic": f"topic {i}"}) + "\n"
                                                  for i in range(5)))
    env = {**os.environ, **local_env(workdir), **prefect_server.client_env(), "PREFECT_HOME": str(workdir / "prefect")}
    flags = ["--pipeline", "pipeline.yaml", "--run-id", "p1", "--output-uri", str(workdir / "out")]
    (workdir / "pipeline.yaml").write_text(PIPELINE.replace("URL", reward_server.url).replace("MIN", "2.0"))
    done = run_cli(workdir, env, *flags)
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = workdir / "out" / "p1"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    answers = jsonl(run_dir / "stages" / "answers" / "rows.jsonl")
    assert len(answers) == 10
    sent = [format_conversation([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}], "")
            for r in answers]
    assert Counter(t for t in reward_server.scored() if t != PROBE_TEXT) == Counter(sent)  # each row once
    rm = manifest["stages"][1]
    assert rm["kind"] == "reward" and rm["reward"]["parts_scored"] >= 1 and rm["reward"]["server_restarts"] == 0
    kept = [r for p in sorted((run_dir / "stages" / "rm").glob("kept-*.jsonl")) for r in jsonl(p)]
    expect = {r["id"]: dict(zip(HELPSTEER2, rewards_of(t)[4:9])) for r, t in zip(answers, sent)}
    assert {r["id"] for r in kept} == {i for i, e in expect.items() if e["helpfulness"] >= 2.0}
    for row in kept:
        assert row["reward"]["helpfulness"] == pytest.approx(expect[row["id"]]["helpfulness"], abs=1e-5)
        assert "reward" in row["reward"] and row["completion"]  # the scalar, and the row as generated
    assert manifest["training_set"] == rm["kept_parts"] and rm["kept"] == len(kept)
    filtered = jsonl(run_dir / "stages" / "rm" / "filtered.jsonl")
    assert {f["filter"] for f in filtered} == {"reward_min_helpfulness"} and len(filtered) == 10 - len(kept)
    assert all(f["value"] < 2.0 and f["limit"] == 2.0 for f in filtered)
    card = (run_dir / "README.md").read_text()  # the card names the scorer, its server and its scalar's weights
    assert (f"stage `rm`: scored by reward model `reward_model` (nemo-aligner server `rm` at `{reward_server.url}`), scalar "
            "`reward.reward` = 0.3 × helpfulness + 0.74 × correctness + 0.46 × coherence + 0.47 × complexity - 0.33 × "
            "verbosity") in card

    # A stricter threshold: the reward server is gone, the stage re-filters from its checkpointed replies.
    reward_server.stop()
    (workdir / "pipeline.yaml").write_text(PIPELINE.replace("URL", reward_server.url).replace("MIN", "3.0"))
    again = run_cli(workdir, env, *flags)  # the same run: answers are all published, nothing generated
    assert again.returncode == 0, again.stderr[-4000:]
    rm2 = json.loads((run_dir / "manifest.json").read_text())["stages"][1]
    assert rm2["reward"]["parts_scored"] == 0 and rm2["kept"] == sum(1 for e in expect.values() if e["helpfulness"] >= 3.0)
