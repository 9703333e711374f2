"""`nemotron-sdg run --pipeline`: three stages on the local simulated server, through the CLI: every
stage's rows exactly once, ids unique, lineage and the parent's fields right, ONE server start for
every stage, and a rerun that generates nothing and starts no server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from benchmarks.faults import local_env
from infra.recipes.lineage import lineage_of

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
    split: {parser: regex, pattern: '(\\S+)', into: word, max_items: 3}
  - name: facts
    from: words
    recipe: {prompt_template: "About {{ word }} in {{ topic }} ({{ completion }}):", samples_per_prompt: 2}
    filters: {dedup_exact: true, must_not_match: ["the"]}
  - name: notes
    from: facts
    recipe: {prompt_template: "Note on {{ word }}: {{ completion }}\\n"}
    split: {parser: regex, pattern: '(\\S+)', into: token, max_items: 2}
"""
STAGES = ["words", "facts", "notes"]


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def part_rows(stage_dir) -> list[dict]:
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    return [r for p in manifest["parts"] for r in jsonl(stage_dir / p["name"])]


def run_cli(workdir, env, *flags) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "run", *flags], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)


def test_three_stages_on_one_server_each_row_once_with_lineage_then_a_rerun_generates_nothing(prefect_server, workdir):
    (workdir / "topics.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "topic": f"topic {i}"}) + "\n"
                                                  for i in range(5)))
    (workdir / "pipeline.yaml").write_text(PIPELINE)
    env = {**os.environ, **local_env(workdir), **prefect_server.client_env(), "PREFECT_HOME": str(workdir / "prefect")}
    flags = ["--pipeline", "pipeline.yaml", "--run-id", "p1", "--output-uri", str(workdir / "out")]
    done = run_cli(workdir, env, *flags)
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = workdir / "out" / "p1"
    assert done.stdout.strip().splitlines()[-1] == str(run_dir / "manifest.json")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    # One server for the three stages: one launch, one replica directory.
    assert manifest["server_launches"] == 1
    assert sorted(p.name for p in (workdir / "work" / "servers" / "p1").iterdir()) == ["replica-0"]

    parent_rows = {r["id"]: r for r in jsonl(workdir / "topics.jsonl")}
    parent_lineage = {k: [] for k in parent_rows}
    for i, (stage, info) in enumerate(zip(STAGES, manifest["stages"])):
        stage_dir = run_dir / "stages" / stage
        samples = 2 if stage == "facts" else 1
        generated = part_rows(stage_dir)
        # Every record of the stage (its parent's rows) generated exactly once per sample.
        assert Counter((r["id"], r["sample"]) for r in generated) == {(k, s): 1 for k in parent_rows for s in range(samples)}
        assert info["records_in"] == len(parent_rows) and info["rows_out"] == len(generated)
        rows = jsonl(stage_dir / "rows.jsonl")
        assert info["rows"] == len(rows) > 0
        assert len({r["id"] for r in rows}) == len(rows)  # ids unique
        for row in rows:
            # lineage: the parent row's, then the parent row; the id parses back to the same chain
            parent_id = row["lineage"][-1]
            assert row["lineage"] == [*parent_lineage[parent_id], parent_id]
            assert lineage_of(row["id"], STAGES[: i + 1]) == row["lineage"]
            assert row["id"].startswith(f"{parent_id}.") and f"/{stage}." in row["id"]
            assert row["topic"] == parent_rows[parent_id]["topic"]  # the input's field passed on
        if stage == "facts":  # the parent's fields were visible to the template (word, its completion)
            # Its children read its kept rows only (no split here: one row each).
            assert 0 < info["kept"] < info["rows_out"] and sum(info["filtered"].values()) == info["rows_out"] - info["kept"]
            assert len(rows) == info["kept"] and not any("the" in r["completion"] for r in rows)
            for r in generated:
                parent = parent_rows[r["id"]]
                assert r["prompt"] == f"About {parent['word']} in {parent['topic']} ({parent['completion']}):"
        if stage == "notes":  # a reserved field of the parent (its reply) moves under `parent`
            assert all(r["parent"]["completion"] == parent_rows[r["lineage"][-1]]["completion"] for r in rows)
        parent_lineage = {r["id"]: r["lineage"] for r in rows}
        parent_rows = {r["id"]: r for r in rows}
    assert manifest["training_set"] == [str(run_dir / "stages" / "notes" / n["name"]) for n in
                                        json.loads((run_dir / "stages" / "notes" / "manifest.json").read_text())["parts"]]

    # The rerun: every shard already published, so nothing is generated and no server started.
    parts_before = {p: p.read_bytes() for p in run_dir.glob("stages/*/part-*.jsonl")}
    # What a kill while the manifest or an export was written leaves (their writers' temp names): discarded.
    left = [run_dir / ".manifest.json.k1ll3d.tmp", run_dir / "data" / ".sft.jsonl.k1ll3d.tmp"]
    for path in left:
        path.write_text("half")
    again = run_cli(workdir, env, *flags)
    assert again.returncode == 0, again.stderr[-4000:]
    assert not any(p.exists() for p in left)
    assert json.loads((run_dir / "manifest.json").read_text())["server_launches"] == 0
    assert {p: p.read_bytes() for p in run_dir.glob("stages/*/part-*.jsonl")} == parts_before
    assert sorted(p.name for p in (workdir / "work" / "servers" / "p1").iterdir()) == ["replica-0"]


