"""Recipes, the pure side: templates in the sandbox, a template from s3 (moto), few-shot choice,
seeds per request, and the run config refusing a changed recipe. The flow side (samples against
the local server, kill -9) is tests/test_recipe_flow.py."""

from __future__ import annotations

import json

import pytest

from infra.prompting.dataset import BadLine, Record
from infra.errors import ConfigError, InputError
from infra.planning import make_plan, usable_records
from infra.recipes import RecipeParams, load_recipe
from infra.recipes.examples import Examples
from infra.prompting.samples import request_seed, sample_batches
from infra.prompting.sampling import MAX_RANDOM_SEED, SamplingParams
from infra.settings import Settings
from infra.storage import open_input
from infra.storage.local import LocalOutputStore
from tests.test_planning import cfg, write


def recipe(**kw):
    return load_recipe(RecipeParams(**kw), Settings())


def render(template: str, fields: dict, rid: str = "r1", **kw):
    return recipe(prompt_template=template, **kw).renderer()(Record(rid, "", 1, fields, given_id=True))


def test_template_renders_the_record_fields():
    rec = render("Write about {{ topic }} for {{ audience | default('everyone') }}.", {"topic": "tides"})
    assert isinstance(rec, Record) and rec.prompt == "Write about tides for everyone." and rec.fields == {"topic": "tides"}


@pytest.mark.parametrize("template", ["{{ ''.__class__.__mro__ }}", "{{ cycler.__init__.__globals__ }}",
                                      "{{ lipsum.__globals__ }}", "{{ ().__class__.__base__.__subclasses__() }}",
                                      "{{ topic.__class__ }}", "{{ self._TemplateReference__context }}"])
def test_sandbox_refuses_escapes(template):
    bad = render(template, {"topic": "x"})
    assert isinstance(bad, BadLine) and "cannot render" in bad.reason
    assert "unsafe" in bad.reason or "undefined" in bad.reason.lower(), bad.reason


# Templates that used to hang, fill memory or crash the plan (review 2, D10), each scaled down so
# that without the bounds it renders (or crashes) in about a second instead of refusing.
HOSTILE_TEMPLATES = {
    "nested loops": ("{% for i in range(2000) %}{% for j in range(2000) %}{% endfor %}{% endfor %}{{ topic }}",
                     "more than 100000 loop iterations and calls"),
    "big integer power": ("{{ (9 ** 999999) % 10 }}{{ topic }}", "** would build an integer"),
    "string multiplication": ("{{ 'a' * 30000000 }}{{ topic }}", "the * operator would build about 30000000 characters"),
    "printf width": ("{{ '%20000000s' % topic }}", "the % operator would build"),
    "str.format width": ("{{ '{:>{w}}'.format(topic, w=20000000) }}", "str.format would build"),
    "filter width": ("{{ topic|center(20000000) }}", "the filter center would build"),
    "recursive macro": ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}{{ topic }}", "RecursionError"),
    "shared references": ("{% macro f(a, n) %}{% if n %}{{ f([a, a], n - 1) }}{% else %}{{ a|length }}{% endif %}"
                          "{% endmacro %}{{ f([topic], 30) }}", "a literal would build"),
    "captured block": ("{% set x %}{% for i in range(500) %}{{ topic * 10000 }}{% endfor %}{% endset %}{{ x|length }}",
                       "a block's output would build"),
    "long output": ("{% for i in range(100) %}{{ topic * 1000 }}{% endfor %}",
                    "the rendered prompt is longer than 65536 characters"),
}


@pytest.mark.parametrize("name", HOSTILE_TEMPLATES)
def test_a_template_that_would_hang_or_exhaust_memory_is_a_bad_line(name):
    template, reason = HOSTILE_TEMPLATES[name]
    bad = render(template, {"topic": "tides"})
    assert isinstance(bad, BadLine), f"{name} rendered {len(bad.prompt)} characters"
    assert "prompt_template cannot render this record" in bad.reason and reason in bad.reason, bad.reason


def test_bounded_templates_still_render_loops_filters_and_formats():
    rec = render("{% for e in items %}{{ loop.index }}/{{ loop.length }} {{ e|center(5) }}|{% endfor %}"
                 "{{ '%-4s|%03d' % (topic, 7) }} {{ '{}!'.format(topic) }} {{ 2 ** 10 }} {{ topic ~ '.' }} "
                 "{{ items|join(',') }} {{ [[1], [2]]|sum(start=[]) }} {{ 'a\nb'|indent(2) }}"
                 "{% for a, b in [(1, 2)] %} {{ a + b }}{% endfor %}", {"topic": "sea", "items": ["x", "y"]})
    assert isinstance(rec, Record), rec.reason
    assert rec.prompt == "1/2   x  |2/2   y  |sea |007 sea! 1024 sea. x,y [1, 2] a\n  b 3"


