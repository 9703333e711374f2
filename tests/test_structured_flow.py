"""output_schema through real runs on the local server (simulated model) over the OpenAI API:

- engine `nemo-openai`, which cannot constrain: the client sends no constraint, the stand-in
  answers free words, so every reply is invalid: each row is asked max_attempts times, then
  dropped as schema_invalid in filtered.jsonl and counted in the manifest;
- engine `vllm`: the client sends `structured_outputs: {json: schema}`, which the stand-in honours
  as vLLM does (infra/local_server/constrained.py): every row valid at its first attempt, the
  object's fields the kept rows' own; trtllm's `response_format` through the client alone."""

from __future__ import annotations

import json

import pytest
import requests

from flows.generate import generate
from infra.engines.openai import OpenAIClient
from infra.prompting.sampling import SamplingParams
from tests.localserver import running_server

CITY = {"type": "object", "required": ["city", "country"], "additionalProperties": False,
        "properties": {"city": {"type": "string", "minLength": 1}, "country": {"type": "string", "minLength": 1},
                       "rank": {"type": "integer"}}}
PROFILES = {"sim-vllm": {"backend": "local", "engine": "vllm"}, "sim-nemo-openai": {"backend": "local", "engine": "nemo-openai"}}


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(workdir, profile: str) -> tuple[dict, dict, dict, list[dict], list[dict]]:
    src = workdir / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"c{i}", "prompt": f"City number {i} as JSON:"}) + "\n" for i in range(6)))
    out = generate(input_uri=str(src), output_uri=str(workdir / "out"), run_id=profile, profile=profile,
                   prompt_format="raw", sampling=SamplingParams(tokens_to_generate=8, temperature=0.8, random_seed=4),
                   output_schema=CITY, max_attempts=3, shard_size=4)
    root = workdir / "out" / profile
    manifest = json.loads((root / "manifest.json").read_text())
    rows = {r["id"]: r for p in manifest["parts"] for r in jsonl(root / p["name"])}
    kept = [r for p in manifest["curation"]["kept_parts"] for r in jsonl(root / p["name"])]
    dropped = jsonl(root / "filtered.jsonl") if (root / "filtered.jsonl").exists() else []
    return out, manifest, rows, kept, dropped


@pytest.mark.integration
def test_unconstrained_replies_are_asked_again_then_dropped_and_constrained_ones_become_fields(
        prefect_harness, workdir, monkeypatch):
    monkeypatch.setenv("NSDG_LOCAL__ENGINE", "simulated")
    monkeypatch.setenv("NSDG_EXTRA_PROFILES", json.dumps(PROFILES))

    out, manifest, rows, kept, dropped = run(workdir, "sim-nemo-openai")
    assert len(rows) == 6 and kept == [] and out["records_kept"] == 0
    assert manifest["curation"]["filtered"] == out["filtered"] == {"schema_invalid": 6}
    assert sorted(d["id"] for d in dropped) == sorted(rows)
    for d in dropped:  # the last of its 3 replies' error, in filtered.jsonl as every reason is
        assert (d["filter"], d["limit"]) == ("schema_invalid", 3) and d["value"] == "no JSON object ('{') in the reply"
        assert rows[d["id"]]["generation"]["structured"] == {"attempts": 3, "error": d["value"]}
    assert manifest["config"]["output_schema"] == CITY and manifest["config"]["max_attempts"] == 3
    # The part's tokens count every attempt's (the server made them), the rows' only their last reply's.
    assert sum(p["generated_tokens"] for p in manifest["parts"]) == 3 * sum(r["generation"]["generated_tokens"]
                                                                            for r in rows.values())

    out, manifest, rows, kept, dropped = run(workdir, "sim-vllm")
    assert dropped == [] and manifest["curation"]["filtered"] == {} and out["records_kept"] == len(kept) == 6
    for r in kept:
        assert r["generation"]["structured"] == {"attempts": 1}
        assert json.loads(r["completion"]) == {"city": r["city"], "country": r["country"], "rank": r["rank"]}
        assert r["city"] and r["country"] and isinstance(r["rank"], int)


