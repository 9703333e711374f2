"""A changed pipeline file rerun under the same run_id pays only for what the change invalidates
(issue 24 "What is checkpointed"): the CLI in subprocesses against the local simulated server, whose
stats file (`--stats-file`: one line per generation, with each prompt's first characters) is the
request log the assertions read.

- a new template in stage 2 of 3 asks again for stages 2 and 3 only, and stage 1's files stay
  byte for byte; the old directories are moved aside, never mixed with the new parts;
- a new filter in stage 1 alone asks nothing of stage 1, and stage 2 asks only for the rows of the
  parents it newly keeps (stage 3 for their children); the rows of parents still kept are the same
  completions; back to the first filter, nothing at all is asked and no server starts; a filter
  on stage 2 alone drops stage 3's rows of the rows it drops, again with no request and no server;
- a stage renamed while its child stays, or a new input: one line naming stage and field, exit 2,
  nothing asked, nothing moved."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from benchmarks.faults import local_env

pytestmark = pytest.mark.integration

PIPELINE = """\
input: topics.jsonl
servers:
  main: {profile: local}
defaults:
  prompt_format: raw
  sampling: {temperature: 0.8, random_seed: 5, tokens_to_generate: 6}
  batch_size: 4
stages:
  - name: words
    recipe: {prompt_template: "Topic: {{ topic }}\\nWords:"}
    filters: {must_not_match: [FIRST]}
  - name: facts
    from: words
    recipe: {prompt_template: "Fact on {{ topic }}:{{ completion }}"}
  - name: notes
    from: facts
    recipe: {prompt_template: "Note:{{ completion }}\\n"}
"""
TOPICS = 10
FIRST, SECOND = '"\\\\buseful\\\\b"', '"\\\\bmodel\\\\b"'  # stage 1's filter before and after: each drops some rows


def pipeline_file(stage1_filter: str = FIRST) -> str:
    return PIPELINE.replace("FIRST", stage1_filter)


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def part_rows(stage_dir) -> list[dict]:
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    return [r for p in manifest["parts"] for r in jsonl(stage_dir / p["name"])]


class Pipeline:
    """One pipeline run directory, its file, and the server's request log, run through the CLI."""

    def __init__(self, workdir, env, run_id: str):
        self.workdir, self.env, self.run_id = workdir, env, run_id
        self.stats = workdir / "stats.jsonl"
        self.run_dir = workdir / "out" / run_id

    def run(self, text: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        """The CLI's result and the prompts (their heads) the server was asked for in this run."""
        (self.workdir / "pipeline.yaml").write_text(text)
        seen = len(self.stats.read_text().splitlines()) if self.stats.exists() else 0
        done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--pipeline", "pipeline.yaml", "--run-id",
                               self.run_id, "--output-uri", str(self.workdir / "out"), "--shard-size", "3"],
                              cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=300)
        lines = self.stats.read_text().splitlines()[seen:] if self.stats.exists() else []
        return done, [h for line in lines for h in json.loads(line)["heads"]]

    def stage(self, name: str):
        return self.run_dir / "stages" / name

    def manifest(self) -> dict:
        return json.loads((self.run_dir / "manifest.json").read_text())

    def completions(self, name: str) -> dict[tuple[str, int], str]:
        return {(r["id"], r["sample"]): r["completion"] for r in part_rows(self.stage(name))}


@pytest.fixture
def pipe(prefect_server, workdir):
    (workdir / "topics.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "topic": f"topic {i}"}) + "\n"
                                                  for i in range(TOPICS)))
    env = {**os.environ, **local_env(workdir, "--stats-file", str(workdir / "stats.jsonl")),
           **prefect_server.client_env(), "PREFECT_HOME": str(workdir / "prefect")}
    return Pipeline(workdir, env, "inv")


def asked(heads: list[str], start: str) -> int:
    return sum(h.startswith(start) for h in heads)


