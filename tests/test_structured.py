"""output_schema (infra/recipes/structured.py): a hostile schema refused in one line, replies parsed
out of prose and fences and validated with bounded patterns, invalid rows asked again with derived
seeds (infra/generation.py structured_results), valid objects made the row's fields, the rest
dropped as schema_invalid by curation; the request fields each engine constrains decoding with."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flows.cli import build_parser, run_parameters
from flows.params import RunParams
from infra.engines.batch import GeneratedText
from infra.engines.completion import Completion
from infra.engines.openai import constraint_fields, request_body
from infra.errors import ConfigError, RequestRejected
from infra.generation import ShardJob, output_record, structured_results
from infra.prompting.dataset import Record, Shard
from infra.prompting.sampling import SamplingParams
from infra.recipes.curate import Curation
from infra.recipes.filters import build_filters, first_verdict
from infra.recipes.split import SplitParams, stage_rows
from infra.recipes.structured import Invalid, Parsed, Structured, check_schema, parse_reply

PERSON = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Z]"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.parametrize("reply, value", [
    ('{"name": "Ada", "age": 36}', {"name": "Ada", "age": 36}),
    ('Sure! Here it is:\n```json\n{"name": "Ada", "age": 36}\n```\nAnything else?', {"name": "Ada", "age": 36}),
    ('Use {braces} like {this}: {"name": "Ada", "age": 36} and more text', {"name": "Ada", "age": 36}),
    ('  [1, 2]  ', [1, 2]),
])
def test_a_json_value_is_found_inside_prose_and_fences(reply, value):
    assert parse_reply(reply) == Parsed(value)


@pytest.mark.parametrize("reply, error", [
    (None, "no reply"),
    ("no json at all", "no JSON object ('{') in the reply"),
    ('{"name": "Ada", "age": ', "invalid JSON: Expecting value"),
    ("[" * 200_000, "invalid JSON: nested too deep"),
    ("x" * (300 << 10), "over 262144: not parsed"),
])
def test_an_unparsable_reply_says_why(reply, error):
    got = parse_reply(reply, "array" if reply and reply.startswith("[") else "object")
    assert isinstance(got, Invalid) and error in got.error


def test_a_stray_bracket_count_is_bounded():
    got = parse_reply("{" + " {x" * 10_000, "object")
    assert isinstance(got, Invalid) and "invalid JSON" in got.error  # 16 candidates tried, then the last error


@pytest.mark.parametrize("reply, error", [
    ('{"name": "ada", "age": 36}', "at $.name: 'ada' does not match '^[A-Z]'"),
    ('{"name": "Ada"}', "at $: 'age' is a required property"),
    ('{"name": "Ada", "age": "old"}', "at $.age: 'old' is not of type 'integer'"),
    ('{"name": "Ada", "age": 3, "x": 1}', "Additional properties are not allowed"),
])
def test_a_reply_off_the_schema_names_the_path_and_the_rule(reply, error):
    got = Structured(check_schema(PERSON)).check(reply)
    assert isinstance(got, Invalid) and error in got.error, got


@pytest.mark.parametrize("schema, error", [
    ({"$ref": "https://evil.test/schema.json"}, "$.$ref 'https://evil.test/schema.json': only references inside the schema"),
    ({"type": "object", "properties": {"a": {"$dynamicRef": "file:///etc/passwd"}}}, "$.properties.a.$dynamicRef"),
    ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "its $refs loop"),
    ({"type": "object", "patternProperties": {"^(a+)+$": {}}}, "$.patternProperties: not supported"),
    ({"type": "string", "pattern": "a" * 1001}, "$.pattern is 1001 characters"),
    ({"type": "string", "pattern": "(?P<x"}, "is not a valid regex"),
    ({"allOf": [{}] * 6000}, "holds over 5000 values"),
    (json.loads('{"not": ' * 40 + "{}" + "}" * 40), "nests deeper than 32"),
    ({"type": "object", "description": "x" * (70 << 10)}, "bytes of JSON, over 65536"),
    ({"$schema": "http://json-schema.org/draft-04/schema#"}, "only Draft 2020-12"),
    ({"type": "objekt"}, "not a valid JSON Schema (Draft 2020-12) at $.type"),
    ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, "$.properties.a.$ref '#/$defs/missing' does not resolve inside"),
    ({"minLength": -1}, "not a valid JSON Schema (Draft 2020-12) at $.minLength"),
])
def test_a_hostile_or_broken_schema_is_refused_in_one_line(schema, error):
    with pytest.raises(ValueError) as exc:
        check_schema(schema)
    assert error in str(exc.value) and "\n" not in str(exc.value)


CATASTROPHIC = r"^(\w|\w\w)+$"


# Exponential in `regex` too (an alternation of overlapping branches, repeated); nested quantifiers
# such as (a+)+$ or (\w+\s?)+ are not: `regex` matches those without backtracking through each split.
@pytest.mark.parametrize("pattern", [CATASTROPHIC, r"(x|xx)+y", r"^([a-z]|[a-z0-9])+$", r"^(\d|\d\d)+$"])
def test_a_catastrophic_pattern_is_refused_in_one_line_before_anything_runs(pattern):
    """Probed on short texts built to make it backtrack (infra/recipes/patterns.py backtracks), in the
    parameter's check: before any GPU is asked for, not by the first reply's validation after it is held."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "pattern": pattern}}}
    with pytest.raises(ValueError) as exc:
        check_schema(schema)
    message = str(exc.value)
    assert message.startswith(f"$.properties.name.pattern {pattern!r} searched ") and "\n" not in message, message
    assert "backtracks catastrophically" in message and "Rewrite it so each text splits one way only" in message
    with pytest.raises(ConfigError, match=r"output_schema: .*\$\.properties\.name\.pattern .* backtracks"):
        RunParams(output_schema=schema)


