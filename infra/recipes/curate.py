"""The curation stage: judge scores read, filters applied, dedup run, over every part of a run in
input order, after generation (and judging) and before the kept parts and the manifest are published.

No server: it reads the published parts and their judgements and writes, per shard,
`kept-NNNNN.jsonl` (the training set), `filtered-NNNNN.jsonl` (each dropped row's id, sample,
shard and reason: the filter, the value it measured, its limit) and a verdict state naming the
stage's hash; then `filtered.jsonl`, all shards' dropped rows. A rerun that changes only a
threshold, a filter or dedup redoes this stage alone. A shard whose verdict is current (this stage's,
its kept and filtered files the bytes it names: infra/run/states.py) is not rewritten: its kept rows seed
the dedup tables (once, and only when a later shard is curated), so a resumed pass keeps what one pass
would. A streamed pipeline stage keeps one `OpenCuration` across its shards (its tables open).
Memory is one shard's rows plus the dedup tables' page cache.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from infra.errors import SdgError
from infra.run.manifest import config_hash
from infra.recipes import filter_inputs
from infra.recipes.dedup import Dedup
from infra.recipes.filters import build_filters, first_verdict
from infra.recipes.judge import Judge, read_judgements
from infra.recipes.params import FilterParams, JudgeParams
from infra.run.layout import CURATION_FILE, FILTERED, filtered_name, judge_name, kept_name, verdict_name
from infra.run.states import describes, invalidate
from infra.storage.jsonl import publish, read_rows, read_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Curation:
    """The run's judge (loaded, or None) and filters: what the curation stage applies."""

    judge_params: JudgeParams = JudgeParams()
    filters: FilterParams = FilterParams()
    judge: Judge | None = None
    # A reward stage's scores (infra/reward/stage.py RewardCuration): read from their checkpoint into
    # each row, then its keep_if filters; in the hash only when set, so other runs' hashes stay.
    reward: object | None = None
    schema: bool = False  # the rows may carry an output_schema error: this stage drops them as schema_invalid

    @property
    def enabled(self) -> bool:
        return self.judge is not None or self.filters.enabled or self.reward is not None or self.schema

    def stage_hash(self, generation_hash: str) -> str:
        return config_hash({"generation": generation_hash,
                            "judge": self.judge.identity(generation_hash) if self.judge else None,
                            "score_pattern": self.judge_params.score_pattern if self.judge else None,
                            "min_score": self.judge_params.min_score if self.judge else None,
                            "filters": self.filters.model_dump(mode="json"),
                            **({"reward": self.reward.identity(generation_hash)} if self.reward is not None else {}),
                            **({"schema": True} if self.schema else {})})

    def fingerprint(self) -> dict:
        """For the manifest: what this stage was run with."""
        return {"judge": self.judge_params.model_dump(mode="json") | (
                    {"template_sha256": self.judge.template.sha256} if self.judge else {}),
                "filters": self.filters.model_dump(mode="json")}


@dataclass
class CurationResult:
    stage_hash: str
    kept: int = 0
    filtered: dict[str, int] = field(default_factory=dict)  # reason -> rows
    kept_parts: list[dict] = field(default_factory=list)  # name, shard, records, sha256, bytes
    rewritten: int = 0  # shards whose verdicts this pass wrote (the rest were current)

    def as_manifest(self) -> dict:
        return {"stage_hash": self.stage_hash, "records_kept": self.kept, "filtered": dict(sorted(self.filtered.items())),
                "filtered_file": FILTERED if self.filtered else None, "kept_parts": self.kept_parts}


class CurationError(SdgError):
    """A part's judgement is missing where the curation stage needs it."""


