"""A `pairs` stage of a pipeline: preference pairs from its parent's scored samples, on the CPU.

It reads its parent's kept rows (all its rows when the parent curates nothing: rows.py
kept_part_names), picks pairs by `pairs.score` (infra/recipes/pairs.py) and writes, in its own
stage directory `stages/{stage}/`, `pairs.jsonl` (one pair a line, prompts in their parent's order)
and a small `manifest.json` (its parameters, counts and reasons). No server, no template: a rerun
re-pairs from the parent's published rows in the time it takes to read them, so a new margin
(which changes only the stage's `kept` hash, infra/pipeline/hashes.py) needs no new run.
"""

from __future__ import annotations

import json
import logging

from infra.errors import InputError
from infra.pipeline.hashes import StageHash
from infra.pipeline.model import Pipeline, Stage
from infra.pipeline.rows import kept_part_names, stage_entry
from infra.recipes.pairs import make_pairs, pair_row
from infra.run.card import read_rows
from infra.run.layout import MANIFEST, STAGE_PAIRS, stages_uri
from infra.run.lease import FencedStore, RunLease
from infra.storage import OutputStore, open_output_store

log = logging.getLogger(__name__)


def stage_store(output_uri: str, run_id: str, stage: str, settings, lease: RunLease | None = None) -> OutputStore:
    """The run directory of a pipeline's stage, fenced by the pipeline's lease when given."""
    store = open_output_store(stages_uri(output_uri, run_id), stage, settings.s3, settings.work_path("staging"))
    return FencedStore(store, lease) if lease is not None else store


def kept_rows(store: OutputStore) -> list[dict]:
    """A finished stage's kept rows, in its input order (read whole, as rows.py does)."""
    data = store.read_bytes(MANIFEST)
    if data is None:
        raise InputError(f"{store.uri(MANIFEST)} is missing: the stage has not finished; rerun the pipeline with the same run id")
    return read_rows(store, kept_part_names(json.loads(data)))


def run_pairs(the: Pipeline, stage: Stage, output_uri: str, run_id: str, settings, lease: RunLease | None,
              hashes: StageHash) -> dict:
    """Pair the parent's kept rows, publish `pairs.jsonl` and the stage's manifest; the stage's entry in
    the pipeline's manifest (the same keys as a generating stage's)."""
    assert stage.pairs is not None and stage.from_ is not None  # the model's checks
    parent = stage_store(output_uri, run_id, stage.from_, settings, lease)
    own = stage_store(output_uri, run_id, stage.name, settings, lease)
    kept_hash, config_hash = hashes.kept, hashes.generation
    rows = kept_rows(parent)
    source = the.samples_stage(stage)
    # A scoring stage between carries derived ids; the generating stage's own rows share their record's id.
    derived = source.name if source is not None and source.name != stage.from_ else None
    got = make_pairs(rows, stage.pairs, samples_stage=derived)
    if rows and got.dropped.get("pairs_unscored") == len(rows):
        fields = sorted({k for r in rows for k in r})
        raise InputError(f"stage {stage.name!r}: pairs.score {stage.pairs.score!r}: none of the {len(rows)} rows of stage "
                         f"{stage.from_!r} has a number there (their fields: {', '.join(fields)}); name a field they have")
    lines = [json.dumps(pair_row(p, stage.pairs), ensure_ascii=False) for p in got.pairs]
    own.write_bytes(STAGE_PAIRS, "".join(f"{line}\n" for line in lines).encode("utf-8"))
    dropped = dict(sorted(got.dropped.items()))
    manifest = {"stage": stage.name, "kind": "pairs", "from": stage.from_, "pairs_params": stage.pairs.model_dump(mode="json"),
                "config_hash": config_hash, "kept_hash": kept_hash, "rows_in": len(rows), "prompts": got.prompts,
                "pairs": len(lines), "dropped": dropped, "pairs_uri": own.uri(STAGE_PAIRS)}
    own.write_bytes(MANIFEST, json.dumps(manifest, indent=2).encode())
    log.info("stage %s: %d pairs from %d rows of %s (dropped: %s)", stage.name, len(lines), len(rows), stage.from_,
             dropped or "none")
    # Its pairs are its rows out and kept; it passes no rows on (no stage reads a pairs stage).
    made = {"split_dropped": {}, "rows": 0, "rows_uri": own.uri(STAGE_PAIRS), "kept_parts": [own.uri(STAGE_PAIRS)]}
    return stage_entry(stage, parent.uri(MANIFEST), hashes, records_in=len(rows), rows_out=len(lines), kept=len(lines),
                       filtered=dropped, rows=made, manifest=own.uri(MANIFEST), prompts=got.prompts, pairs=len(lines))