@pytest.mark.parametrize("pattern", ["^[A-Z]", r"^\d{3}-\d{4}$", r"^[\w.+-]+@[\w-]+(\.[\w-]+)+$", r"^[a-z]+(?:-[a-z]+)*$",
                                     r"^(?:[01]\d|2[0-3]):[0-5]\d$", r"\b(yes|no)\b", r".*a.*b.*c", r"^\s*\S.*$",
                                     r"^(\w+\s)*\w+$", r"^(?>\w+\s?)+$", r"^\s*(\w+\s?)+[.?!]?$", r"(a+)+$"])
def test_ordinary_patterns_pass_the_probe(pattern):
    check_schema({"type": "string", "pattern": pattern})


def test_a_catastrophic_pattern_fails_with_its_name_instead_of_hanging():
    # Exponential backtracking (tests/test_curation.py CATASTROPHIC): `regex` stops after SEARCH_SECONDS of CPU.
    # The check refuses it (above); a schema built without the check still meets the bound at validation.
    schema = Structured({"type": "string", "pattern": CATASTROPHIC})
    with pytest.raises(ConfigError) as exc:
        schema.check(json.dumps("a" * 34 + "!"))
    assert f"output_schema pattern {CATASTROPHIC!r} searched one text of 35 characters for more than 1 s" in str(exc.value)
    assert str(exc.value).endswith("then start a new run (--new-run) with the schema fixed.")


def test_the_run_parameter_and_the_cli_flag_take_a_schema_and_refuse_a_hostile_one():
    args = build_parser().parse_args(["run", "--output-schema", json.dumps(PERSON), "--max-attempts", "5"])
    assert run_parameters(args) == {"output_schema": json.dumps(PERSON), "max_attempts": 5}  # the flow gets JSON text
    assert RunParams(output_schema=PERSON).output_schema == RunParams(output_schema=json.dumps(PERSON)).output_schema == PERSON
    with pytest.raises(ConfigError, match="output_schema: Value error, not JSON text"):
        RunParams(output_schema="{nope")
    with pytest.raises(ConfigError, match=r"output_schema: .*\$\.\$ref 'http://x.test/s': only references inside"):
        RunParams(output_schema={"$ref": "http://x.test/s"})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--output-schema", "[1, 2]"])