def test_each_engines_constraint_field_reaches_the_server_and_a_malformed_one_is_refused(tmp_path):
    with running_server(tmp_path, "--engine", "simulated") as (url, _):
        sampling = SamplingParams(tokens_to_generate=8, temperature=0.8, random_seed=1)
        for engine in ("vllm", "trtllm"):
            client = OpenAIClient(url, model="nemotron-4-340b-base", engine=engine)
            (got,) = client.complete("A city:", sampling, schema=CITY)
            value = json.loads(got.completion.text)
            assert set(value) == {"city", "country", "rank"}, engine
        free = OpenAIClient(url, model="nemotron-4-340b-base", engine="nemo-openai").complete("A city:", sampling, schema=CITY)
        with pytest.raises(ValueError):
            json.loads(free[0].completion.text)  # no constraint sent: the model's own words
        for field, message in [({"structured_outputs": {"jsn": {}}}, "structured_outputs must be an object with a `json`"),
                               ({"response_format": {"type": "json"}}, "response_format.schema is required")]:
            reply = requests.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, **field}, timeout=30)
            assert reply.status_code == 400 and message in reply.json()["error"]["message"]


PIPELINE = """\
input: topics.jsonl
servers: {main: {profile: sim-vllm}}
defaults:
  prompt_format: raw
  sampling: {tokens_to_generate: 8, temperature: 0.8, random_seed: 2}
stages:
  - name: people
    recipe: {prompt_template: "People who study {{ topic }}, as a JSON list:"}
    output_schema: {type: array, minItems: 2, items: {type: object, required: [name, age],
                    properties: {name: {type: string}, age: {type: integer}}}}
    split: {parser: json_list, into: person}
  - name: bios
    from: people
    recipe: {prompt_template: "A bio of {{ name }}, {{ age }}, who studies {{ topic }}:"}
"""


@pytest.mark.integration
def test_a_pipeline_stage_splits_its_schemad_list_and_its_child_reads_the_items_fields(prefect_harness, workdir, monkeypatch):
    from flows.pipeline import pipeline

    monkeypatch.setenv("NSDG_LOCAL__ENGINE", "simulated")
    monkeypatch.setenv("NSDG_EXTRA_PROFILES", json.dumps(PROFILES))
    (workdir / "topics.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "topic": f"topic {i}"}) + "\n" for i in range(3)))
    (workdir / "p.yaml").write_text(PIPELINE)
    out = pipeline(pipeline=str(workdir / "p.yaml"), run_id="p", output_uri=str(workdir / "out"))
    assert out["stages"] == {"people": 3, "bios": 6}  # 3 valid lists of 2 objects each: 6 children
    people = jsonl(workdir / "out" / "p" / "stages" / "people" / "rows.jsonl")
    assert [r["id"] for r in people] == [f"t{i}.0/people.{j}" for i in range(3) for j in range(2)]
    assert all(isinstance(r["name"], str) and isinstance(r["age"], int) and "output" not in r for r in people)
    bios = [r for p in json.loads((workdir / "out" / "p" / "stages" / "bios" / "manifest.json").read_text())["parts"]
            for r in jsonl(workdir / "out" / "p" / "stages" / "bios" / p["name"])]
    assert sorted(r["prompt"] for r in bios) == sorted(f"A bio of {r['name']}, {r['age']}, who studies {r['topic']}:"
                                                       for r in people)


@pytest.mark.integration
def test_a_hostile_schema_on_the_cli_is_one_line_exit_2_before_any_server(tmp_path, prefect_server):
    import os
    import subprocess
    import sys

    (tmp_path / "in.jsonl").write_text('{"prompt": "ok"}\n')
    env = {**os.environ, **prefect_server.client_env(), "PREFECT_HOME": str(tmp_path / "ph"), "NSDG_LOCAL__ENGINE": "simulated"}

    def run(schema: dict) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", "run", "--input-uri", "in.jsonl", "--output-uri", "out",
                               "--run-id", "r", "--tokens-to-generate", "4", "--output-schema", json.dumps(schema)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    out = run({"type": "object", "properties": {"a": {"$ref": "https://x.test/a.json"}}})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    # The CLI's message for any invalid flow parameter: the parameter and the reason.
    assert "nemotron-sdg run: Invalid flow parameters" in out.stderr and (
        " - output_schema: Value error, $.properties.a.$ref 'https://x.test/a.json': only references inside the schema"
        in out.stderr), out.stderr
    assert not (tmp_path / ".nemotron-sdg" / "servers").exists() and not (tmp_path / "out").exists()
    # A schema with its own $refs runs (Prefect would read a `$ref` object in a parameter as a block's: it goes as text).
    out = run({"$defs": {"word": {"type": "string"}}, "type": "object", "properties": {"w": {"$ref": "#/$defs/word"}},
               "required": ["w"]})
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "r" / "manifest.json").read_text())
    assert manifest["curation"]["filtered"] == {"schema_invalid": 1}  # the local nemo engine: free words, no JSON