def test_a_new_template_in_stage_2_asks_again_for_stages_2_and_3_only(pipe):
    done, first = pipe.run(pipeline_file())
    assert done.returncode == 0, done.stderr[-4000:]
    words = pipe.stage("words")
    kept_words = pipe.manifest()["stages"][0]["kept"]
    assert asked(first, "Topic:") == TOPICS and asked(first, "Fact on") == kept_words > 0
    before = {p.name: p.read_bytes() for p in words.iterdir() if p.is_file() and p.name != "manifest.json"}
    old_facts = pipe.completions("facts")

    done, heads = pipe.run(pipeline_file().replace("Fact on {{ topic }}:", "Fact about {{ topic }}:"))
    assert done.returncode == 0, done.stderr[-4000:]
    manifest = pipe.manifest()
    counts = {s["stage"]: s for s in manifest["stages"]}
    # The server's own log: no stage-1 prompt, every stage-2 record once with its new template, every stage-3 record.
    assert asked(heads, "Topic:") == 0 and asked(heads, "Fact on") == 0
    assert asked(heads, "Fact about") == counts["facts"]["records_in"] == kept_words
    assert asked(heads, "Note:") == counts["notes"]["records_in"] == counts["facts"]["kept"]
    assert manifest["server_launches"] == 1
    # Stage 1 untouched, byte for byte; stage 2's parts all new (no old part mixed in), the old ones moved aside.
    assert {p.name: p.read_bytes() for p in words.iterdir() if p.is_file() and p.name != "manifest.json"} == before
    assert all(r["prompt"].startswith("Fact about") for r in part_rows(pipe.stage("facts")))
    assert pipe.completions("facts").keys() == old_facts.keys()
    moved = sorted(p.name.split("-")[0] for p in (pipe.run_dir / "superseded").iterdir())
    assert moved == ["facts", "notes"]
    (old,) = (pipe.run_dir / "superseded").glob("facts-*")
    assert {(r["id"], r["sample"]): r["completion"] for r in part_rows(old)} == old_facts
    # One line per invalidated stage, saying why.
    assert "stage facts: recipe changed: generated again" in done.stderr, done.stderr[-3000:]
    assert "stage notes: its parent facts is generated again: generated again" in done.stderr

    # What cannot change under one run id: one line naming stage and field, exit 2, nothing asked or moved.
    moved = sorted((pipe.run_dir / "superseded").iterdir())
    servers = sorted((pipe.workdir / "work" / "servers" / "inv").iterdir())
    renamed = pipeline_file().replace("name: words", "name: terms").replace("from: words", "from: terms")
    done, heads = pipe.run(renamed)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "stage 'words': name: not in the file any more, and stage 'facts' read its rows" in done.stderr
    (pipe.workdir / "other.jsonl").write_text(json.dumps({"id": "t0", "topic": "other"}) + "\n")
    done, more = pipe.run(pipeline_file().replace("input: topics.jsonl", "input: other.jsonl"))
    assert done.returncode == 2 and "stage 'words': input: changed since the run began" in done.stderr
    assert heads == more == [] and sorted((pipe.workdir / "work" / "servers" / "inv").iterdir()) == servers
    assert sorted((pipe.run_dir / "superseded").iterdir()) == moved


