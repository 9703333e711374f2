"""The pipeline file (infra/pipeline): its model reuses the run's settings, every refusal is one line
naming the stage and the field, a hostile file is refused before it costs anything, and each stage's
config hash is its own settings plus its parent's."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from flows.params import RunParams
from infra.errors import ConfigError
from infra.pipeline.fields import StageSettings
from infra.pipeline.files import MAX_NODES, pipeline_from_text
from infra.pipeline.hashes import stage_hashes
from infra.pipeline.model import MAX_STAGES, Stage

HEAD = "input: in.jsonl\nservers: {main: {profile: local}}\n"


def pipeline(stages: str, head: str = HEAD, name: str = "p.yaml"):
    return pipeline_from_text(head + "stages:\n" + stages, name)


def refused(text: str, name: str = "p.yaml") -> str:
    with pytest.raises(ConfigError) as caught:
        pipeline_from_text(text, name)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"pipeline {name}: "), message
    return message


TWO = """
  - {name: topics, recipe: {prompt_template: "About {{ topic }}"}}
  - {name: questions, from: topics, recipe: {prompt_template: "Q on {{ completion }}"}}
"""


def test_a_stage_has_the_run_settings_with_their_types_and_defaults():
    for name, field in StageSettings.model_fields.items():
        run = RunParams.model_fields[name]
        assert (run.annotation, run.metadata, run.description) == (field.annotation, field.metadata, field.description)
        assert run.get_default(call_default_factory=True) == Stage.model_fields[name].get_default(call_default_factory=True)


def test_unset_fields_come_from_the_defaults_one_group_deep():
    p = pipeline(TWO.replace("recipe: {prompt_template: \"Q", "sampling: {tokens_to_generate: 9}, recipe: {prompt_template: \"Q"),
                 head=HEAD + "defaults: {sampling: {temperature: 0.5, random_seed: 3}, batch_size: 4}\n")
    topics, questions = p.stages
    assert (topics.sampling.temperature, topics.sampling.tokens_to_generate, topics.batch_size) == (0.5, 256, 4)
    assert (questions.sampling.temperature, questions.sampling.random_seed, questions.sampling.tokens_to_generate) == (0.5, 3, 9)
    assert questions.settings == StageSettings(sampling=questions.sampling, batch_size=4, recipe=questions.recipe)


def test_json_is_accepted():
    data = {"input": "in.jsonl", "servers": {"main": {"profile": "local"}},
            "stages": [{"name": "a", "recipe": {"prompt_template": "{{ topic }}"}}]}
    assert pipeline_from_text(json.dumps(data), "p.json").stages[0].name == "a"


@pytest.mark.parametrize("stages, expected", [
    (TWO.replace("from: topics", "from: topic"), "stage 'questions': from: 'topic' is not a stage of this pipeline (stages: topics, questions)"),
    (TWO.replace("name: questions", "name: topics").replace("from: topics", "input: b.jsonl"),
     "stage 'topics': name: given to two stages"),
    (TWO + "  - {name: loop, from: loop, recipe: {prompt_template: x}}\n", "stage 'loop': from: the stages read each other in a cycle (loop reads loop)"),
    ("  - {name: a, from: b, recipe: {prompt_template: x}}\n  - {name: b, from: a, recipe: {prompt_template: x}}\n",
     "cycle (a reads b, b reads a)"),
    (TWO.replace("from: topics", "from: topics, input: b.jsonl"), "stage 'questions': from and input are both set"),
    (TWO.replace(', recipe: {prompt_template: "Q on {{ completion }}"}', ""), "stage 'questions': recipe.prompt_template: a stage reading"),
    (TWO.replace("{name: topics,", "{name: topics, split: {parser: lines, into: q}, output_schema: {type: object},"),
     "stage 'topics': split: the reply is one JSON object (output_schema), with no list to cut"),
    (TWO.replace("{name: topics,", "{name: topics, split: {parser: lines, into: completion},"),
     "stage 'topics': split: split.into 'completion' must be a field name"),
    (TWO.replace("{name: topics,", "{name: topics, split: {parser: lines},"), "stage 'topics': split.into: Field required"),
    (TWO.replace("{name: topics,", "{name: topics, output_schema: {type: strin},"),
     "stage 'topics': output_schema: not a valid JSON Schema (Draft 2020-12) at $.type: 'strin' is not valid"),
    (TWO.replace("{name: topics,", "{name: topics, output_schema: {type: object, properties: {a: {$ref: 'https://x.test/s.json'}}},"),
     "stage 'topics': output_schema: $.properties.a.$ref 'https://x.test/s.json': only references inside the schema"),
    (TWO.replace("{name: topics,", "{name: topics, output_schema: {$ref: '#'},"), "stage 'topics': output_schema: its $refs loop"),
    (TWO.replace("{name: topics,", "{name: topics, output_schema: {type: object, patternProperties: {'^(a+)+$': {}}},"),
     "stage 'topics': output_schema: $.patternProperties: not supported"),
    (TWO.replace("{name: topics,", "{name: topics, output_schema: {type: string, pattern: '(a'},"),
     "stage 'topics': output_schema: $.pattern '(a' is not a valid regex"),
    (TWO.replace("{name: topics,", "{name: topics, output_schema: " + "{not: " * 40 + "{}" + "}" * 40 + ","),
     "line 5: nested more than 32 levels deep"),  # the file reader's bound comes first
    (TWO.replace("{name: topics,", "{name: topics, output_schema: {type: object, properties: {"
                 + ", ".join(f"p{i}: {{type: string}}" for i in range(3000)) + "}},"), "stage 'topics': output_schema: 85924 bytes of JSON, over 65536"),
    (TWO.replace("{name: topics,", "{name: topics, split: {parser: lines, into: q}, output_schema: {type: array},"),
     "stage 'topics': split.parser lines: the reply is a JSON list (output_schema type array); use parser json_list"),
    (TWO.replace("{name: topics,", "{name: topics, sampling: {temperature: 0},"), "stage 'topics': sampling: temperature must be > 0"),
    (TWO.replace("{name: topics,", "{name: topics, batch_size: 500,"), "stage 'topics': batch_size: Input should be less than or equal to 128"),
    (TWO.replace("{name: topics,", "{name: topics, recipe_: 1,"), "stage 'topics': recipe_: Extra inputs are not permitted"),
    (TWO.replace("{name: topics,", "{name: Topics/x,"), "stage 'Topics/x': name: String should match pattern"),
])
def test_each_refusal_is_one_line_naming_the_stage_and_the_field(stages, expected):
    assert expected in refused(HEAD + "stages:\n" + stages)


def test_a_stage_without_parent_or_input_is_refused():
    assert "stage 'topics': input: this stage has no parent (from) and the pipeline no input" in refused(
        "servers: {main: {profile: local}}\nstages:\n" + TWO)


@pytest.mark.parametrize("head, expected", [
    (HEAD + "defaults: {name: x}\n", "defaults.name: not a setting a stage takes from defaults"),
    (HEAD + "defaults: {sampling: {temprature: 1}}\n", "stage 'topics': sampling.temprature: Extra inputs are not permitted"),
    ("input: in.jsonl\nservers: {a: {profile: local}, b: {profile: local}}\n", "servers: a, b: give exactly one generation server"),
    ("input: in.jsonl\nservers: {main: {profile: local, engine: vlm}}\n", "servers.main.engine: Input should be"),
    (HEAD + "stage: []\n", "stage: Extra inputs are not permitted"),
])
def test_top_level_refusals_name_the_field(head, expected):
    assert expected in refused(head + "stages:\n" + TWO)


# -- Hostile files: each refused in one line, before it costs memory or time.

@pytest.mark.parametrize("text, expected", [
    ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n",
     "line 2: YAML alias *a: aliases are refused"),
    ("base: &b {profile: local}\nservers: {main: {<<: *b}}\n", "YAML alias *b"),
    ("stages: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than 32 levels deep"),
    ("stages: [" + ", ".join(["1"] * (MAX_NODES + 5)) + "]\n", f"more than {MAX_NODES} values"),
    ("!!python/object/apply:os.system [echo hacked]\n", "not YAML: could not determine a constructor"),
    ("input: a\ninput: b\n", "line 2: key 'input' given twice"),
    ("- 1\n- 2\n", "holds a list, not a pipeline"),
    ("input: [unclosed\n", "not YAML"),
    (HEAD + "stages:\n" + "".join(f"  - {{name: s{i}, recipe: {{prompt_template: x}}}}\n" for i in range(MAX_STAGES + 1)),
     f"stages: List should have at most {MAX_STAGES} items"),
])
def test_hostile_yaml_is_refused_in_one_line(text, expected):
    assert expected in refused(text)


@pytest.mark.parametrize("text, expected", [
    ("[" * 100_000 + "]" * 100_000, "nested more than 32 levels deep"),
    ('{"input": "a", "input": "b"}', "key 'input' given twice"),
    ('{"input": ', "not JSON"),
    ("[" + ",".join(["0"] * (MAX_NODES + 1)) + "]", f"more than {MAX_NODES} values"),
])
def test_hostile_json_is_refused_in_one_line(text, expected):
    assert expected in refused(text, "p.json")


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300), st.sampled_from(["p.yaml", "p.json"]))
def test_any_text_is_a_pipeline_or_one_line_of_refusal(text, name):
    try:
        pipeline_from_text(text, name)
    except ConfigError as exc:
        assert "\n" not in str(exc)


# -- Config hashes: a stage's own settings plus its parent's hash.

THREE = TWO + '  - {name: answers, from: questions, recipe: {prompt_template: "A to {{ completion }}"}}\n'


def test_a_change_reaches_the_stage_and_those_after_it_only():
    base = stage_hashes(pipeline(THREE))
    template = stage_hashes(pipeline(THREE.replace("Q on", "Question on")))
    assert template["topics"] == base["topics"]
    assert template["questions"] != base["questions"] and template["answers"] != base["answers"]
    sampling = stage_hashes(pipeline(THREE.replace("{name: answers,", "{name: answers, sampling: {temperature: 0.3},")))
    assert [sampling[s] == base[s] for s in ("topics", "questions", "answers")] == [True, True, False]


def test_a_filter_change_keeps_the_stage_generation_and_regenerates_its_children():
    base = stage_hashes(pipeline(THREE))
    filtered = stage_hashes(pipeline(THREE.replace("{name: topics,", "{name: topics, filters: {dedup_exact: true},")))
    assert filtered["topics"].generation == base["topics"].generation  # re-curated, no server
    assert filtered["topics"].kept != base["topics"].kept
    assert filtered["questions"].generation != base["questions"].generation


def test_a_template_file_counts_by_its_contents_when_given():
    p = pipeline(THREE.replace('"Q on {{ completion }}"', "q.j2"))
    assert stage_hashes(p, {"q.j2": "a" * 64}) == stage_hashes(p, {"q.j2": "a" * 64})
    assert stage_hashes(p, {"q.j2": "a" * 64})["questions"] != stage_hashes(p, {"q.j2": "b" * 64})["questions"]
