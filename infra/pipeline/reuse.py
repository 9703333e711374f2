"""The completions a stage made before a change, given back to the same requests when the stage
is made again (issue 24: a parent's filters changed, so the stage's records changed; the rows of
parents still kept are reused as they were, only new parents' rows are generated).

A stage moved aside (infra/pipeline/invalidate.py) is read back here when its `run.json` config is
this stage's but for its input's hash (`input_sha256`, which for a child names its parent's kept
rows): same model, template, sampling, samples, schema. Its published parts' rows are keyed by
the request they answered, (record id, sha256 of the prompt sent): a record whose key is found has
the same request, so its old completions are its results. Nothing else is compared or trusted:
a record whose parent was generated again has another prompt, and is generated.

The results go where an interrupted shard's go, the shard's spill (infra/storage/spill.py), before
the shard is handed out: the shard's task then asks the server only for what the spill lacks, and
its part is written the usual way (the record's current fields, the reused completion). A shard
with every result reused and no judge or schema to ask is written here, with no server at all.

Held in memory: one entry per row of the stage's old parts (their completions), while the stage is
made again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import replace

from infra.engines.batch import PromptBatch, Result
from infra.generation import ShardJob, run_shard, spill_header
from infra.prompting.dataset import Shard
from infra.run.layout import RUN_CONFIG, SERVED_MODEL, STATE_SUFFIX
from infra.run.manifest import PartInfo
from infra.run.states import published_part
from infra.storage import OutputStore
from infra.storage.spill import Spill

log = logging.getLogger(__name__)


def request_key(record_id: str, prompt: str) -> bytes:
    return hashlib.sha256(f"{record_id}\x00{prompt}".encode()).digest()[:16]


def result_of(row: dict) -> dict:
    """A published row's completion as a spill keeps a result (infra/engines/batch.py result_to_json)."""
    gen = row.get("generation") or {}
    return {"prompt": row["prompt"], "completion": {"text": row["completion"], "prompt_match": gen.get("prompt_match", "none"),
                                                    "finish_reason": gen.get("finish_reason", "length"), "generated_from": 0},
            "generated_tokens": gen.get("generated_tokens", 0), "tokens_unit": gen.get("generated_tokens_unit", "tokens"),
            "server_tokens": gen.get("server_tokens")}


def _without_input(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "input_sha256"}


class Reuse:
    """A stage's old completions by request (`request_key`), each a {sample: result} map, read from
    its sources the first time a shard asks (a rerun with nothing left to make reads no old part)."""

    def __init__(self, sources: list[tuple[OutputStore, str]], location: str):
        self._sources, self._location = sources, location  # (superseded store, its config hash)
        self._rows: dict[bytes, dict[int, dict]] | None = None
        self._lock = threading.Lock()
        self.model: str | None = None  # what made the rows (their `generation.model`)
        self.reused = 0  # results given back so far

    @classmethod
    def load(cls, sources: list[OutputStore], config: dict, store: OutputStore) -> "Reuse | None":
        """The sources made under `config` (its input aside); None when none is."""
        found = []
        for source in sources:
            data = source.read_bytes(RUN_CONFIG)
            old = json.loads(data) if data is not None else None
            if old is None or _without_input(old.get("config", {})) != _without_input(config):
                continue  # made under other settings: nothing in it answers this stage's requests
            if store.read_bytes(SERVED_MODEL) is None and (served := source.read_bytes(SERVED_MODEL)) is not None:
                store.write_bytes(SERVED_MODEL, served)  # what made the reused rows, for a stage that starts no server
            found.append((source, old["config_hash"]))
        return cls(found, store.location) if found else None

    @property
    def rows(self) -> dict[bytes, dict[int, dict]]:
        with self._lock:
            if self._rows is None:
                self._rows = {}
                for source, chash in self._sources:
                    for name in source.list_names():
                        part = published_part(source, name.removesuffix(STATE_SUFFIX), chash) \
                            if name.startswith("part-") and name.endswith(STATE_SUFFIX) else None
                        for line in (source.read_bytes(part.name) or b"").decode("utf-8").splitlines() if part else []:
                            if line.strip():
                                row = json.loads(line)
                                self._rows.setdefault(request_key(row["id"], row["prompt"]), {})[int(row["sample"])] = \
                                    result_of(row)
                                self.model = self.model or (row.get("generation") or {}).get("model")
                log.info("%d completions of an earlier run of %s can be reused",
                         sum(map(len, self._rows.values())), self._location)
            return self._rows

    def prepare(self, store: OutputStore, shard: Shard, job: ShardJob) -> bool:
        """The shard's reused results written to its spill; whether they are all of its results."""
        found = [(i * job.samples + s, got[s]) for i, rec in enumerate(shard.records)
                 if (got := self.rows.get(request_key(rec.id, rec.prompt))) for s in range(job.samples) if s in got]
        if found:
            fence = getattr(getattr(store, "lease", None), "check_held", None)
            with Spill.open(store.staging_dir(), shard.name, spill_header(store, shard, job), fence) as spill:
                spill.append(found)
            self.reused += len(found)
        return len(found) == len(shard.records) * job.samples

    def publish(self, store: OutputStore, shard: Shard, job: ShardJob) -> PartInfo:
        """A shard whose every result `prepare` found: its part written with no server."""
        return run_shard(ReusedOnly(), shard, replace(job, model=self.model or job.model), store).part


class ReusedOnly:
    """The client of a shard whose results are all in its spill: it is asked for nothing."""

    served = None

    def generate_batch(self, batch: PromptBatch, on_result=None, on_request=None) -> list[Result]:
        size = len(batch.prompts) * batch.samples
        done = batch.done or {}
        missing = [p for p in range(size) if p not in done]
        if missing:  # prepare() said every result was there: a defect, never a silent gap
            raise RuntimeError(f"shard {batch.shard}: {len(missing)} result(s) were to be reused but are not in its spill")
        return [done[p] for p in range(size)]
