"""Preference pairs on crafted scores (infra/recipes/pairs.py): each strategy, margins, min_chosen,
ties, unscored rows, prompts keyed by derived ids; properties checked by hypothesis over random
score tables."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings as hsettings, strategies as st
from pydantic import ValidationError

from infra.recipes.lineage import child_id
from infra.recipes.pairs import PairParams, make_pairs, pair_row, prompt_key, score_of


def rows_for(scores: dict[str, list[float | None]], field: str = "judge") -> list[dict]:
    """A stage's part rows: each prompt's samples share its id; the score under `field.score`."""
    return [{"id": pid, "sample": s, "prompt": f"q {pid}", "completion": f"a {pid} {s}",
             **({field: {"score": v}} if v is not None else {})}
            for pid, vals in scores.items() for s, v in enumerate(vals)]


def picked(scores, **kw) -> list[tuple[str, int, int]]:
    got = make_pairs(rows_for(scores), PairParams(score="judge.score", **kw))
    return [(p.prompt_id, p.chosen["sample"], p.rejected["sample"]) for p in got.pairs]


def test_best_vs_worst_one_pair_per_prompt():
    assert picked({"a": [3, 5, 1, 4], "b": [2, 2.5]}) == [("a", 1, 2), ("b", 1, 0)]


def test_ties_never_pair_and_are_broken_by_sample():
    got = make_pairs(rows_for({"t": [4, 4, 4], "u": [5, 1, 5, 1]}), PairParams(score="judge.score"))
    assert got.dropped == {"pairs_tie": 1}
    # two best at 5 (samples 0, 2) and two worst at 1 (1, 3): the lowest sample of each
    assert [(p.chosen["sample"], p.rejected["sample"]) for p in got.pairs] == [(0, 1)]
    assert picked({"u": [5, 1, 5, 1]}, strategy="all_pairs") == [("u", 0, 1), ("u", 0, 3), ("u", 2, 1), ("u", 2, 3)]


def test_min_margin_and_min_chosen():
    assert picked({"a": [3, 2.5]}, min_margin=0.5) == [("a", 0, 1)]  # exactly the margin pairs
    assert picked({"a": [3, 2.6]}, min_margin=0.5) == []
    got = make_pairs(rows_for({"a": [3, 2.6], "b": [2, 0], "c": [1]}),
                     PairParams(score="judge.score", min_margin=0.5, min_chosen=2.5))
    assert (got.pairs, got.prompts) == ([], 3)
    assert got.dropped == {"pairs_margin": 1, "pairs_low_chosen": 1, "pairs_single": 1}
    # all_pairs: every chosen row must reach min_chosen, not only the best
    assert picked({"a": [5, 3, 1]}, strategy="all_pairs", min_chosen=4) == [("a", 0, 1), ("a", 0, 2)]
    assert picked({"a": [5, 3, 1]}, strategy="all_pairs", min_margin=2.5) == [("a", 0, 2)]


def test_unscored_rows_are_counted_and_left_out():
    for bad in (None, "4", True, float("nan"), float("inf")):
        rows = rows_for({"a": [3, 1]}) + [{"id": "a", "sample": 2, "judge": {"score": bad}}]
        got = make_pairs(rows, PairParams(score="judge.score"))
        assert [(p.chosen["sample"], p.rejected["sample"]) for p in got.pairs] == [(0, 1)]
        assert got.dropped == {"pairs_unscored": 1}


def test_best_vs_random_is_seeded_per_prompt():
    scores = {f"p{i}": [9, 1, 2, 3, 4, 5] for i in range(30)}
    one = picked(scores, strategy="best_vs_random", seed=1)
    assert one == picked(scores, strategy="best_vs_random", seed=1)
    assert one != picked(scores, strategy="best_vs_random", seed=2)
    assert {c for _, c, _ in one} == {0} and len({r for _, _, r in one}) > 1
    # a prompt's draw does not depend on which other prompts are there
    assert picked({"p7": scores["p7"]}, strategy="best_vs_random", seed=1) == [x for x in one if x[0] == "p7"]
    # only rows at least the margin below the best are drawn
    assert {r for _, _, r in picked(scores, strategy="best_vs_random", min_margin=6)} <= {1, 2, 3}


def test_reward_attribute_and_derived_ids():
    """Rows a later stage scored carry derived ids: the prompt is the record the samples answered."""
    rows = [{"id": child_id("q1", s, "answers"), "reward": {"helpfulness": h}, "prompt": "q", "completion": str(s)}
            for s, h in enumerate([2.0, 3.5, 1.0])]
    assert prompt_key(rows[1], "answers") == ("q1", (1, 0, 0))
    assert prompt_key(rows[1]) == (rows[1]["id"], (0,))  # without the stage: each row its own prompt
    got = make_pairs(rows, PairParams(score="reward.helpfulness"), samples_stage="answers")
    assert [(p.prompt_id, p.chosen_score, p.rejected_score) for p in got.pairs] == [("q1", 3.5, 1.0)]
    row = pair_row(got.pairs[0], PairParams(score="reward.helpfulness"))
    assert row["id"] == "q1/pair.1_0_0-2_0_0" and (row["chosen"], row["rejected"], row["margin"]) == ("1", "2", 2.5)


def test_score_paths_and_params_refused():
    assert score_of({"reward": {"scalar": 2}}, "reward.scalar") == 2.0
    assert score_of({"reward": 2}, "reward.scalar") is None
    for bad in ({"score": "judge..score"}, {"score": "x", "strategy": "best"}, {"score": "x", "min_margin": -1},
                {"score": "x", "unknown": 1}, {"score": "x", "min_margin": float("nan")}):
        with pytest.raises(ValidationError):
            PairParams(**bad)


score_tables = st.dictionaries(st.text("abc", min_size=1, max_size=3),
                               st.lists(st.one_of(st.none(), st.integers(0, 4).map(float)), min_size=1, max_size=6),
                               max_size=6)


@hsettings(max_examples=150, deadline=None)
@given(score_tables, st.sampled_from(["best_vs_worst", "best_vs_random", "all_pairs"]),
       st.sampled_from([0.0, 1.0, 2.5]), st.sampled_from([None, 2.0]), st.integers(0, 3))
def test_pairs_properties(scores, strategy, margin, min_chosen, seed):
    params = PairParams(score="judge.score", strategy=strategy, min_margin=margin, min_chosen=min_chosen, seed=seed)
    rows = rows_for(scores)
    got = make_pairs(rows, params)
    again = make_pairs(list(rows), params)
    assert [(p.chosen, p.rejected) for p in got.pairs] == [(p.chosen, p.rejected) for p in again.pairs]
    for p in got.pairs:
        assert p.chosen["id"] == p.rejected["id"] == p.prompt_id  # both answer one prompt
        assert p.chosen_score > p.rejected_score and p.chosen_score - p.rejected_score >= margin
        assert min_chosen is None or p.chosen_score >= min_chosen
    per_prompt = {pid: [p for p in got.pairs if p.prompt_id == pid] for pid in scores}
    for pid, vals in scores.items():
        scored = [v for v in vals if v is not None]
        mine = per_prompt[pid]
        if strategy != "all_pairs":
            assert len(mine) <= 1
            if mine:  # the best, lowest sample among equals
                assert mine[0].chosen["sample"] == vals.index(max(scored))
        if strategy == "best_vs_worst" and mine:
            assert mine[0].rejected["sample"] == vals.index(min(scored))
        if strategy == "all_pairs":
            want = {(i, j) for i, j in itertools.permutations(range(len(vals)), 2)
                    if vals[i] is not None and vals[j] is not None and vals[i] > vals[j]
                    and vals[i] - vals[j] >= margin and (min_chosen is None or vals[i] >= min_chosen)}
            assert {(p.chosen["sample"], p.rejected["sample"]) for p in mine} == want
    # every prompt gives pairs or exactly one reason; unscored rows are counted one by one
    no_pairs = sum(1 for pid in scores if not per_prompt[pid])
    assert sum(v for k, v in got.dropped.items() if k != "pairs_unscored") == no_pairs
    assert got.dropped["pairs_unscored"] == sum(v is None for vals in scores.values() for v in vals)
    assert got.prompts == len(scores)
