"""What a rerun of a pipeline file under the same run_id does with each stage it changed (issue 24:
a user pays only for what a change invalidates). `changes` decides (pure); `reconcile` acts on it
before anything is allocated and records the file's hashes (`pipeline.json`).

Per stage, by its hashes (infra/pipeline/hashes.py) against the ones the run last ran:

- `lineage` changed (its own generation settings, or a parent's that regenerates): **regenerate**.
  Its run directory is moved aside (`superseded/{stage}-{old generation hash}`, infra/run/layout.py)
  so no old part mixes with a new one, and it is generated again; so are the stages after it.
- `lineage` the same, `generation` changed (a parent keeps other rows: its filters, judge threshold
  or dedup changed, or its own parent's did): **reuse**. Its directory is moved aside too, and
  read back while the stage is made again from its parent's kept rows: a record whose request is
  the one made before (same id, same prompt, same settings) gets its old completions back
  (infra/pipeline/reuse.py); only new parents' records are generated; dropped parents' rows are gone.
- `kept` alone changed (its own judge thresholds or filters): **recurate**, no server: its parts
  stay, the stream curates them again (flows/pipeline_stream.py), and its children are reused. A
  reward stage's `kept` holds its scorer too (**rescore**): a new model or system prompt is scored
  again by its server, a new threshold only curated.
- A stage regenerated or reused whose new generation hash names one of its superseded directories
  (a template, filter or setting turned back: the same settings over the same parent rows, the root
  stage too) gets that directory **moved back** (`restore`): its parts are published under that
  config, so it resumes as a run does and makes only what it lacks.
- A reward or pairs stage is never moved: it re-reads its parent's rows itself (its replies are
  keyed by the part's sha256, a pairs stage re-pairs).

Refused, in one line naming the stage and the field, before any allocation: a stage whose own
`input` changed (a run keeps its input), and a stage renamed or removed while a stage that read it is
still in the file. A stage removed with no child left is moved aside.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace

from infra.errors import ConfigError
from infra.pipeline.hashes import StageHash
from infra.run.layout import PIPELINE_HASHES, RUN_CONFIG, SUPERSEDED, superseded_name, superseded_uri, stages_uri
from infra.storage import OutputStore, open_output_store

log = logging.getLogger(__name__)

MOVED = ("regenerate", "reuse", "removed")  # the actions whose run directory is moved aside


@dataclass(frozen=True)
class Change:
    stage: str
    action: str  # regenerate | reuse | recurate | rescore | reread | removed
    why: str
    old_generation: str
    restored: str | None = None  # its superseded directory made under these very settings, moved back

    @property
    def line(self) -> str:
        what = {"regenerate": "generated again, with the stages after it",
                "reuse": "made again from its parent's kept rows; the rows of parents still kept are reused",
                "recurate": "curated again with no server; its parts stay",
                "rescore": ("curated again; its rows are scored again, with its reward server, only where its scorer "
                            "changed (model, system prompt, context, fields)"),
                "reread": "it reads its parent's rows again (a reward stage scores only the rows it never scored)",
                "removed": "no longer in the file; its directory is moved aside"}[self.action]
        if self.restored is not None:
            what = (f"its directory made under these very settings before ({SUPERSEDED}/{self.restored}) is moved "
                    "back: only what it lacks is made")
        return f"stage {self.stage}: {self.why}: {what}"


def changes(before: dict, now: dict[str, StageHash], parents: dict[str, str | None], kinds: dict[str, str],
            run_id: str) -> list[Change]:
    """What each stage of `now` (parents first) needs, from the hashes `before` recorded; refuses
    what cannot be done (ConfigError, one line)."""
    if any("lineage" not in old for old in before.values()):  # recorded before a change could be paid for
        changed = [n for n, h in now.items() if n in before and before[n]["generation"] != h.generation]
        if changed:
            raise ConfigError(f"pipeline run {run_id}: stage(s) {', '.join(changed)} changed since the run began, which "
                              "recorded no settings groups; rerun with the original file to resume, or start a new run "
                              "(--new-run)")
        return []
    out: list[Change] = []
    for name, old in before.items():
        if name in now:
            continue
        readers = [n for n, o in before.items() if o.get("from") == name and n in now]
        if readers:
            raise ConfigError(f"pipeline run {run_id}: stage {name!r}: name: not in the file any more, and stage "
                              f"{readers[0]!r} read its rows; a run keeps its stages' names: put it back, or start a new "
                              "run (--new-run)")
        out.append(Change(name, "removed", "not in the file", old["generation"]))
    regenerated: set[str] = set()
    for name, h in now.items():
        old = before.get(name)
        if old is None:
            continue  # a new stage: made from scratch
        groups = sorted(k for k in {*old["groups"], *h.groups} if old["groups"].get(k) != h.groups.get(k))
        if "input" in groups:
            raise ConfigError(f"pipeline run {run_id}: stage {name!r}: input: changed since the run began; a run keeps "
                              "its input: rerun with the original input, or start a new run (--new-run)")
        parent = parents[name]
        if old["lineage"] != h.lineage:
            why = (f"from: {old.get('from')} -> {parent}" if old.get("from") != parent
                   else f"{', '.join(groups)} changed" if groups else f"its parent {parent} is generated again")
            regenerated.add(name)
            out.append(Change(name, "regenerate" if kinds[name] == "generate" else "reread", why, old["generation"]))
        elif old["generation"] != h.generation:
            out.append(Change(name, "reuse" if kinds[name] == "generate" else "reread",
                              f"its parent {parent} keeps other rows", old["generation"]))
        elif old["kept"] != h.kept:
            out.append(Change(name, "rescore" if kinds[name] == "reward" else "recurate",
                              f"{', '.join(groups) or 'its curation'} changed", old["generation"]))
    return out


def entry(h: StageHash, parent: str | None, superseded: list[str]) -> dict:
    return {"generation": h.generation, "kept": h.kept, "lineage": h.lineage, "groups": dict(h.groups),
            "from": parent, "superseded": superseded}


def reconcile(root: OutputStore, output_uri: str, run_id: str, hashes: dict[str, StageHash],
              parents: dict[str, str | None], kinds: dict[str, str], settings, fence=None) -> tuple[list[Change], dict]:
    """Decide, refuse or act (each changed stage's directory moved aside), then record this file's
    hashes; (the changes, each stage's superseded directories by stage: where its reusable rows lie)."""
    data = root.read_bytes(PIPELINE_HASHES)
    before = json.loads(data) if data is not None else {}
    found = changes(before, hashes, parents, kinds, run_id)
    superseded = {n: list(before.get(n, {}).get("superseded", [])) for n in hashes}
    for i, change in enumerate(found):
        if change.action in MOVED:
            moved = move_aside(output_uri, run_id, change.stage, change.old_generation, settings, fence)
            if moved is not None and change.stage in superseded and moved not in superseded[change.stage]:
                superseded[change.stage].append(moved)
        back = superseded_name(change.stage, hashes[change.stage].generation) if change.stage in hashes else None
        if change.action in ("regenerate", "reuse") and back in superseded[change.stage]:
            superseded[change.stage].remove(back)  # no longer a directory aside: the stage's own again
            found[i] = replace(change, restored=back)
    # Recorded before a directory is moved back: a kill midway leaves the stage with some of its old
    # parts, valid under its config, and it makes the rest; never a stage moved aside twice.
    now = {n: entry(h, parents[n], superseded[n]) for n, h in hashes.items()}
    root.write_bytes(PIPELINE_HASHES, json.dumps(now, indent=2, sort_keys=True).encode())
    for change in found:
        if change.restored is not None:
            target = open_output_store(stages_uri(output_uri, run_id), change.stage, settings.s3, settings.work_path("staging"))
            source = superseded_store(output_uri, run_id, change.restored, settings)
            if fence is not None:
                source, target = fence(source), fence(target)
            log.info("stage %s: %d object(s) moved back from %s", change.stage, len(move_objects(source, target)),
                     source.location)
    return found, superseded


def superseded_store(output_uri: str, run_id: str, name: str, settings) -> OutputStore:
    return open_output_store(superseded_uri(output_uri, run_id), name, settings.s3, settings.work_path("staging"))


def move_aside(output_uri: str, run_id: str, stage: str, generation: str, settings, fence=None) -> str | None:
    """Every object of the stage's run directory moved under `superseded/` (through the stores: local
    or S3 alike, never read whole; run.json last, so a kill midway leaves a directory a rerun moves
    again, never one that resumes). Idempotent: a rerun after a kill moves what is left. The
    superseded directory's name, or None when the stage had nothing to move."""
    name = superseded_name(stage, generation)
    source = open_output_store(stages_uri(output_uri, run_id), stage, settings.s3, settings.work_path("staging"))
    target = superseded_store(output_uri, run_id, name, settings)
    if fence is not None:
        source, target = fence(source), fence(target)
    names = move_objects(source, target)
    if not names:
        return name if target.list_names() else None  # moved by a run killed before it recorded the move
    log.info("stage %s: %d object(s) moved aside to %s", stage, len(names), target.location)
    return name


def move_objects(source: OutputStore, target: OutputStore) -> list[str]:
    """Every object of `source` moved to `target` (`OutputStore.move_in`: a rename locally, a copy by
    S3 itself there; never read whole here, a large `rows.jsonl` costs no memory); run.json last, so
    a kill midway leaves `target` with no config (never one that resumes as if whole) and `source`
    with it (moved again by a rerun). The names moved."""
    names = sorted(source.list_names(), key=lambda n: n == RUN_CONFIG)
    for n in names:
        target.move_in(source, n)
    return names