def test_a_bad_pipeline_or_a_run_flag_is_one_line_exit_2_before_any_server(workdir):
    (workdir / "topics.jsonl").write_text('{"id": "t0", "topic": "x"}\n')
    (workdir / "pipeline.yaml").write_text(PIPELINE.replace("from: words", "from: nowhere"))
    env = {**os.environ, **local_env(workdir)}
    bad = run_cli(workdir, env, "--pipeline", "pipeline.yaml", "--output-uri", str(workdir / "out"))
    assert bad.returncode == 2 and "'nowhere' is not a stage" in bad.stderr and "Traceback" not in bad.stderr
    (workdir / "pipeline.yaml").write_text(PIPELINE)
    flag = run_cli(workdir, env, "--pipeline", "pipeline.yaml", "--temperature", "0.3")
    assert flag.returncode == 2 and "'sampling' is set per stage in the pipeline file" in flag.stderr
    assert not (workdir / "work" / "servers").exists()


def test_a_stage_that_keeps_nothing_stops_the_pipeline_in_one_line_and_releases_the_server(prefect_server, workdir):
    from benchmarks.faults import local_servers

    (workdir / "topics.jsonl").write_text('{"id": "t0", "topic": "x"}\n')
    (workdir / "pipeline.yaml").write_text(PIPELINE.replace("max_items: 3}", "max_items: 3}\n    filters: {must_not_match: ['.']}", 1))
    env = {**os.environ, **local_env(workdir), **prefect_server.client_env(), "PREFECT_HOME": str(workdir / "prefect")}
    done = run_cli(workdir, env, "--pipeline", "pipeline.yaml", "--run-id", "p2", "--output-uri", str(workdir / "out"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "stage 'words' left no rows for stage 'facts' (1 generated, 0 kept" in done.stderr
    assert local_servers(workdir) == 0


def test_a_rerun_with_a_changed_stage_names_what_it_invalidates_and_the_same_hashes_resume(tmp_path):
    from infra.errors import ConfigError
    from infra.pipeline.hashes import StageHash
    from infra.pipeline.invalidate import changes, reconcile
    from infra.storage.local import LocalOutputStore

    class Settings:  # what reconcile reads of the settings: where S3 stages (unused for a local output)
        s3 = None

        @staticmethod
        def work_path(name):
            return tmp_path / "work" / name

    def h(gen, kept, lineage, **groups):
        return StageHash(gen, kept, lineage, {"recipe": "r", "filters": "f", **groups})

    parents, kinds = {"words": None, "facts": "words"}, {"words": "generate", "facts": "generate"}
    first = {"words": h("g1", "k1", "l1"), "facts": h("g2", "k2", "l2")}
    root = LocalOutputStore(tmp_path / "p1")
    assert reconcile(root, str(tmp_path), "p1", first, parents, kinds, Settings)[0] == []
    assert reconcile(root, str(tmp_path), "p1", first, parents, kinds, Settings)[0] == []  # the same file: resumes
    before = json.loads(root.read_bytes("pipeline.json"))
    # words' filters alone: words re-curated, facts made again reusing rows
    got = changes(before, {"words": h("g1", "k1b", "l1", filters="f2"), "facts": h("g2b", "k2b", "l2")}, parents, kinds, "p1")
    assert [(c.stage, c.action, c.why) for c in got] == [("words", "recurate", "filters changed"),
                                                         ("facts", "reuse", "its parent words keeps other rows")]
    # words' recipe: both generated again
    got = changes(before, {"words": h("g1c", "k1c", "l1c", recipe="r2"), "facts": h("g2c", "k2c", "l2c")}, parents, kinds, "p1")
    assert [(c.stage, c.action, c.why) for c in got] == [("words", "regenerate", "recipe changed"),
                                                         ("facts", "regenerate", "its parent words is generated again")]
    with pytest.raises(ConfigError, match=r"^pipeline run p1: stage 'words': input: changed since the run began"):
        changes(before, {**first, "words": h("g1", "k1", "l1d", input="i2")}, parents, kinds, "p1")
    with pytest.raises(ConfigError, match=r"stage 'words': name: not in the file any more, and stage 'facts' read"):
        changes(before, {"terms": first["words"], "facts": first["facts"]}, {"terms": None, "facts": "terms"}, kinds, "p1")
    # a run recorded before the settings groups existed: a generation change is refused, as it was
    with pytest.raises(ConfigError, match=r"stage\(s\) facts changed since the run began"):
        changes({"words": {"generation": "g1", "kept": "k1"}, "facts": {"generation": "g2", "kept": "k2"}},
                {**first, "facts": h("g2b", "k2b", "l2")}, parents, kinds, "p1")


def test_a_parents_reply_moves_under_parent_and_its_prompt_stays_behind():
    from infra.pipeline.rows import carried

    row = {"id": "a.0/s.0", "sample": 0, "prompt": "p2", "completion": "c2", "input_completion": "c1",
           "input_prompt": "p1", "input_sample": 0, "parent": {"completion": "c0"}, "topic": "t"}
    assert carried(row) == {"id": "a.0/s.0", "sample": 0, "prompt": "p2", "completion": "c2", "topic": "t",
                            "parent": {"completion": "c1", "parent": {"completion": "c0"}}}
