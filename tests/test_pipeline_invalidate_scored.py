"""A reward stage and a pairs stage rerun under the same run_id after their parent changed (issue 24:
a user pays only for what a change invalidates): the CLI in subprocesses, the generator the local
simulated server, the reward server the real PyTriton stand-in (tests/fixtures_reward.py), whose log of
every sentence it scored says what was asked.

- a new filter on the generating stage: the reward stage scores only the rows it had never scored (the
  rows of newly kept answers), and its kept rows and the pairs are those a fresh run of the new file
  makes: none lost, none duplicated, none of a dropped answer left."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from infra.pipeline.rows import kept_part_names
from infra.reward.client import PROBE_TEXT
from tests.reward_pipeline_cli import RewardPipeline, pipeline_file, sent
from tests.reward_standin import rewards_of
from tests.test_pipeline_flow import jsonl

pytestmark = pytest.mark.integration

PIPELINE = pipeline_file(6, """\
stages:
  - name: answers
    recipe: {prompt_template: "Answer about {{ topic }}:", samples_per_prompt: 3}
    filters: {must_not_match: [FILTER]}
  - name: rm
    from: answers
    kind: reward
    reward: {keep_if: {helpfulness: 0.8}, batch_size: 4}
  - name: prefs
    kind: pairs
    from: rm
    pairs: {score: reward.helpfulness}
""")
TOPICS = 8
FIRST, SECOND = '"\\\\buseful\\\\b"', '"\\\\bmodel\\\\b"'  # each drops some answers (the simulated server's words)


class Run(RewardPipeline):
    def __call__(self, run_id: str, filter_: str = FIRST, template: str = "Answer about") -> list[str]:
        """Run the file under `run_id`; the sentences the reward server scored in this run."""
        seen = len(self.scored())
        done = self.run(PIPELINE.replace("FILTER", filter_).replace("Answer about", template), run_id, "--shard-size", "4")
        assert done.returncode == 0, done.stderr[-4000:]
        return [t for t in self.scored()[seen:] if t != PROBE_TEXT]

    def rm_rows(self, run_id: str) -> tuple[list[dict], list[dict]]:
        """The reward stage's rows and its kept rows (its manifest's parts and kept parts)."""
        d = self.stage(run_id, "rm")
        manifest = json.loads((d / "manifest.json").read_text())
        return ([r for p in manifest["parts"] for r in jsonl(d / p["name"])],
                [r for n in kept_part_names(manifest) for r in jsonl(d / n)])

    def pairs(self, run_id: str) -> list[tuple]:
        return [(p["prompt_id"], p["chosen"], p["rejected"], p["chosen_score"], p["rejected_score"])
                for p in jsonl(self.stage(run_id, "prefs") / "pairs.jsonl")]


@pytest.fixture
def run(prefect_server, workdir, reward_server):
    return Run(prefect_server, workdir, reward_server, TOPICS)


def check_scored(run: Run, run_id: str) -> None:
    """The reward stage's rows are its parent's rows.jsonl, each with its own scores; kept: those at the threshold."""
    answers = jsonl(run.stage(run_id, "answers") / "rows.jsonl")
    rows, kept = run.rm_rows(run_id)
    assert [(r["id"], r["completion"]) for r in rows] == [(r["id"], r["completion"]) for r in answers]
    assert [r["id"] for r in kept] == [r["id"] for r in answers if rewards_of(sent(r))[4] >= 0.8]
    for row in kept:
        assert row["reward"]["helpfulness"] == pytest.approx(rewards_of(sent(row))[4], abs=1e-5)


def test_a_reward_and_pairs_stage_rerun_after_their_parent_changed_scores_only_new_rows_and_match_a_fresh_run(run):
    first = run("p1")
    check_scored(run, "p1")
    answers1 = jsonl(run.stage("p1", "answers") / "rows.jsonl")
    assert Counter(first) == Counter(sent(r) for r in answers1)  # each row scored once
    pairs1 = run.pairs("p1")
    assert pairs1

    # Another filter on answers: answers is curated again, rm reads its new rows, prefs pairs them again.
    second = run("p1", SECOND)
    answers2 = jsonl(run.stage("p1", "answers") / "rows.jsonl")
    new = {sent(r) for r in answers2} - {sent(r) for r in answers1}
    assert new and {r["id"] for r in answers1} - {r["id"] for r in answers2}  # some rows newly kept, some dropped
    assert Counter(second) == Counter(new)  # only the rows it never scored
    check_scored(run, "p1")
    fresh = run("fresh", SECOND)  # the new file from scratch: the same rows kept, the same pairs
    assert run.rm_rows("p1") == run.rm_rows("fresh") and run.pairs("p1") == run.pairs("fresh")
    assert Counter(fresh) == Counter(sent(r) for r in answers2)