def test_a_new_filter_in_stage_1_asks_only_for_the_children_of_rows_it_newly_keeps(pipe):
    done, _ = pipe.run(pipeline_file())
    assert done.returncode == 0, done.stderr[-4000:]
    kept_before = {r["id"].split(".")[0] for r in jsonl(pipe.stage("words") / "rows.jsonl")}
    assert 0 < len(kept_before) < TOPICS
    old_facts, old_notes = pipe.completions("facts"), pipe.completions("notes")
    words_parts = {p.name: p.read_bytes() for p in pipe.stage("words").glob("part-*")}

    done, heads = pipe.run(pipeline_file(SECOND))
    assert done.returncode == 0, done.stderr[-4000:]
    kept_now = {r["id"].split(".")[0] for r in jsonl(pipe.stage("words") / "rows.jsonl")}
    new, gone = kept_now - kept_before, kept_before - kept_now
    assert new and gone, (kept_before, kept_now)  # the new filter keeps some rows it dropped and drops some it kept
    # No stage-1 request; stage 2 asked for the newly kept parents only, stage 3 for their children only.
    assert asked(heads, "Topic:") == 0
    assert asked(heads, "Fact on") == len(new) and asked(heads, "Note:") == len(new)
    assert {p.name: p.read_bytes() for p in pipe.stage("words").glob("part-*")} == words_parts
    facts, notes = pipe.completions("facts"), pipe.completions("notes")
    assert {i.split(".")[0] for i, _ in facts} == {i.split(".")[0] for i, _ in notes} == kept_now
    # The rows of parents still kept: the very completions they had; those of parents dropped: gone.
    assert {k: v for k, v in old_facts.items() if k[0].split(".")[0] in kept_now} == \
        {k: v for k, v in facts.items() if k[0].split(".")[0] not in new}
    assert {k: v for k, v in old_notes.items() if k[0].split(".")[0] in kept_now} == \
        {k: v for k, v in notes.items() if k[0].split(".")[0] not in new}
    assert "stage words: filters changed: curated again with no server" in done.stderr, done.stderr[-3000:]
    assert "stage facts: its parent words keeps other rows" in done.stderr

    # Back to the first filter: every child is one made before, so nothing is asked and no server starts.
    done, heads = pipe.run(pipeline_file())
    assert done.returncode == 0, done.stderr[-4000:]
    assert heads == [] and pipe.manifest()["server_launches"] == 0
    assert pipe.completions("facts") == old_facts and pipe.completions("notes") == old_notes

    # A middle stage's filter alone: curated again with no server, its dropped rows' children dropped, nothing asked.
    texts = list(old_facts.values())
    word = next(w for w in sorted({w for t in texts for w in re.findall(r"[a-z]+", t)})
                if 0 < sum(re.search(rf"\b{w}\b", t) is not None for t in texts) < len(texts))
    done, heads = pipe.run(pipeline_file().replace("    from: words\n",
                                                   f'    from: words\n    filters: {{must_not_match: ["\\\\b{word}\\\\b"]}}\n'))
    assert done.returncode == 0, done.stderr[-4000:]
    assert heads == [] and pipe.manifest()["server_launches"] == 0
    kept = {r["id"] for r in jsonl(pipe.stage("facts") / "rows.jsonl")}
    assert 0 < len(kept) < len(old_facts) and pipe.completions("facts") == old_facts
    assert pipe.completions("notes") == {k: v for k, v in old_notes.items() if k[0] in kept}
    assert "stage facts: filters changed: curated again with no server" in done.stderr, done.stderr[-3000:]


def test_a_root_template_turned_back_moves_every_stage_of_the_first_run_back_and_asks_nothing(pipe):
    done, _ = pipe.run(pipeline_file())
    assert done.returncode == 0, done.stderr[-4000:]
    words = {p.name: p.read_bytes() for p in pipe.stage("words").glob("part-*")}
    old_facts, old_notes = pipe.completions("facts"), pipe.completions("notes")
    done, heads = pipe.run(pipeline_file().replace("Topic: {{ topic }}", "Subject: {{ topic }}"))
    assert done.returncode == 0 and asked(heads, "Subject:") == TOPICS, done.stderr[-4000:]

    # The first template again: the same settings over the same input, so the first run's directories come back.
    done, heads = pipe.run(pipeline_file())
    assert done.returncode == 0, done.stderr[-4000:]
    assert heads == [] and pipe.manifest()["server_launches"] == 0
    assert {p.name: p.read_bytes() for p in pipe.stage("words").glob("part-*")} == words
    assert pipe.completions("facts") == old_facts and pipe.completions("notes") == old_notes
    assert "stage words: recipe changed: its directory made under these very settings before (superseded/words-" \
        in done.stderr, done.stderr[-3000:]
    aside = [p for p in (pipe.run_dir / "superseded").iterdir() if any(p.iterdir())]  # the second template's, only
    assert len(aside) == 3 and all(r["prompt"].startswith("Subject:") for r in part_rows(next(
        p for p in aside if p.name.startswith("words-"))))


