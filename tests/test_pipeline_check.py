"""`nemotron-sdg check --pipeline` (infra/pipeline/check.py): each template against the fields its
parent provides, rendered without a server; the worked example passes; a bad file is one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.errors import ConfigError
from infra.pipeline.check import check_file
from infra.settings import load_settings

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "pipeline" / "pipeline.yaml"


def write(folder: Path, stages: str, rows=({"id": "t1", "topic": "tides"}, {"id": "t2", "topic": "bees"}),
          head: str = "input: in.jsonl\nservers: {main: {profile: local}}\n") -> Path:
    (folder / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = folder / "pipeline.yaml"
    path.write_text(head + "stages:\n" + stages)
    return path


def refused(path: Path, settings=None) -> str:
    with pytest.raises(ConfigError) as caught:
        check_file(str(path), settings or load_settings())
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"pipeline {path}: "), message
    return message


CHAIN = """
  - name: subtopics
    recipe: {prompt_template: "Subtopics of {{ topic }}:"}
    split: {parser: numbered_list, into: subtopic}
  - name: questions
    from: subtopics
    recipe: {prompt_template: "QUESTION about {{ subtopic }} ({{ topic }}), from {{ completion }}"}
    judge: {template: "Rate {{ completion }} for {{ subtopic }}:"}
"""


def test_a_child_sees_its_parents_fields_split_and_completion(tmp_path):
    lines = check_file(str(write(tmp_path, CHAIN)), load_settings(), show_prompts=True)
    assert "QUESTION about <subtopics subtopic> (tides), from <subtopics completion>" in lines
    assert "Rate <questions completion> for <subtopics subtopic>:" in lines
    assert "Subtopics of tides:" in lines
    graph = [line.split() for line in lines[1:4]]
    assert graph[1][:2] == ["subtopics", "input"] and graph[2][:2] == ["questions", "subtopics"]


@pytest.mark.parametrize("change, expected", [
    ("{{ subtopic }} (", "stage 'questions': recipe.prompt_template uses {{ subtpic }}, which the rows of stage "
                         "'subtopics' do not have (they have: completion, examples, generation, id, prompt, sample, "
                         "separator, subtopic, topic)"),
    ("Subtopics of {{ topic }}", "stage 'subtopics': recipe.prompt_template uses {{ topik }}, which the first rows of its input"),
    ("Rate {{ completion }}", "stage 'questions': judge.template uses {{ answer }}, which the rows of stage 'questions' do not have"),
])
def test_a_template_needing_a_field_its_parent_lacks_is_refused(tmp_path, change, expected):
    wrong = {"{{ subtopic }} (": "{{ subtpic }} (", "Subtopics of {{ topic }}": "Subtopics of {{ topik }}",
             "Rate {{ completion }}": "Rate {{ answer }}"}[change]
    assert expected in refused(write(tmp_path, CHAIN.replace(change, wrong)))


def test_a_field_only_tested_as_defined_is_not_required(tmp_path):
    stages = CHAIN.replace("Subtopics of {{ topic }}:", "{% if level is defined %}{{ level }} {% endif %}Subtopics of {{ topic }}:")
    assert check_file(str(write(tmp_path, stages)), load_settings())[0].startswith("pipeline ")


def test_the_parents_hidden_fields_are_under_parent(tmp_path):
    stages = CHAIN + '  - {name: answers, from: questions, recipe: {prompt_template: "{{ parent.completion }} / {{ completion }}"}}\n'
    lines = check_file(str(write(tmp_path, stages)), load_settings(), show_prompts=True)
    assert "<subtopics completion> / <questions completion>" in lines


@pytest.mark.parametrize("template, expected", [
    ("{{ ''.__class__.__mro__ }}", "stage 'subtopics': prompt_template cannot render this record: SecurityError"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x", "RenderLimit"),
    ("{{ topic", "stage 'subtopics': recipe.prompt_template (inline) line 1: unexpected end of template"),
])
def test_a_template_reaching_outside_the_sandbox_is_refused(tmp_path, template, expected):
    stages = f"  - name: subtopics\n    recipe: {{prompt_template: {json.dumps(template)}}}\n"
    message = refused(write(tmp_path, stages))
    assert expected in message


def test_a_bad_input_row_or_unknown_profile_is_refused(tmp_path):
    (tmp_path / "in.jsonl").write_text("{broken\n")
    path = write(tmp_path, CHAIN)
    (tmp_path / "in.jsonl").write_text("{broken\n")
    assert "stage 'subtopics': input line 1: invalid JSON" in refused(path)
    path = write(tmp_path, CHAIN, head="input: in.jsonl\nservers: {main: {profile: h100x17}}\n")
    assert "servers.main.profile: Unknown profile 'h100x17'" in refused(path)


def test_a_missing_template_file_names_the_stage(tmp_path):
    message = refused(write(tmp_path, CHAIN.replace('"Subtopics of {{ topic }}:"', "templates/nope.j2")))
    assert f"stage 'subtopics': Input '{tmp_path}/templates/nope.j2' not found" in message


def test_locations_outside_the_allowed_ones_are_refused(tmp_path):
    (tmp_path / "ok").mkdir()
    (tmp_path / "secret.j2").write_text("{{ topic }}")
    path = write(tmp_path / "ok", CHAIN.replace('"Subtopics of {{ topic }}:"', "../secret.j2"))
    message = refused(path, load_settings(allowed_uris=[str(tmp_path / "ok")]))
    assert "stage 'subtopics': recipe.prompt_template" in message and "outside the locations this installation allows" in message


def test_a_pipeline_on_s3_reads_its_templates_beside_it(s3_settings, s3_client, s3_bucket):
    for key, body in {"p/pipeline.yaml": "input: in.jsonl\nservers: {main: {profile: local}}\nstages:\n"
                                         "  - {name: a, recipe: {prompt_template: t/a.j2}}\n",
                      "p/in.jsonl": '{"id": "1", "topic": "tides"}\n', "p/t/a.j2": "About {{ topic }}."}.items():
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=body.encode())
    lines = check_file(f"s3://{s3_bucket}/p/pipeline.yaml", s3_settings, show_prompts=True)
    assert "About tides." in lines and "a.j2" in lines[2]


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_check_accepts_the_worked_example(tmp_path):
    out = cli("check", "--pipeline", str(EXAMPLE), cwd=tmp_path)  # another folder: paths are the file's
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"pipeline {EXAMPLE}: 4 stages on server 'main' (profile local)")
    assert [line.split()[:2] for line in lines[2:]] == [["subtopics", "input"], ["questions", "subtopics"], ["answers", "questions"],
                                                        ["prefs", "answers"]]
    assert "judge.j2" in lines[4] and "dedup_exact" in lines[4]


def test_check_refuses_a_bad_pipeline_in_one_line_with_exit_2(tmp_path):
    path = write(tmp_path, CHAIN.replace("from: subtopics", "from: subtopic"))
    out = cli("check", "--pipeline", str(path), cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [f"nemotron-sdg check: pipeline {path}: stage 'questions': from: 'subtopic' is not "
                                       "a stage of this pipeline (stages: subtopics, questions)"]


SCHEMA = """
  - name: people
    recipe: {prompt_template: "A person who studies {{ topic }}, as JSON:"}
    output_schema: {type: object, required: [name], properties: {name: {type: string}, age: {type: integer}, id: {type: string}}}
  - name: bios
    from: people
    recipe: {prompt_template: "BIO of {{ name }} ({{ age }}, {{ output_id }}) on {{ topic }}"}