def test_missing_field_is_a_bad_line_in_the_plan(workdir):
    src = write(workdir / "in.jsonl", {"topic": "tides"}, {"subject": "no topic here"}, {"topic": "reefs"})
    params = RecipeParams(prompt_template="Topic: {{ topic }}\n")
    run = cfg(src, recipe=load_recipe(params, Settings()))
    with pytest.raises(InputError, match=r"line 2: prompt_template cannot render this record: UndefinedError: 'topic' is undefined"):
        make_plan(run, Settings(), LocalOutputStore(workdir / "out" / "r1"))
    skip = cfg(src, recipe=run.recipe, on_bad_input="skip")
    plan = make_plan(skip, Settings(), LocalOutputStore(workdir / "out" / "r2"))
    assert (plan.records_in, plan.rejected) == (2, 1)
    with open_input(str(src), Settings().s3) as stream:  # the generation pass renders the same prompts
        assert [r.prompt for r in usable_records(stream, skip, Settings(), plan.format)] == ["Topic: tides\n", "Topic: reefs\n"]


def test_a_syntax_error_is_the_users_before_any_line(workdir):
    with pytest.raises(ConfigError, match="line 1: unexpected"):
        recipe(prompt_template="{{ topic }")


def test_template_from_a_local_file_and_from_s3(workdir, s3_settings, s3_client, s3_bucket):
    (workdir / "t.j2").write_text("About {{ topic }}:\n")
    assert recipe(prompt_template="t.j2").template.text == "About {{ topic }}:\n"
    s3_client.put_object(Bucket=s3_bucket, Key="recipes/t.j2", Body=b"From s3: {{ topic }}")
    loaded = load_recipe(RecipeParams(prompt_template=f"s3://{s3_bucket}/recipes/t.j2"), s3_settings)
    assert loaded.renderer()(Record("a", "", 1, {"topic": "kelp"})).prompt == "From s3: kelp"
    with pytest.raises(ConfigError, match="missing.j2"):
        load_recipe(RecipeParams(prompt_template=f"s3://{s3_bucket}/recipes/missing.j2"), s3_settings)


def examples(n: int, **extra) -> Examples:
    return Examples("mem", "0", tuple({"id": f"e{i}", "topic": f"t{i}", **extra} for i in range(n)))


def test_few_shot_is_deterministic_distinct_and_never_the_record():
    pool = examples(12)
    first = [pool.pick(f"r{i}", {"topic": "x"}, 4) for i in range(50)]
    assert first == [examples(12).pick(f"r{i}", {"topic": "x"}, 4) for i in range(50)]  # same on a rerun
    assert all(len({e["id"] for e in picked}) == 4 for picked in first)
    assert len({tuple(e["id"] for e in p) for p in first}) > 10  # records get different examples
    # The record itself, by id or by content, is never among its examples, even when only k others remain.
    for i in range(12):
        by_id = pool.pick(f"e{i}", {"topic": "other"}, 11)
        by_content = pool.pick("new", {"topic": f"t{i}"}, 11)
        assert f"e{i}" not in {e["id"] for e in by_id} and len(by_id) == 11
        assert f"t{i}" not in {e["topic"] for e in by_content} and len(by_content) == 11
    assert pool.pick("e0", {"topic": "t1"}, 11) is None  # two of the twelve are the record


def test_examples_reach_the_template_and_their_separator_ends_generation(workdir):
    src = write(workdir / "ex.jsonl", *({"topic": f"t{i}", "question": f"q{i}?"} for i in range(6)))
    template = "{% for ex in examples %}Q: {{ ex.question }}{{ separator }}{% endfor %}Topic {{ topic }}\nQ:"
    loaded = recipe(prompt_template=template, examples_uri=str(src), examples_per_prompt=2, example_separator="\n##\n")
    rec = loaded.renderer()(Record("t3", "", 1, {"topic": "t3", "question": "q3?"}))
    assert rec.prompt.count("\n##\n") == 2 and rec.prompt.endswith("Topic t3\nQ:") and "q3?" not in rec.prompt
    assert loaded.end_strings() == ["\n##\n"]
    assert loaded.fingerprint()["recipe.examples_sha256"] == __import__("hashlib").sha256(src.read_bytes()).hexdigest()
    with pytest.raises(ConfigError, match="needs at least 7"):
        recipe(prompt_template=template, examples_uri=str(src), examples_per_prompt=6)


