"""A streamed pipeline stage's dedup (issue 24): its tables stay open across the stage's shards, fed in
input order, so each kept part is read a fixed number of times whatever its place (before, a shard's
curation re-read every earlier kept part: about S²/2 reads over S shards), and the kept rows are what
one curation pass over the whole stage keeps ("the first in input order"). A real pipeline run,
in-process on the simulated local server; reads counted through the store."""

from __future__ import annotations

import json
import shutil

import pytest

from benchmarks.faults import local_env
from infra.recipes.curate import Curation, curate
from infra.recipes.params import FilterParams
from infra.run.layout import CURATION_FILE, MANIFEST
from infra.run.manifest import PartInfo
from infra.storage.local import LocalOutputStore
from tests.test_curation import counted_reads

pytestmark = pytest.mark.integration

# facts' prompts repeat across words' shards (few distinct words, two tokens each): exact and near
# duplicates of rows in earlier shards, which its open tables must find.
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
    split: {parser: regex, pattern: '(\\w+)', into: word, max_items: 2}
  - name: facts
    from: words
    recipe: {prompt_template: "About {{ word }}:", samples_per_prompt: 2}
    sampling: {tokens_to_generate: 2}
    filters: {dedup_exact: true, dedup_near: true}
  - name: notes
    from: facts
    recipe: {prompt_template: "Note: {{ completion }}"}
"""
TOPICS, SHARD = 12, 2


def test_a_streamed_stage_reads_each_kept_part_a_fixed_number_of_times_and_keeps_what_one_pass_keeps(
        prefect_harness, tmp_path, monkeypatch):
    from flows.pipeline import pipeline

    monkeypatch.chdir(tmp_path)
    for k, v in local_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    (tmp_path / "topics.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "topic": f"topic {i}"}) + "\n"
                                                   for i in range(TOPICS)))
    (tmp_path / "pipeline.yaml").write_text(PIPELINE)
    reads = counted_reads(monkeypatch)
    pipeline("pipeline.yaml", run_id="dd", output_uri=str(tmp_path / "out"), shard_size=SHARD)
    monkeypatch.undo()
    facts = tmp_path / "out" / "dd" / "stages" / "facts"
    manifest = json.loads((facts / MANIFEST).read_text())
    kept = [p["name"] for p in manifest["curation"]["kept_parts"]]
    assert len(kept) >= 8 and manifest["curation"]["filtered"].get("exact_duplicate", 0) > 0, manifest["curation"]
    # Every kept part is read as often as the first one, whatever its shard: by the stream passing it to
    # notes, by the stage's end (its verdict current?) and by its rows.jsonl. Never by the tables.
    counts = {name: reads[name] for name in kept}
    counts[next(p["name"] for p in manifest["curation"]["kept_parts"] if p["records"])] -= 1  # the run page's first rows
    assert set(counts.values()) == {3}, counts

    # One curation pass over the whole stage, fresh (the old, whole-stage path), keeps the same rows.
    whole = tmp_path / "whole"
    shutil.copytree(facts, whole)
    for f in whole.iterdir():
        if CURATION_FILE.fullmatch(f.name):
            f.unlink()
    parts = [PartInfo.from_json(json.dumps(p).encode()) for p in manifest["parts"]]
    store = LocalOutputStore(whole)
    stage = manifest["curation"]["stage_hash"]
    result = curate(store, parts, Curation(filters=FilterParams(dedup_exact=True, dedup_near=True)), manifest["config_hash"])
    assert result.stage_hash == stage and result.filtered == manifest["curation"]["filtered"]
    assert [(whole / n).read_bytes() for n in kept] == [(facts / n).read_bytes() for n in kept]