class OpenCuration:
    """A stage's curation over its parts in input order, open between calls: a streamed pipeline stage
    (flows/pipeline_stream.py) curates each shard once it is final, and the dedup tables stay open across
    its shards, fed in input order, so "the first in input order" holds with each part read once.

    `extend(parts)` takes the stage's parts from shard 0 and curates those past the ones it has seen. A
    part whose verdict is current (a resumed run's) is not rewritten; its kept rows seed the tables only
    when a later part needs curating (lazily: a pass over parts that are all current reads no kept part),
    so after a restart the tables are rebuilt once from the published parts. An error leaves nothing
    half-fed: the tables are dropped and the next call rebuilds them from shard 0 (a retried call would
    otherwise find a part's kept rows as duplicates of themselves)."""

    def __init__(self, store, curation: Curation, generation_hash: str):
        self.store, self.curation = store, curation
        self.stage_hash = curation.stage_hash(generation_hash)
        self.filters = build_filters(curation.filters, curation.judge_params if curation.judge else None,
                                     schema=curation.schema)
        if curation.reward is not None:
            self.filters.append(("reward", curation.reward.filter()))
        self.dedup: Dedup | None = None
        self.states: list[dict] = []  # each part's verdict, in shard order
        self.rewritten = 0  # parts whose verdicts this object wrote (the rest were current)
        self._unseeded: list[str] = []  # kept parts of current verdicts not yet in the tables
        self._reset()

    def _reset(self) -> None:
        self.close()
        self.dedup, self.states, self._unseeded = Dedup(self.curation.filters), [], []

    def extend(self, parts) -> list[dict]:
        """Curate `parts[len(self.states):]` (`parts`: sorted by shard, from shard 0); every part's verdict."""
        if self.dedup is None or any(state["part_sha256"] != part.sha256 for state, part in zip(self.states, parts)):
            self._reset()  # closed, or a part seen before is other bytes now: start over rather than mix two passes
        try:
            for part in parts[len(self.states):]:
                state = _current(self.store, part, self.stage_hash)
                if state is not None:
                    if self.dedup.enabled:
                        self._unseeded.append(state["kept"]["name"])
                else:
                    self._seed()
                    state = _curate_part(self.store, part, self.curation, self.filters, self.dedup, self.stage_hash, publish)
                    self.rewritten += 1
                self.states.append(state)
        except BaseException:
            self._reset()
            raise
        return self.states

    def _seed(self) -> None:
        for name in self._unseeded:
            for row in read_rows(self.store.read_bytes(name)):
                self.dedup.seed(row)
        self._unseeded.clear()

    def close(self) -> None:
        if self.dedup is not None:
            self.dedup.close()
            self.dedup = None

    def __enter__(self) -> "OpenCuration":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def curate(store, parts, curation: Curation, generation_hash: str) -> CurationResult:
    """Run the stage over `parts` (sorted by shard) and publish what it keeps and drops."""
    with OpenCuration(store, curation, generation_hash) as stage:
        states = stage.extend(parts)
    result = CurationResult(stage.stage_hash, rewritten=stage.rewritten)
    reasons: Counter[str] = Counter()
    for state in states:
        result.kept_parts.append(state["kept"])
        result.kept += state["kept"]["records"]
        reasons.update(state["filtered"])
    result.filtered = dict(reasons)
    if reasons:
        publish(store, FILTERED, _lines(store, [filtered_name(p.name) for p in parts]))
    elif store.read_bytes(FILTERED):
        store.write_bytes(FILTERED, b"")  # an earlier pass's list is not this pass's
    log.info("curation: %d kept, %s filtered (%d of %d shards rewritten)", result.kept,
             dict(reasons) or "none", result.rewritten, len(parts))
    if curation.judge is not None and (warning := judge_unparsed_warning(store, parts, curation, reasons)):
        log.warning("%s", warning)
    return result


UNPARSED_WARN_SHARE = 0.5  # more judge replies without a score than this: the pattern or the judge is wrong


def judge_unparsed_warning(store, parts, curation: Curation, reasons: Counter) -> str | None:
    """A judge whose replies mostly carry no score ends the run with a warning naming score_pattern
    and one reply (issue 27: "0 of 20 records kept" and exit 0 was all a user saw)."""
    rows = sum(p.records for p in parts)
    unparsed = reasons.get("judge_unparsed", 0)
    if not rows or unparsed <= UNPARSED_WARN_SHARE * rows:
        return None
    sample = next((row.get("value") for row in _lines(store, [filtered_name(p.name) for p in parts])
                   if row.get("filter") == "judge_unparsed"), None)
    return (f"the judge's reply had no score for {unparsed} of {rows} rows: judge.score_pattern "
            f"{curation.judge_params.score_pattern!r} found nothing in replies like {sample!r}. Make the judge template "
            "ask for the score in that form, or set score_pattern to match what the judge writes (filtered.jsonl "
            "holds every reply); a new pattern reruns no generation or judging.")




def remove_outputs(store) -> list[str]:
    """A run with this stage off: its kept and filtered files and verdicts go, so no training set
    (kept-*.jsonl) of an undone stage stays beside a manifest without `curation`. Verdicts first: a
    state goes before what it describes. Judgements stay: they describe the parts, not this stage,
    and a later run with the same judge is spared the server. Returns the names removed."""
    names = [n for n in store.list_names() if CURATION_FILE.fullmatch(n)]
    names.sort(key=lambda n: not n.endswith(".verdict.json"))
    for name in names:
        store.delete(name)
    if names:
        log.info("curation is off: removed %d file(s) of an earlier curation stage (kept-*, filtered*, verdicts)", len(names))
    return names