class ScriptedClient:
    """A client whose replies are scripted per call, recording each batch it was sent."""

    def __init__(self, *calls: list[str | RequestRejected]):
        self.calls = list(calls)
        self.sent = []

    def generate_batch(self, batch, on_result=None):
        self.sent.append(batch)
        replies = self.calls.pop(0)
        assert len(replies) == len(batch.prompts) * batch.samples
        return [r if isinstance(r, RequestRejected) else GeneratedText("p", Completion(r, "exact", "end_string", 0), 5)
                for r in replies]


def job(**kw) -> ShardJob:
    sampling = SamplingParams(temperature=0.7, random_seed=11, **kw.pop("sampling", {}))
    return ShardJob("r", "m", "h", sampling, 4, samples=kw.pop("samples", 1),
                    structured=Structured(check_schema(PERSON)), max_attempts=kw.pop("max_attempts", 3))


SHARD = Shard(2, [Record(f"r{i}", f"prompt {i}", i + 1, {}) for i in range(3)])
GOOD, BAD = '{"name": "Ada", "age": 36}', "I am a person."


def first(*replies: str | RequestRejected) -> list:
    """A first attempt's results, as generate_batch gives them."""
    return ScriptedClient(list(replies)).generate_batch(type("B", (), {"prompts": replies, "samples": 1})())


def test_only_invalid_rows_are_asked_again_each_attempt_with_its_own_derived_seed():
    client = ScriptedClient([GOOD, BAD], [BAD])
    checked, replaced = structured_results(client, SHARD, job(), first(BAD, GOOD, BAD))
    assert replaced == 3 * 5  # row 0's first reply, row 2's first and second: 5 tokens each
    assert [c[0] for c in checked] == [2, 1, 3]  # row 0 valid at attempt 2, row 2 never
    assert isinstance(checked[0][1], Parsed) and isinstance(checked[1][1], Parsed)
    assert checked[2][1] == Invalid("no JSON object ('{') in the reply")
    assert [b.prompts for b in client.sent] == [["prompt 0", "prompt 2"], ["prompt 2"]]
    assert [b.lines for b in client.sent] == [[1, 3], [3]]
    seeds = [b.sampling.random_seed for b in client.sent]
    assert len(set(seeds)) == 2 and 11 not in seeds and all(b.output_schema == PERSON for b in client.sent)
    again = ScriptedClient([GOOD, BAD], [BAD])
    structured_results(again, SHARD, job(), first(BAD, GOOD, BAD))
    assert [b.sampling.random_seed for b in again.sent] == seeds  # the same run asks again the same way


def test_greedy_asks_once_and_samples_map_back_to_their_records():
    greedy = ScriptedClient()
    assert [c[0] for c in structured_results(greedy, SHARD, job(sampling={"greedy": True}), first(BAD, BAD, BAD))[0]] == [1, 1, 1]
    assert greedy.sent == []
    two = ScriptedClient([GOOD, GOOD])
    shard = Shard(0, SHARD.records[:2])
    structured_results(two, shard, job(samples=2), first(GOOD, BAD, BAD, GOOD))
    assert two.sent[0].prompts == ["prompt 0", "prompt 1"] and two.sent[0].samples == 1  # rows 1 (r0 s1), 2 (r1 s0)


def test_a_refused_retry_keeps_the_earlier_reply():
    client = ScriptedClient([RequestRejected("too long", status=400, body="too long")], [GOOD])
    results = first(BAD)
    checked, _ = structured_results(client, Shard(0, SHARD.records[:1]), job(), results)
    assert checked[0][0] == 3 and isinstance(checked[0][1], Parsed)
    assert results[0].completion.text == GOOD