def test_seeded_requests_one_sample_index_each_with_its_own_seed():
    prompts = [f"p{'x' * (i % 5)}" for i in range(10)]
    seeded = SamplingParams(random_seed=7)
    requests = list(sample_batches(prompts, 3, shard=2, sampling=seeded, batch_size=4, window=8))
    assert [s for s, _, _ in requests] == [0] * 3 + [1] * 3 + [2] * 3  # each batch one sample index
    plans = {s: [idx for t, idx, _ in requests if t == s] for s in range(3)}
    assert plans[0] == plans[1] == plans[2]  # the same make-up for every sample
    seeds = [p.random_seed for _, _, p in requests]
    assert len(set(seeds)) == 9 and all(0 <= x < MAX_RANDOM_SEED for x in seeds)
    assert seeds == [p.random_seed for _, _, p in sample_batches(prompts, 3, 2, seeded, 4, 8)]
    assert request_seed(7, 2, 0, 0) != request_seed(7, 3, 0, 0) != request_seed(8, 2, 0, 0)
    assert all(p.random_seed is None for _, _, p in sample_batches(prompts, 2, 0, SamplingParams(), 4, 8))


@pytest.mark.parametrize("change, field", [
    (dict(prompt_template="Other {{ topic }}"), "recipe.prompt_template_sha256"),
    (dict(samples_per_prompt=3), "recipe.samples_per_prompt"),
    (dict(examples_per_prompt=1), "recipe.examples_sha256"),
])
def test_a_changed_recipe_under_the_same_run_id_is_refused_naming_it(workdir, change, field):
    src = write(workdir / "in.jsonl", {"topic": "tides"}, {"topic": "reefs"})
    write(workdir / "ex.jsonl", *({"topic": f"t{i}"} for i in range(4)))
    base = dict(prompt_template="Topic {{ topic }}", samples_per_prompt=2)
    store = LocalOutputStore(workdir / "out" / "r1")
    make_plan(cfg(src, recipe=recipe(**base)), Settings(), store)
    make_plan(cfg(src, recipe=recipe(**base)), Settings(), store)  # the same recipe resumes
    changed = {**base, **change}
    if "examples_per_prompt" in change:
        changed.update(examples_uri=str(workdir / "ex.jsonl"),
                       prompt_template="{% for e in examples %}{{ e.topic }}{% endfor %} {{ topic }}")
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as exc:
        make_plan(cfg(src, recipe=recipe(**changed)), Settings(), store)
    assert "new run id" in str(exc.value) or "--new-run" in str(exc.value)


def test_recipe_params_refuse_examples_without_a_template_or_count():
    with pytest.raises(ValueError, match="needs examples_uri"):
        RecipeParams(prompt_template="x", examples_per_prompt=2)
    with pytest.raises(ValueError, match="examples_per_prompt is 0"):
        RecipeParams(prompt_template="x", examples_uri="e.jsonl")
    with pytest.raises(ValueError, match="need a prompt_template"):
        RecipeParams(examples_uri="e.jsonl", examples_per_prompt=1)


def test_cli_flags_fill_the_recipe_group_over_a_params_file(tmp_path):
    from flows.cli import build_parser, run_parameters

    params = tmp_path / "p.json"
    params.write_text(json.dumps({"recipe": {"prompt_template": "T {{ topic }}", "samples_per_prompt": 2}}))
    args = build_parser().parse_args(["run", "--params", str(params), "--samples-per-prompt", "3",
                                      "--examples-uri", "ex.jsonl", "--examples-per-prompt", "2", "--no-stop-at-separator"])
    assert run_parameters(args)["recipe"] == {"prompt_template": "T {{ topic }}", "samples_per_prompt": 3,
                                              "examples_uri": "ex.jsonl", "examples_per_prompt": 2, "stop_at_separator": False}


@pytest.mark.integration
def test_cli_template_mistakes_are_one_line_and_exit_2(tmp_path, prefect_server):
    from tests.test_cli import cli, user_error

    src = tmp_path / "in.jsonl"
    src.write_text('{"topic": "tides"}\n')
    env = {**prefect_server.client_env(), "NSDG_LOCAL__ENGINE": "simulated", "PREFECT_HOME": str(tmp_path / "ph"),
           "NSDG_WORK_DIR": str(tmp_path / "w")}
    out = cli("run", "--input-uri", str(src), "--output-uri", str(tmp_path / "out"), "--prompt-template", "{{ topic }",
              cwd=tmp_path, env=env)
    assert out.returncode == 2 and "recipe.prompt_template (inline) line 1" in user_error(out)
    assert not (tmp_path / "w" / "servers").exists()  # refused before any server