def _current(store, part, stage_hash: str) -> dict | None:
    """The shard's verdict when it is this stage's, of these very rows, and its kept and filtered
    files still hold the bytes it names (infra.run.states); else None, and the shard is curated again."""
    state = read_state(store, verdict_name(part.name))
    if state.get("stage_hash") != stage_hash or state.get("part_sha256") != part.sha256:
        return None
    if not describes(store, {kept_name(part.name): (state.get("kept") or {}).get("sha256"),
                             filtered_name(part.name): state.get("filtered_sha256")}):
        return None
    return state


def _curate_part(store, part, curation: Curation, filters, dedup: Dedup, stage_hash: str, publish) -> dict:
    invalidate(store, verdict_name(part.name))  # before the kept and filtered files it describes are rewritten
    # Without a judge the filters read a few fields, from a side file of the part (a re-filter reads only
    # that and the raw lines), and the kept rows are the part's own lines, never parsed and dumped again.
    # Not when curation adds to the rows (a judge's or reward's scores) or reads more of them (an
    # output_schema's check): those read and write whole rows.
    raw = None
    if curation.judge is None and curation.reward is None and not curation.schema:
        raw = filter_inputs.raw_lines(store.read_bytes(part.name))
        rows = filter_inputs.light_rows(store, part)
        if rows is None or len(rows) != len(raw):
            rows = filter_inputs.build(store, part, [json.loads(line) for line in raw], curation.filters)
    else:
        rows = read_rows(store.read_bytes(part.name))
    if curation.judge is not None:
        judged = read_judgements(store, curation.judge, part)
        if judged is None:
            raise CurationError(f"part {store.uri(part.name)} has no judgement by this judge that matches its judge state "
                                f"({store.uri(judge_name(part.name))}): rerun with the same run_id to judge it again.")
        if len(judged) != len(rows):
            raise CurationError(f"part {store.uri(part.name)} has {len(rows)} rows but {len(judged)} judgements: "
                                "rerun with the same run_id to judge it again.")
        for row, j in zip(rows, judged):
            row["judge"] = {"score": None, "reply": j.get("reply"), **({"error": j["error"]} if "error" in j else {})}
    if curation.reward is not None:
        curation.reward.attach(store, part, rows)
    kept, dropped, reasons = [], [], Counter()
    # The filters first, then dedup over the rows they keep, in order (a dropped row never shadows a later one).
    verdicts = [first_verdict(filters, row) for row in rows]
    passed = [i for i, v in enumerate(verdicts) if v is None]
    for i, v in zip(passed, dedup.check_rows([rows[i] for i in passed]) if dedup.enabled else []):
        verdicts[i] = v
    for i, (row, verdict) in enumerate(zip(rows, verdicts)):
        if verdict is None:
            kept.append(row if raw is None else raw[i])
        else:
            reasons[verdict.filter] += 1
            dropped.append({"id": row.get("id"), "sample": row.get("sample", 0), "shard": part.shard, **verdict.as_dict()})
    filtered_sha, _, _ = publish(store, filtered_name(part.name), dropped)
    name = kept_name(part.name)
    sha, count, size = publish(store, name, kept)
    state = {"stage_hash": stage_hash, "part": part.name, "part_sha256": part.sha256, "shard": part.shard,
             "kept": {"name": name, "shard": part.shard, "records": count, "sha256": sha, "bytes": size},
             "filtered": dict(reasons), "filtered_sha256": filtered_sha}
    store.write_bytes(verdict_name(part.name), json.dumps(state, sort_keys=True).encode())
    return state


def _lines(store, names: list[str]) -> Iterator[dict]:
    for name in names:
        yield from read_rows(store.read_bytes(name))


def curate_run(store, curation: Curation, parts, chash: str) -> tuple[dict | None, float | None]:
    """The judge's scores, the filters and dedup over every part (no server): the manifest's
    `curation`, and the seconds it took (None: the stage is off). With the stage off, an earlier
    pass's kept and filtered files go: the manifest will not name them."""
    if not curation.enabled:
        remove_outputs(store)
        return None, None
    t = time.monotonic()
    with _long_lived_frozen():
        result = curate(store, parts, curation, chash)
    seconds = time.monotonic() - t
    return {**result.as_manifest(), "config": curation.fingerprint()}, seconds


@contextlib.contextmanager
def _long_lived_frozen():
    """The process's objects from before the stage (Prefect's, the run's settings) kept out of the
    cyclic collector's full passes while the stage allocates rows by the hundred thousand: each full
    pass walked them all again (a fifth of a 100 k x 4 re-filter's curation, measured under load).
    Only speed changes: frozen objects are collected as usual once the stage ends (gc.unfreeze)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