def test_a_valid_object_becomes_the_rows_fields_and_an_invalid_one_is_dropped_as_schema_invalid():
    rec = Record("r0", "p", 1, {"name": "from the input", "topic": "t"})
    gen = GeneratedText("p", Completion('{"name": "Ada", "age": 36, "id": 9}', "exact", "end_string", 0), 5)
    row = output_record(rec, gen, job(), 0, 0, (2, Parsed({"name": "Ada", "age": 36, "id": 9})))
    assert (row["name"], row["age"], row["output_id"], row["id"]) == ("Ada", 36, 9, "r0")
    assert row["input_name"] == "from the input" and row["topic"] == "t"
    assert row["generation"]["structured"] == {"attempts": 2}
    bad = output_record(rec, gen, job(), 0, 0, (3, Invalid("no JSON object ('{') in the reply")))
    assert bad["generation"]["structured"] == {"attempts": 3, "error": "no JSON object ('{') in the reply"}
    filters = build_filters(Curation(schema=True).filters, schema=True)
    assert first_verdict(filters, row) is None
    verdict = first_verdict(filters, bad)
    assert verdict.as_dict() == {"filter": "schema_invalid", "value": "no JSON object ('{') in the reply", "limit": 3}
    assert Curation(schema=True).enabled and not Curation().enabled
    assert Curation().stage_hash("g") != Curation(schema=True).stage_hash("g")


def test_split_cuts_the_validated_list_not_the_text():
    row = {"id": "r0", "sample": 0, "completion": 'Here: ["a", "b"] and ["c"]', "output": ["x", {"q": "y"}],
           "generation": {"structured": {"attempts": 1}}}
    rows = stage_rows(row, "s", SplitParams(parser="json_list", into="item"))
    assert [(r.get("item"), r.get("q")) for r in rows] == [("x", None), (None, "y")]
    assert all("output" not in r for r in rows)
    empty = stage_rows({**row, "output": []}, "s", SplitParams(parser="json_list", into="item"))
    assert empty.filter == "split_unparsed"


def test_each_constraining_engine_gets_the_schema_in_its_own_request_field():
    sampling = SamplingParams(tokens_to_generate=8)
    vllm = request_body("m", "p", sampling, constraint=constraint_fields("vllm", PERSON))
    assert vllm["structured_outputs"] == {"json": PERSON} and "response_format" not in vllm
    trt = request_body("m", "p", sampling, constraint=constraint_fields("trtllm", PERSON))
    assert trt["response_format"] == {"type": "json", "schema": PERSON} and "structured_outputs" not in trt
    for engine in ("nemo-openai", "custom", "nemo", None):
        assert constraint_fields(engine, PERSON) == {}
    assert constraint_fields("vllm", None) == {}


KEYWORDS = ["type", "properties", "items", "required", "$ref", "$defs", "pattern", "enum", "not", "anyOf",
            "additionalProperties", "minLength", "prefixItems", "const", "$dynamicRef", "propertyNames"]
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYWORDS) | st.text(max_size=4),
                                                                                  inner, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(schema=st.dictionaries(st.sampled_from(KEYWORDS), JSON, max_size=5), reply=st.text(max_size=40) | JSON.map(json.dumps))
@example(schema={"properties": {"\n": None}}, reply="")  # a key with a line break, quoted in the message (CI, stop 34)
@example(schema={"properties": {"\u2028": {"pattern": "("}}}, reply="")
def test_any_schema_is_refused_in_one_line_or_checks_any_reply_without_raising(schema, reply):
    try:
        checked = Structured(check_schema(schema))
    except ValueError as exc:
        assert len(str(exc).splitlines()) == 1, str(exc)  # one line, whatever line break a quoted key holds
        return
    assert isinstance(checked.check(reply), (Parsed, Invalid))
