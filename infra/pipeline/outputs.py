"""A pipeline's training sets at its end: the exports and the dataset card (infra/run/card.py) in
the pipeline's run directory (`data/`, `README.md`).

The SFT set is the kept rows of the stage the (first) pairs stage reads (so a reward stage's cut
applies to it), else of the last stage that keeps rows (generating or reward); the preference sets
are every pairs stage's `pairs.jsonl`, in the file's order. With `exports.user_field` the user's turn
in those files is that field of each row (a pair's: its chosen row's), not the prompt sent. The card
names each stage's model, hashes, counts and reasons from the pipeline's manifest and each stage's own."""

from __future__ import annotations

import json

from infra.pipeline.model import Pipeline
from infra.pipeline.pairs_stage import kept_rows, stage_store
from infra.pipeline.rows import kept_part_names
from infra.planning import discard_partials
from infra.run.card import StoredRows, export_store, judge_line, publish_dataset, read_rows, reward_line
from infra.run.exports import UserTurns, pairs_with_user_turns
from infra.run.hub import push_dataset
from infra.run.layout import MANIFEST, STAGE_PAIRS


def sft_stage(the: Pipeline) -> str:
    """The stage whose kept rows are the SFT set: what the first pairs stage pairs, else the last stage
    that keeps rows. Never a generating stage behind a reward stage's cut: the rows it dropped for low
    scores must not reach the SFT set."""
    pairs = [s for s in the.ordered() if s.kind == "pairs"]
    if pairs and pairs[0].from_ is not None:
        return pairs[0].from_
    return [s for s in the.ordered() if s.kind != "pairs"][-1].name


def pipeline_facts(the: Pipeline, doc: dict, stage_manifests: dict[str, dict], sft: str) -> dict:
    models = sorted({m["model"] for m in stage_manifests.values() if m.get("model")})
    # The run's allocation, summed over its invocations: each stage's manifest lists the same pool's replicas
    gpu_hours = (doc.get("allocation") or {}).get("gpu_hours") or 0
    name, server = the.server
    stages = [{"stage": s["stage"], "kind": s.get("kind", "generate"), "from": s.get("from") or "input",
               "kept hash": s.get("kept_hash"), "records in": s.get("records_in"), "rows out": s.get("rows_out"),
               "kept": s.get("kept"), "dropped": {**(s.get("filtered") or {}), **(s.get("split_dropped") or {})}}
              for s in doc["stages"]]
    return {"models": models, "stages": stages, "gpu_hours": round(gpu_hours, 3), "scorers": scorers(the, doc, stage_manifests),
            "made_by": f"Pipeline `{doc['pipeline']}` on server `{name}` (profile `{server.profile}`); the SFT set is "
                       f"the kept rows of stage `{sft}`; each stage's config hashes are in `pipeline.json`, its counts "
                       f"in `{MANIFEST}`."}


def scorers(the: Pipeline, doc: dict, stage_manifests: dict[str, dict]) -> list[str]:
    """One sentence per model that cut or ranked rows: each judged stage's judge, each reward stage's
    reward model and weights, each pairs stage's score (and its pair check's model)."""
    out = []
    for entry in doc["stages"]:
        stage = the.stage(entry["stage"])
        if stage.kind == "generate" and (line := judge_line(stage_manifests.get(stage.name) or {}, f"stage `{stage.name}`: ")):
            out.append(line)
        elif stage.kind == "reward" and entry.get("reward"):
            out.append(reward_line(stage.name, entry["reward"], stage.reward_params.weights,
                                   the.reward_server(stage)[1].url))
        elif stage.kind == "pairs":
            p = stage.pairs
            out.append(f"stage `{stage.name}`: pairs {p.strategy} by `{p.score}` (min margin {p.min_margin:g}"
                       + (f", min chosen {p.min_chosen:g}" if p.min_chosen is not None else "") + ")"
                       + (f"; {entry['check']['said']}" if (entry.get("check") or {}).get("said") else ""))
    return out


def export_pipeline(the: Pipeline, doc: dict, root, output_uri: str, run_id: str, settings, lease=None) -> dict:
    """Write the pipeline's exports and card; what was written (for the pipeline's manifest)."""
    sft = sft_stage(the)
    manifests = {}
    for s in the.ordered():
        if s.kind in ("generate", "reward"):  # a reward stage's manifest lists its kept parts as a run's does
            data = stage_store(output_uri, run_id, s.name, settings).read_bytes(MANIFEST)
            manifests[s.name] = json.loads(data) if data is not None else {}

    def manifest_rows(name: str) -> StoredRows:
        """A finished stage's kept rows, read from its parts each time they are iterated."""
        store = stage_store(output_uri, run_id, name, settings)
        if not manifests.get(name):
            kept_rows(store)  # its one-line error: the stage has not finished
        return StoredRows(store, kept_part_names(manifests[name]))
    pairs = [s for s in the.ordered() if s.kind == "pairs"]
    field = the.exports.user_field
    pair_rows = []
    for stage in pairs:
        rows = read_rows(stage_store(output_uri, run_id, stage.name, settings), [STAGE_PAIRS])
        if field != "prompt":  # each pair's user turn: its chosen row's field, in the rows the stage paired
            rows = pairs_with_user_turns(rows, user_turns(manifest_rows(stage.from_), field, {str(r.get("chosen_id")) for r in rows}))
        pair_rows += rows
    data = export_store(output_uri, run_id, settings, lease)
    for store in (root, data):  # what a kill while the manifest, card or exports were written left
        discard_partials(store)
    sft_rows = manifest_rows(sft)
    return publish_dataset(root, data, run_id, sft_rows if field == "prompt" else UserTurns(sft_rows, field),
                           pair_rows if pairs else None, pipeline_facts(the, doc, manifests, sft))


def user_turns(rows, field: str, ids: set[str]) -> dict[str, object]:
    """Row id -> the row's `field`, for the ids asked (the samples of one prompt share their id and field)."""
    return {str(r.get("id")): r.get(field) for r in rows if str(r.get("id")) in ids}


def push_pipeline(the: Pipeline, doc: dict, root, output_uri: str, run_id: str, settings, lease=None) -> None:
    """With `push_to_hub`, the published dataset to the Hub, then the manifest again with where it went.
    Called after the manifest is written: a Hub out of reach fails in one line and loses nothing."""
    if the.push_to_hub is None:
        return
    doc["hub"] = push_dataset(the.push_to_hub, root, export_store(output_uri, run_id, settings, lease), doc["dataset"], run_id,
                              settings.work_path("staging"))
    root.write_bytes(MANIFEST, json.dumps(doc, indent=2).encode())
