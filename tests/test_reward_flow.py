"""`nemotron-sdg run --pipeline` with a reward stage, through the CLI: a generating stage on the local
simulated server, then a reward stage scored by a real PyTriton server with NeMo-Aligner's contract
(tests/reward_standin.py): every row scored once, the kept rows carry the attributes, the pipeline's
training set is the reward stage's kept rows; a rerun with a new threshold needs no reward server."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from infra.reward.client import PROBE_TEXT
from infra.reward.scores import HELPSTEER2
from tests.reward_pipeline_cli import RewardPipeline, pipeline_file, sent
from tests.reward_standin import rewards_of
from tests.test_pipeline_flow import jsonl

pytestmark = pytest.mark.integration

PIPELINE = pipeline_file(8, """\
  filters: {drop_truncated: false}
stages:
  - name: answers
    recipe: {prompt_template: "Answer about {{ topic }}:", samples_per_prompt: 2}
  - name: rm
    from: answers
    kind: reward
    reward: {weights: {helpfulness: 0.3, correctness: 0.74, coherence: 0.46, complexity: 0.47, verbosity: -0.33},
             keep_if: {helpfulness: MIN}, batch_size: 3}
""")


def test_a_reward_stage_scores_every_row_once_and_a_new_threshold_needs_no_server(prefect_server, workdir, reward_server):
    pipe = RewardPipeline(prefect_server, workdir, reward_server, topics=5)
    done = pipe.run(PIPELINE.replace("MIN", "2.0"), "p1")
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = workdir / "out" / "p1"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    answers = jsonl(run_dir / "stages" / "answers" / "rows.jsonl")
    assert len(answers) == 10
    sent_ = [sent(r) for r in answers]
    assert Counter(t for t in reward_server.scored() if t != PROBE_TEXT) == Counter(sent_)  # each row once
    rm = manifest["stages"][1]
    assert rm["kind"] == "reward" and rm["reward"]["parts_scored"] >= 1 and rm["reward"]["server_restarts"] == 0
    kept = [r for p in sorted((run_dir / "stages" / "rm").glob("kept-*.jsonl")) for r in jsonl(p)]
    expect = {r["id"]: dict(zip(HELPSTEER2, rewards_of(t)[4:9])) for r, t in zip(answers, sent_)}
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
    again = pipe.run(PIPELINE.replace("MIN", "3.0"), "p1")  # the same run: answers are all published, nothing generated
    assert again.returncode == 0, again.stderr[-4000:]
    rm2 = json.loads((run_dir / "manifest.json").read_text())["stages"][1]
    assert rm2["reward"]["parts_scored"] == 0 and rm2["kept"] == sum(1 for e in expect.values() if e["helpfulness"] >= 3.0)
