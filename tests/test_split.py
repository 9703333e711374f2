"""A pipeline stage's split (one reply -> several rows) and the ids and lineage of its rows: pure
code, crafted and hostile replies, and hypothesis properties (never a crash; ids unique over a
1 -> 20 -> 20 fan-out and parsing back to their lineage). The stage's place in a run is a later slice."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st
from pydantic import ValidationError

from infra.errors import ConfigError
from infra.recipes.filters import Verdict
from infra.recipes.lineage import check_stage_name, child_fields, child_id, lineage_of, parse_child_id
from infra.recipes.split import MAX_SPLIT_CHARS, Split, SplitParams, split_reply, stage_rows
from tests.test_curation import BACKTRACKS, CATASTROPHIC

FAST = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def P(parser="numbered_list", into="item", **kw) -> SplitParams:
    return SplitParams(parser=parser, into=into, **kw)


def items(reply, **kw):
    got = split_reply(reply, P(**kw))
    return got.items if isinstance(got, Split) else got


@pytest.mark.parametrize("reply, kw, expected", [
    # a preamble and an epilogue are not items; "1)" and "(3)" number too; a wrapped line continues its item
    ("Here are three:\n1. Alpha\n2) Beta\n   wrapped on\n(3) Gamma\n\nI hope this helps!", {}, ["Alpha", "Beta wrapped on", "Gamma"]),
    # malformed numbering (repeated, skipped, "1.5" is no marker) still gives the items in order
    ("1. a\n1. b\n7. c\n1.5 million is no item", {}, ["a", "b", "c"]),
    # nested items (either kind of marker, deeper) stay inside their parent and make no row
    ("1. Physics\n   - mechanics\n     more on mechanics\n   2. optics\n2. Chemistry", {}, ["Physics", "Chemistry"]),
    ("- a\n  - a.1\n    * a.1.1\n* b\n+ c\n\u2022 d\n-no space: no item\n**bold** is no bullet", {"parser": "bulleted_list"}, ["a", "b", "c", "d"]),
    # a list indented as a whole: its own indentation is the top level
    ("    1. x\n    2. y\n        - y.1", {}, ["x", "y"]),
    ("  one  \n\n\t\ntwo\n", {"parser": "lines"}, ["one", "two"]),
    ("  one  \ntwo", {"parser": "lines", "strip": False}, ["  one  ", "two"]),
    # JSON: the first [...] of the reply, prose and fences around it ignored; blank strings and empty objects skipped
    ('Sure! ```json\n["a", " ", {"q": "b", "id": 3}, {}]\n``` Trailing text [1, 2]', {"parser": "json_list"}, ["a", {"q": "b", "id": 3}]),
    ('{"questions": ["x", "y"]}', {"parser": "json_list"}, ["x", "y"]),
    ("Q: first?\nA: no\nQ: second?", {"parser": "regex", "pattern": r"(?m)^Q: (.+)$"}, ["first?", "second?"]),
    # too many: the first max_items by default, the reply dropped with too_many=drop
    ("\n".join(f"{i}. t{i}" for i in range(1, 13)), {"max_items": 10}, [f"t{i}" for i in range(1, 11)]),
    ("\n".join(f"{i}. t{i}" for i in range(1, 13)), {"max_items": 10, "too_many": "drop"}, Verdict("split_too_many", 12, 10)),
    ("1. only one", {"min_items": 3}, Verdict("split_too_few", 1, 3)),
    ("", {}, Verdict("split_unparsed", "", "numbered_list")),
    (" \n\t\n ", {"parser": "lines"}, Verdict("split_unparsed", " \n\t\n ", "lines")),
    (None, {}, Verdict("split_unparsed", "no reply", "numbered_list")),
    ("a prose answer with no list", {}, Verdict("split_unparsed", "a prose answer with no list", "numbered_list")),
    ("no list here", {"parser": "json_list"}, Verdict("split_unparsed", "no JSON list ('[') in the reply", "json_list")),
    ('["a", "b"', {"parser": "json_list"}, Verdict("split_unparsed", "invalid JSON list: Expecting ',' delimiter at character 9", "json_list")),
    ('["a", 3]', {"parser": "json_list"}, Verdict("split_unparsed", "element 1 is int, not a string or an object", "json_list")),
    ("[" * 100_000, {"parser": "json_list"}, Verdict("split_unparsed", "invalid JSON list: nested too deep", "json_list")),
])
def test_crafted_replies_split_or_drop_under_their_reason(reply, kw, expected):
    assert items(reply, **kw) == expected


def test_a_truncated_reply_says_how_many_items_it_had():
    got = split_reply("\n".join(f"- {i}" for i in range(50)), P("bulleted_list", max_items=5))
    assert got == Split(["0", "1", "2", "3", "4"], 50)


def test_hostile_replies_are_dropped_without_being_parsed():
    huge = "[" + ", ".join(['"xxxxxxxxxx"'] * 5_000_000) + "]"  # 70 MB of a valid JSON list
    for parser in ("numbered_list", "bulleted_list", "lines", "json_list"):
        assert split_reply(huge, P(parser)) == Verdict(
            "split_unparsed", f"reply of {len(huge)} characters, over {MAX_SPLIT_CHARS}", parser)
    # just under the cap, a list of 90 000 items is read and cut to max_items
    big = json.dumps(["item"] * 90_000)
    assert len(big) < MAX_SPLIT_CHARS and split_reply(big, P("json_list", max_items=1000)).found == 90_000


def test_a_catastrophic_split_pattern_is_cut_off_naming_it():
    pattern = CATASTROPHIC.replace("(\\w|\\w\\w)+", "((?:\\w|\\w\\w)+)")
    with pytest.raises(ValidationError, match=r"split.pattern .* backtracks catastrophically"):
        P("regex", pattern=pattern)  # the settings check refuses it before any GPU is held
    # built past the check, the search's CPU-time bound still stops it
    params = SplitParams.model_construct(parser="regex", into="item", pattern=pattern)
    with pytest.raises(ConfigError, match=r"^split.pattern .* searched one text of 35 characters for more than 1 s.*Rewrite it .*same run_id\.$"):
        split_reply(BACKTRACKS, params)


@pytest.mark.parametrize("kw, message", [
    ({"parser": "regex"}, "needs split.pattern"),
    ({"parser": "regex", "pattern": r"Q: .*"}, "has 0 groups: it needs exactly one"),
    ({"parser": "regex", "pattern": r"(Q): (.*)"}, "has 2 groups"),
    ({"parser": "regex", "pattern": r"(unclosed"}, r"split.pattern '\(unclosed' is not a valid regex"),
    ({"pattern": r"(x)"}, "only read by the regex parser"),
    ({"into": "completion"}, "must be a field name"),
    ({"into": "has space"}, "must be a field name"),
    ({"min_items": 5, "max_items": 2}, "min_items 5 is above split.max_items 2"),
    ({"parser": "csv"}, "numbered_list"),
    ({"max_items": 10_000}, "less than or equal to 1000"),
])
def test_bad_split_parameters_are_refused_naming_the_field(kw, message):
    with pytest.raises(ValidationError, match=message):
        SplitParams(**{"parser": "numbered_list", "into": "item", **kw})


ROW = {"id": "t1", "sample": 1, "prompt": "List subtopics of volcanoes", "completion": "1. lava\n2. ash",
       "generation": {"finish_reason": "stop"}, "topic": "volcanoes", "subtopic": "an input field"}


def test_stage_rows_carry_their_item_derived_id_lineage_and_the_records_fields():
    rows = stage_rows(ROW, "subtopics", P(into="subtopic"))
    assert [r["id"] for r in rows] == ["t1.1/subtopics.0", "t1.1/subtopics.1"]
    first = rows[0]
    assert first["completion"] == "lava" and first["subtopic"] == "lava"  # filters and dedup see the item
    assert first["topic"] == "volcanoes" and first["parent"] == {"subtopic": "an input field"}  # a clash moves the parent's
    assert first["lineage"] == ["t1"] and first["sample"] == 1 and first["prompt"] == ROW["prompt"]
    assert first["split"] == {"item": 0, "items": 2, "found": 2}
    # JSON objects: their fields become the row's; a field the row owns keeps an item_ prefix
    objs = stage_rows({**ROW, "completion": '[{"question": "Why?", "id": 7, "completion": "x"}]'}, "questions",
                      P("json_list", into="question"))
    assert objs[0]["question"] == "Why?" and objs[0]["item_id"] == 7 and objs[0]["item_completion"] == "x"
    assert objs[0]["id"] == "t1.1/questions.0" and json.loads(objs[0]["completion"])["question"] == "Why?"
    # no split: one row, item 0, the reply as it was
    (whole,) = stage_rows(ROW, "answers", None)
    assert whole["id"] == "t1.1/answers.0" and whole["completion"] == ROW["completion"] and "split" not in whole
    assert stage_rows({**ROW, "completion": "no list"}, "subtopics", P()) == Verdict("split_unparsed", "no list", "numbered_list")


def test_a_child_record_inherits_its_parents_fields_or_parent_dot_name():
    parent = {"id": "t1.0/subtopics.2", "sample": 0, "lineage": ["t1"], "prompt": "p", "generation": {},
              "topic": "volcanoes", "subtopic": "lava", "completion": "lava", "parent": {"subtopic": "x"}}
    fields = child_fields(parent, {"question": "q?"})
    assert fields == {"topic": "volcanoes", "subtopic": "lava", "question": "q?",
                      "parent": {"completion": "lava", "parent": {"subtopic": "x"}}}
    assert child_fields({"topic": "a", "question": "old"}, {"question": "new"}) == {
        "topic": "a", "question": "new", "parent": {"question": "old"}}


def test_ids_parse_back_even_when_the_input_id_looks_derived():
    rid = child_id(child_id("a.0/b.1", 3, "subtopics", 4), 0, "questions", 17)
    assert rid == "a.0/b.1.3/subtopics.4.0/questions.17"
    assert lineage_of(rid, ["subtopics", "questions"]) == ["a.0/b.1", "a.0/b.1.3/subtopics.4"]
    assert parse_child_id(rid).stage == "questions" and parse_child_id("t1") is None
    with pytest.raises(ValueError, match=r"not derived through stages \['answers'\]"):
        lineage_of(rid, ["answers"])
    for bad in ("", "a.b", "a/b", "1st", "Topics", "x" * 41):
        with pytest.raises(ValueError, match="must start with a letter"):
            check_stage_name(bad)


root_ids = st.text(alphabet=st.sampled_from("t1./0-_ \u00e9\n") | st.characters(codec="utf-8"), max_size=12)  # "" too: an input may give it


@settings(max_examples=20, deadline=None, database=None)  # each example builds up to 1 600 rows
@given(roots=st.lists(root_ids, min_size=1, max_size=3, unique=True), samples=st.integers(1, 2))
@example(roots=["t1", "t1.0/subtopics.0", ""], samples=1)
def test_ids_stay_unique_over_a_1_20_20_fanout_and_parse_back_to_their_lineage(roots, samples):
    stages = ["subtopics", "questions"]
    twenty = "\n".join(f"{i}. item {i}" for i in range(1, 21))
    level = [{"id": r, "sample": s, "completion": twenty} for r in roots for s in range(samples)]
    for depth, stage in enumerate(stages):
        rows = [child for row in level for child in stage_rows(row, stage, P(into=f"f{depth}", max_items=20))]
        ids = [r["id"] for r in rows]
        assert len(rows) == len(level) * 20 and len(set(ids)) == len(ids)
        for r in rows:
            assert lineage_of(r["id"], stages[:depth + 1]) == r["lineage"]
            assert r["lineage"][0] in roots
        # the next stage reads each kept row as a record of its own id
        level = [{"id": r["id"], "lineage": r["lineage"], "sample": s, "completion": twenty} for r in rows for s in range(samples)]
    assert len({r["id"] for r in rows}) == len(roots) * samples * 20 * samples * 20


MARKUP = st.text(alphabet=st.sampled_from("1234567890.)(-*+\u2022 \t\n\r[]{}\",:\\ab\u2028") | st.characters(codec="utf-8"), max_size=300)


@FAST
@given(reply=MARKUP | st.none(), parser=st.sampled_from(["numbered_list", "bulleted_list", "lines", "json_list", "regex"]),
       min_items=st.integers(1, 5), extra=st.integers(0, 5), too_many=st.sampled_from(["truncate", "drop"]))
@example(reply='[{"id": 1}, "x", {"completion": null}]', parser="json_list", min_items=1, extra=0, too_many="truncate")
def test_splitting_never_raises_and_keeps_its_bounds(reply, parser, min_items, extra, too_many):
    params = P(parser, min_items=min_items, max_items=min_items + extra, too_many=too_many,
               pattern=r"(?m)^\s*(?:\d+[.)])?(.*)$" if parser == "regex" else None)
    got = split_reply(reply, params)
    if isinstance(got, Verdict):
        assert got.filter in ("split_unparsed", "split_too_few", "split_too_many")
        return
    assert min_items <= len(got.items) <= params.max_items and got.found >= len(got.items)
    assert all(isinstance(i, dict) and i or isinstance(i, str) and i.strip() == i and i for i in got.items)
    for row in stage_rows({"id": "r", "sample": 0, "completion": reply}, "s", params):
        assert row["id"].startswith("r.0/s.") and row["lineage"] == ["r"]