"""


def test_a_child_sees_its_parents_schema_fields_and_a_bad_schema_is_refused_naming_its_stage(tmp_path):
    lines = check_file(str(write(tmp_path, SCHEMA)), load_settings(), show_prompts=True)
    assert any(line.startswith("BIO of ") and line.endswith(" on tides") for line in lines), lines
    assert "uses {{ agee }}" in refused(write(tmp_path, SCHEMA.replace("{{ age }}", "{{ agee }}")))
    path = write(tmp_path, SCHEMA.replace("age: {type: integer}", "age: {$ref: 'https://x.test/age.json'}"))
    out = cli("check", "--pipeline", str(path), cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [f"nemotron-sdg check: pipeline {path}: stage 'people': output_schema: "
                                       "$.properties.age.$ref 'https://x.test/age.json': only references inside the "
                                       "schema (#/$defs/...) are followed; nothing is fetched. Inline the referenced "
                                       "schema under $defs"]


def test_the_exports_user_field_must_be_a_field_of_the_training_rows(tmp_path):
    # The questions' rows carry their parent's `subtopic` and the input's `topic`: either can be the
    # user's turn of the trainer files; a misspelt field is refused before anything runs.
    head = "input: in.jsonl\nservers: {main: {profile: local}}\nexports: {user_field: subtopic}\n"
    assert check_file(str(write(tmp_path, CHAIN, head=head)), load_settings())
    message = refused(write(tmp_path, CHAIN, head=head.replace("subtopic}", "subtopik}")))
    assert "exports.user_field: 'subtopik' is not a field of stage 'questions''s rows (they have " in message
    assert "subtopic" in message and "drop user_field to give the prompt sent" in message
