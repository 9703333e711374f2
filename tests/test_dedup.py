"""Dedup asked a shard at a time (`Dedup.check_rows`, one lookup per shard instead of one per row)
decides what asking row by row decides: the same rows dropped, each naming the same first row."""

from __future__ import annotations

import random

import pytest

from infra.recipes.dedup import LOOKUP_CHUNK, Dedup
from infra.recipes.params import FilterParams

WORDS = "the sea is deep and blue while ships sail over it at night under many stars".split()


def rows(n: int, seed: int) -> list[dict]:
    rnd, out = random.Random(seed), []
    for i in range(n):
        if out and rnd.random() < 0.3:  # an exact repeat of an earlier completion, with other case and spacing
            text = "  " + rnd.choice(out)["completion"].upper()
        elif out and rnd.random() < 0.3:  # a one-word edit of an earlier one: near, not exact
            words = rnd.choice(out)["completion"].split()
            words[rnd.randrange(len(words))] = "whale"
            text = " ".join(words)
        else:
            text = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(8, 30)))
        out.append({"id": f"r{i // 2}", "sample": i % 2, "completion": text})
    return out


@pytest.mark.parametrize("near", [True, False], ids=["exact-and-near", "exact-only"])  # exact alone has a loop of its own
def test_a_shard_at_a_time_decides_what_row_by_row_decides(near):
    params = FilterParams(dedup_exact=True, dedup_near=near)
    data = rows(2 * LOOKUP_CHUNK + 300, seed=7)  # a shard larger than one query's keys
    with Dedup(params) as one_by_one:
        expected = [one_by_one.check(row) for row in data]
    with Dedup(params) as by_shard:
        cut = [0, 5, 6, 700, len(data)]  # shards of several sizes, one of a single row
        got = [v for a, b in zip(cut, cut[1:]) for v in by_shard.check_rows(data[a:b])]
    assert got == expected
    kinds = {v.filter for v in expected if v is not None}
    assert kinds == ({"exact_duplicate", "near_duplicate"} if near else {"exact_duplicate"})  # each kind was exercised


def test_exact_only_and_a_row_repeating_one_of_its_own_shard():
    with Dedup(FilterParams(dedup_exact=True)) as dedup:
        first = dedup.check_rows([{"id": "a", "completion": "Same text"}, {"id": "b", "completion": "same  TEXT"}])
        later = dedup.check_rows([{"id": "c", "completion": "same text"}, {"id": "d", "completion": "other"}])
    assert [v and (v.filter, v.value) for v in first + later] == \
           [None, ("exact_duplicate", "a#0"), ("exact_duplicate", "a#0"), None]
