"""A stage's rows for its children: its kept rows (all its rows when it curates nothing), each cut by
its split (infra/recipes/split.py stage_rows) into rows with derived ids and lineage, written to
`stages/{stage}/rows.jsonl`, which the next stage reads as its input.

A stage's parts pass its record's fields through, and output_record keeps a record field named
like a row's own (`completion`, the parent's reply) as `input_<name>`; here those move under
`parent` (`{{ parent.completion }}`, as docs/pipelines.md says), and the parent's `prompt`,
`generation`, `id` and `sample` stay behind (its rows keep them; lineage reaches them)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

from infra.prompting.dataset import RESERVED_FIELDS
from infra.recipes.filters import Verdict
from infra.recipes.lineage import NOT_PASSED
from infra.recipes.split import SplitParams, stage_rows
from infra.run.layout import MANIFEST, STAGE_ROWS
from infra.storage.jsonl import json_line, publish


def carried(row: dict) -> dict:
    """A generated row with its record's own reserved fields (`input_completion`) under `parent`."""
    read = {f"input_{k}": k for k in RESERVED_FIELDS}
    out = {k: v for k, v in row.items() if k not in read and k != "parent"}
    moved = {read[k]: v for k, v in row.items() if k in read and read[k] not in NOT_PASSED}
    if moved and "parent" in row:
        moved["parent"] = row["parent"]  # the grandparent's: parent.parent.completion
    parent = moved or row.get("parent")
    return {**out, **({"parent": parent} if parent else {})}


def kept_part_names(manifest: dict) -> list[str]:
    """The stage's kept parts in input order: curation's, or every part when it curates nothing."""
    if manifest.get("curation"):
        return [p["name"] for p in manifest["curation"]["kept_parts"]]
    return [p["name"] for p in manifest["parts"]]


def write_stage_rows(store, stage: str, split: SplitParams | None) -> dict:
    """Write `rows.jsonl` from the stage's published manifest; its counts: rows written, and the kept
    rows the split dropped, by reason. Streamed: one kept part in memory at a time (a stage's rows after
    a 1 -> 10 split are ten times its kept rows; the orchestrator's memory stays flat at any size)."""
    manifest = json.loads(store.read_bytes(MANIFEST))
    dropped: Counter = Counter()

    def lines() -> Iterator[bytes]:
        for name in kept_part_names(manifest):
            for line in (store.read_bytes(name) or b"").decode("utf-8").splitlines():
                if not line.strip():
                    continue
                got = stage_rows(carried(json.loads(line)), stage, split)
                if isinstance(got, Verdict):
                    dropped[got.filter] += 1
                    continue
                yield from map(json_line, got)

    _, count, _ = publish(store, STAGE_ROWS, lines())
    return {"rows": count, "split_dropped": dict(sorted(dropped.items())), "rows_uri": store.uri(STAGE_ROWS),
            "kept_parts": [store.uri(n) for n in kept_part_names(manifest)]}


def stage_entry(stage, input_uri: str, hashes, *, records_in: int, rows_out: int, kept: int, filtered: dict,
                rows: dict, manifest: str, rejected: int = 0, **own) -> dict:
    """A stage's entry in the pipeline's manifest (docs/pipelines.md): the keys every kind of stage has,
    `rows` being write_stage_rows' counts (or a pairs stage's own), then the kind's own keys."""
    return {"stage": stage.name, **({"kind": stage.kind} if stage.kind != "generate" else {}), "from": stage.from_,
            "input": input_uri, "config_hash": hashes.generation, "kept_hash": hashes.kept, "records_in": records_in,
            "rows_out": rows_out, "rejected": rejected, "kept": kept, "filtered": filtered,
            "split_dropped": rows["split_dropped"], "rows": rows["rows"], "rows_uri": rows["rows_uri"],
            "kept_parts": rows["kept_parts"], **own, "manifest": manifest}