def test_a_reward_stages_new_scorer_is_not_said_to_need_no_server():
    """Its `kept` hash holds its reward model: the line says it is scored again, not "no server"."""
    from infra.pipeline.hashes import StageHash
    from infra.pipeline.invalidate import changes, entry

    parents, kinds = {"answers": None, "rm": "answers"}, {"answers": "generate", "rm": "reward"}
    first = {"answers": StageHash("g1", "k1", "l1", {"recipe": "r"}), "rm": StageHash("g2", "k2", "l2", {"server": "s1"})}
    before = {n: entry(h, parents[n], []) for n, h in first.items()}
    (got,) = changes(before, {**first, "rm": StageHash("g2", "k2b", "l2", {"server": "s2"})}, parents, kinds, "p1")
    assert (got.action, got.why) == ("rescore", "server changed") and "no server" not in got.line
    assert "scored again, with its reward server, only where its scorer changed" in got.line


def test_on_s3_a_stage_is_moved_aside_and_its_completions_given_back_to_the_same_requests(s3_settings, s3_bucket):
    """The move and the reuse go through the output stores: on S3 (moto over HTTP) as on a local disk."""
    from infra.generation import ShardJob, spill_header
    from infra.pipeline.hashes import StageHash
    from infra.pipeline.invalidate import reconcile, superseded_store
    from infra.pipeline.reuse import Reuse
    from infra.prompting.dataset import Record, Shard
    from infra.prompting.sampling import SamplingParams
    from infra.run.manifest import PartInfo
    from infra.storage import open_output_store
    from infra.storage.spill import Spill

    uri = f"s3://{s3_bucket}/runs"
    stage = open_output_store(f"{uri}/p1/stages", "facts", s3_settings.s3, s3_settings.work_path("staging"))
    config = {"input_sha256": "rows of parent kept k1", "recipe": "r"}
    stage.write_bytes("run.json", json.dumps({"config_hash": "c1", "config": config}).encode())
    rows = [{"id": f"t{i}.0/words.0", "sample": 0, "prompt": f"Fact on {i}:", "completion": f" fact {i}",
             "generation": {"finish_reason": "length", "prompt_match": "exact", "generated_tokens": 2}} for i in range(2)]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    stage.write_bytes("part-00000.jsonl", data)
    stage.write_bytes("part-00000.jsonl.state.json", PartInfo("part-00000.jsonl", 0, 2, stage.sha256("part-00000.jsonl"),
                                                              len(data), "c1", 0, 1).to_json())
    root = open_output_store(uri, "p1", s3_settings.s3, s3_settings.work_path("staging"))
    parents, kinds = {"words": None, "facts": "words"}, {"words": "generate", "facts": "generate"}
    hashes = {"words": StageHash("g1", "k1", "l1", {"filters": "f1"}), "facts": StageHash("g2", "k2", "l2", {})}
    reconcile(root, uri, "p1", hashes, parents, kinds, s3_settings)
    # words' filters alone change: facts (made from words' kept rows) moves aside, whole, and is recorded
    later = {"words": StageHash("g1", "k1b", "l1", {"filters": "f2"}), "facts": StageHash("g2b", "k2b", "l2", {})}
    found, superseded = reconcile(root, uri, "p1", later, parents, kinds, s3_settings)
    assert [(c.stage, c.action) for c in found] == [("words", "recurate"), ("facts", "reuse")]
    assert stage.list_names() == [] and superseded["facts"] == ["facts-g2"]
    old = superseded_store(uri, "p1", "facts-g2", s3_settings)
    assert old.list_names() == ["part-00000.jsonl", "part-00000.jsonl.state.json", "run.json"]
    assert json.loads(root.read_bytes("pipeline.json"))["facts"]["superseded"] == ["facts-g2"]
    # made again from other parent rows: t1 is the same request (reused), t2 is new (asked)
    reuse = Reuse.load([old], {**config, "input_sha256": "rows of parent kept k1b"}, stage)
    assert Reuse.load([old], {**config, "recipe": "r2"}, stage) is None  # other settings: nothing reused
    shard = Shard(0, [Record("t1.0/words.0", "Fact on 1:", 0), Record("t2.0/words.0", "Fact on 2:", 1)])
    job = ShardJob("facts", "m", "c2", SamplingParams(), 4)
    assert reuse.prepare(stage, shard, job) is False  # one of two: the shard goes to a server for the other
    with Spill.open(stage.staging_dir(), shard.name, spill_header(stage, shard, job)) as spill:
        assert {p: r["completion"]["text"] for p, r in spill.kept.items()} == {0: " fact 1"}
