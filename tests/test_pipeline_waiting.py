"""A pipeline's child shards wait for a server as the bytes of their parent's rows, not as parsed
records (flows/pipeline_stream.py `Waiting`: ~150 B a row instead of ~1.4 KB, benchmarks/pipeline_rss.py),
and the shard each one makes when handed out is the one made at once before: the same records, ids
(given and derived from the line), prompts, fields and line numbers, across bad lines and parent shards."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from types import SimpleNamespace

from flows.pipeline_stream import StageRun, Stream, Waiting
from infra.pipeline.schedule import cut
from infra.planning import Plan, RunConfig, usable_records
from infra.prompting.sampling import SamplingParams
from infra.recipes.recipe import load_recipe
from infra.recipes.params import RecipeParams
from infra.settings import Settings


def child_config(shard_size: int) -> RunConfig:
    return RunConfig(input_uri="rows of parent kept abc", output_uri="out", run_id="r1", profile="local",
                     sampling=SamplingParams(tokens_to_generate=8), batch_size=4, shard_size=shard_size,
                     prompt_field=None, id_field="id", on_bad_input="skip",
                     recipe=load_recipe(RecipeParams(prompt_template="Q about {{ subtopic }} in {{ topic }}:"), Settings()))


def parent_rows(start: int, n: int) -> bytes:
    lines = []
    for i in range(start, start + n):
        row = {"id": f"t{i // 10}.{i % 10}", "topic": f"tópico {i // 10} 😀", "subtopic": f"s\n{i}", "n": i}
        if i % 7 == 3:
            del row["subtopic"]  # the template fails: a bad line, skipped
        if i % 11 == 5:
            del row["id"]  # an id derived from the line number
        lines.append(json.dumps(row, ensure_ascii=False))
        if i % 13 == 0:
            lines.append("")  # an empty line: counted as a line, no record
    return ("\n".join(lines) + "\n").encode("utf-8")


def test_waiting_child_shards_hold_bytes_and_make_the_same_records():
    settings, cfg = Settings(), child_config(shard_size=6)
    stream = Stream.__new__(Stream)  # add_shards alone: no pool, no stages to advance
    stream.settings, stream.advance = settings, lambda stage: None
    child = StageRun(stage=None, depth=1, order=1, run=SimpleNamespace(cfg=cfg), job=None,
                     plan=Plan("r1", cfg.input_uri, "jsonl", 0, 0, 0, {}, "h"))
    expected, offset = [], 0
    for start, n in ((0, 40), (40, 33), (73, 5)):  # three parent shards, the child's shards numbered on
        rows = parent_rows(start, n)
        count = sum(1 for line in rows.splitlines() if line)
        records = [replace(r, line=offset + r.line) for r in usable_records(io.BytesIO(rows), cfg, settings, "jsonl")]
        expected += [(i, records[a:b]) for i, a, b in cut(len(records), cfg.shard_size, child.created)]
        stream.add_shards(child, rows, count)
        offset = child.plan.records_in + child.plan.rejected
    assert child.plan.rejected > 0 and any(not r.given_id for _, recs in expected for r in recs)
    assert [w.index for w in child.ready] == [i for i, _ in expected] == list(range(child.created))
    for waiting, (index, records) in zip(child.ready, expected):
        assert isinstance(waiting, Waiting) and isinstance(waiting.rows, bytes)
        shard = waiting.shard(cfg, settings)
        assert shard.index == index and shard.records == records
    # a shard's bytes are its own lines only, not its parent shard's
    assert max(len(w.rows) for w in child.ready) < len(parent_rows(0, 40)) / 3
