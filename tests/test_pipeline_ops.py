"""What a pipeline run shows in Prefect (issue 24 "seen from the outside", issue 27): task runs named
after their stage (`generate-facts-shard-0`, `curate-facts`), flow runs named after the run id, the run page's
per-stage counts (`stages-{run}`) and a few finished rows of each stage (`rows-{run}-{stage}`) and of
a plain run (`rows-{run}`); and the judge inside a pipeline's stage, on the pipeline's one server.
In-process flows on the simulated local server and the session's Prefect API."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks.faults import local_env
from flows.artifacts import sample_rows

pytestmark = pytest.mark.integration

PIPELINE = """\
input: topics.jsonl
servers:
  main: {profile: local}
defaults:
  prompt_format: raw
  sampling: {temperature: 0.8, random_seed: 5, tokens_to_generate: 8}
  batch_size: 4
stages:
  - name: words
    recipe: {prompt_template: "Topic: {{ topic }}\\nWords:"}
    split: {parser: regex, pattern: '(\\S+)', into: word, max_items: 2}
  - name: facts
    from: words
    recipe: {prompt_template: "About {{ word }} in {{ topic }}:"}
    judge: {template: "Rate the fact about {{ word }}: {{ completion }}\\nRating:", tokens_to_generate: 3}
"""
REQUEST = re.compile(r"request (\d+): (\d+) sentences, (\d+) tokens generated")


def flow_run_facts(flow_run_id) -> tuple[str, list[str], dict[str, list[dict]]]:
    """The flow run's name, its task runs' names and its artifacts (key -> a table's rows, else the type)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                                FlowRunFilterId)

    with get_client(sync_client=True) as client:
        name = client.read_flow_run(flow_run_id).name
        tasks = [t.name for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))]
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    # A key sent again (stages-…, after each stage) has a version per send: the latest wins.
    tables = {a.key: (json.loads(a.data) if isinstance(a.data, str) else a.data) if a.type == "table" else a.type
              for a in sorted(artifacts, key=lambda a: a.created)}
    return name, tasks, tables


@pytest.fixture(scope="module")
def pipeline_run(prefect_harness, tmp_path_factory):
    """One two-stage pipeline run (words -> judged facts), in-process; its flow run's facts."""
    from flows.pipeline import pipeline

    workdir = tmp_path_factory.mktemp("pipeops")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        for k, v in local_env(workdir).items():
            mp.setenv(k, v)
        (workdir / "topics.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "topic": f"topic {i}"}) + "\n"
                                                      for i in range(3)))
        (workdir / "pipeline.yaml").write_text(PIPELINE)
        state = pipeline("pipeline.yaml", run_id="ops1", output_uri=str(workdir / "out"), return_state=True)
        result = state.result()
    return workdir, result, flow_run_facts(state.state_details.flow_run_id), state.state_details.flow_run_id


def test_task_runs_carry_their_stage_and_the_flow_run_its_run_id(pipeline_run):
    _, _, (name, tasks, _), _ = pipeline_run
    assert name == "ops1"
    assert "generate-words-shard-0" in tasks and "generate-facts-shard-0" in tasks, tasks
    assert not any(t.startswith("generate-shard-") for t in tasks), tasks
    # ... and so do the stage's other steps (a child stage's plan is made as its rows come: no plan task)
    assert {"plan-words", "curate-words", "curate-facts", "close-parts-words", "close-parts-facts",
            "publish-manifest-words", "publish-manifest-facts"} <= set(tasks), sorted(tasks)


def test_a_streamed_stages_curation_task_records_no_input_per_part(pipeline_run):
    """Issue 24 (orchestrator memory flat in the shard count): `curate-facts` is called as each shard of
    facts becomes final, with every part since shard 0. Prefect must not walk them and record each as
    an input of the task run (the shard task that made it): that grew with shards squared (measured:
    41 kB more RSS per shard at 1,100 shards, and half the run's time)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    _, _, _, flow_run_id = pipeline_run
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    streamed = [t for t in runs if t.name == "curate-facts" and "stage" in t.task_inputs]  # not the stage end's `curate`
    assert streamed, sorted(t.name for t in runs)
    assert all(not t.task_inputs["parts"] for t in streamed), [t.task_inputs for t in streamed]


def test_the_run_page_shows_counts_by_stage_and_the_first_rows_of_each(pipeline_run):
    workdir, _, (_, _, tables), _ = pipeline_run
    manifest = json.loads((workdir / "out" / "ops1" / "manifest.json").read_text())
    counts = {r["stage"]: r for r in tables["stages-ops1"]}
    for entry in manifest["stages"]:
        row = counts[entry["stage"]]
        assert row["state"] == "done" and row["rows out"] == str(entry["rows_out"]) and row["kept"] == str(entry["kept"])
    assert counts["words"]["rows passed on"] == str(manifest["stages"][0]["rows"])
    # words: its first generated rows, as in its kept part (no judge or filters: every row kept)
    first = [json.loads(line) for line in (workdir / "out" / "ops1" / "stages" / "words" / "part-00000.jsonl")
             .read_text().splitlines()[:5]]
    shown = tables["rows-ops1-words"]
    assert [r["id"] for r in shown] == [r["id"] for r in first] and shown[0]["completion"] == first[0]["completion"]
    # each stage's progress bar and summary, keyed by the pipeline's run and the stage (keys are global)
    assert tables["progress-ops1-words"] == tables["progress-ops1-facts"] == "progress"
    assert {"summary-ops1-words", "summary-ops1-facts"} <= set(tables)
    # facts kept nothing (its judge read no score in the simulated words), so it shows no rows table
    assert "rows-ops1-facts" not in tables


def test_the_judge_works_inside_a_pipeline_stage_on_the_pipelines_one_server(pipeline_run):
    workdir, result, _, _ = pipeline_run
    stage_dir = workdir / "out" / "ops1" / "stages" / "facts"
    manifest = json.loads((workdir / "out" / "ops1" / "manifest.json").read_text())
    facts = manifest["stages"][1]
    rows = [json.loads(line) for line in (stage_dir / "part-00000.jsonl").read_text().splitlines()]
    judged = [json.loads(line) for line in (stage_dir / "part-00000.jsonl.judge.jsonl").read_text().splitlines()]
    # every row of the stage judged once, with its own prompt (the parent's field in the judge's template)
    assert sorted(j["id"] for j in judged) == sorted(r["id"] for r in rows) and all(j["reply"] for j in judged)
    assert facts["filtered"] == {"judge_unparsed": len(rows)} and facts["kept"] == 0  # words: no score in them
    assert json.loads((stage_dir / "manifest.json").read_text())["curation"]["config"]["judge"]["template"].startswith("Rate")
    # ... on the same server as both stages' generation: one launch, whose log served the judge's requests
    assert manifest["server_launches"] == 1
    served = [(int(m[2]), int(m[3])) for m in
              REQUEST.finditer((workdir / "work" / "servers" / "ops1" / "replica-0" / "server.log").read_text())]
    generated = manifest["stages"][0]["rows_out"] + facts["rows_out"]
    assert sum(s for s, _ in served) == 1 + generated + len(rows)  # the readiness probe, both stages, the judge
    assert result["records_kept"] == 0


def test_sample_rows_show_the_prompts_end_and_the_replys_start_cut_to_fit():
    long = {"id": "a", "prompt": "few-shot " * 40 + "Topic: X\nFacts:", "completion": "y" * 500, "judge": {"score": 4.0}}
    lines = [json.dumps(long), "not json", "[1]", json.dumps({"id": "b", "prompt": "p", "completion": "c"})]
    shown = sample_rows(lines, n=5, width=60)
    assert [r["id"] for r in shown] == ["a", "b"]
    assert shown[0]["prompt (end)"].endswith("Topic: X\nFacts:") and shown[0]["prompt (end)"].startswith("…")
    assert len(shown[0]["prompt (end)"]) == 30 and len(shown[0]["completion"]) == 60 and shown[0]["score"] == "4.0"
    assert shown[1] == {"id": "b", "prompt (end)": "p", "completion": "c"}
    assert len(sample_rows([json.dumps(long)] * 9)) == 5


def test_a_plain_run_is_named_after_its_run_id_and_shows_its_first_rows(prefect_harness, workdir, monkeypatch):
    from flows.generate import generate
    from infra.prompting.sampling import SamplingParams

    for k, v in local_env(workdir).items():
        monkeypatch.setenv(k, v)
    src = workdir / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Tell me about {i}."}) + "\n" for i in range(7)))
    state = generate(input_uri=str(src), output_uri=str(workdir / "out"), run_id="plain-1", shard_size=4, batch_size=4,
                     sampling=SamplingParams(tokens_to_generate=6), return_state=True)
    state.result()
    name, tasks, tables = flow_run_facts(state.state_details.flow_run_id)
    assert name == "plain-1" and "generate-shard-0" in tasks and "generate-shard-1" in tasks
    first = [json.loads(line) for line in (workdir / "out" / "plain-1" / "part-00000.jsonl").read_text().splitlines()]
    assert [r["id"] for r in tables["rows-plain-1"]] == [r["id"] for r in first]  # a 4-row part: all 4 shown
    assert tables["rows-plain-1"][0]["completion"] == first[0]["completion"]


# Replies SmolLM2-135M-Instruct (the local real model) wrote to the worked example's own templates
# (`make pipeline`, 2026-12-06): the example's split settings must cut what that model writes.
REAL_REPLIES = {
    "subtopics": "1. Ancient Egyptian art and architecture\n2. Ancient Chinese architecture and engineering\n"
                 "3. Ancient Greek architecture and engineering\n4. Ancient Roman architecture and engineering",
    "questions": "Who built the Colosseum?\nAre there still ancient Roman ruins left standing?\n"
                 "What was the purpose of the Colosseum?",
}


def test_the_worked_examples_splits_cut_the_real_models_replies_and_make_pipeline_runs_that_file():
    import subprocess
    from pathlib import Path

    from infra.pipeline.files import pipeline_from_text
    from infra.recipes.split import Split, split_reply

    repo = Path(__file__).resolve().parents[1]
    example = pipeline_from_text((repo / "examples/pipeline/pipeline.yaml").read_text(), "pipeline.yaml")
    subtopics = split_reply(REAL_REPLIES["subtopics"], example.stage("subtopics").split)
    assert isinstance(subtopics, Split) and subtopics.items == ["Ancient Egyptian art and architecture",
                                                                "Ancient Chinese architecture and engineering",
                                                                "Ancient Greek architecture and engineering"]
    questions = split_reply(REAL_REPLIES["questions"], example.stage("questions").split)
    assert isinstance(questions, Split) and questions.items[0] == "Who built the Colosseum?" and len(questions.items) == 3
    make = subprocess.run(["make", "-n", "pipeline", "VENV=/nonexistent", "STAMP="], cwd=repo, capture_output=True,
                          text=True, timeout=60)
    assert "run --pipeline examples/pipeline/pipeline.yaml" in make.stdout, make.stdout + make.stderr
