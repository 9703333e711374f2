"""A reward stage: its input rows (a parent stage's `rows.jsonl`, or its own input) cut into parts,
each part's rows scored by the reward server, the replies checkpointed next to the part as the
judge's are, then curated with no server.

In the stage's run directory (infra/run/layout.py):
- `part-NNNNN.jsonl` and its state: the input rows of shard N as they came (the stage generates
  nothing; a part is rewritten only when its rows changed);
- `part-NNNNN.jsonl.reward.jsonl`: one reply per part row, in the part's order: what the server
  returned (`rewards` or `attributes`: infra/reward/client.py), or `error` for a row never sent
  (`reward_overlong`, `reward_no_conversation`) or refused;
- `part-NNNNN.jsonl.reward.json`: its state, naming the scorer's identity (the part's sha256, the
  server's engine and model, the conversation's settings, the token counter) and the file's sha256
  (infra/run/states.py: trusted only while the file has those bytes);
- kept, filtered and verdict files from the curation stage (infra/recipes/curate.py), whose
  `keep_if` filters read the replies (infra/reward/scores.py).

So a new threshold, weights or attribute map re-curates with no server; a new reward model, system
prompt or context rescores without touching the parts; a part whose replies are current is never
sent again, so a rerun after a lost server scores only what was not yet scored. A part rewritten
(its parent kept other rows, so the rows shifted between parts) takes back the replies the same
scorer gave the same conversation in any earlier part (`earlier_replies`): only rows never scored
are sent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from infra.errors import SdgError, ServerLost, TransientServerError
from infra.prompting.tokens import TokenCounter
from infra.recipes.curate import Curation, curate_run
from infra.recipes.params import FilterParams
from infra.reward.client import RewardClient
from infra.reward.conversation import Conversation, build
from infra.reward.scores import RewardParams, reward_filter
from infra.run.layout import MANIFEST, part_name, reward_name, reward_state_name, state_name
from infra.run.manifest import PartInfo, config_hash
from infra.run.states import describes, invalidate, read_described
from infra.storage.jsonl import json_line, publish, read_rows, read_state

log = logging.getLogger(__name__)
# The server, not the request: replace it and go on. A busy one (ServerThrottled, after the client's
# waits) is not lost: the stage stops, keeping what it scored.
LOST = (ServerLost, TransientServerError)


class RewardStageError(SdgError):
    """The reward server failed past its replacements, or a part's replies are missing where needed."""


@dataclass(frozen=True)
class RewardScorer:
    """What makes a part's replies: its rows, the server (engine, model: not its address, so a
    replacement server does not rescore) and the conversation's settings."""

    params: RewardParams
    counter: TokenCounter
    server: dict  # {"engine": ..., "model": ...}

    def settings(self) -> dict:
        p = self.params
        return {"server": self.server, "system_prompt": p.system_prompt, "context_length": p.context_length,
                "fields": [p.messages_field, p.prompt_field, p.completion_field], "counter": self.counter.identity}

    def identity(self, part_sha256: str) -> str:
        return config_hash({"part_sha256": part_sha256, **self.settings()})

    def conversations(self, rows: list[dict]) -> list:
        p = self.params
        return [build(row, system_prompt=p.system_prompt, counter=self.counter, context_length=p.context_length,
                      messages_field=p.messages_field, prompt_field=p.prompt_field, completion_field=p.completion_field)
                for row in rows]

    def row_key(self, row: dict) -> str:
        """What a row's conversation is made of (its reply is the same for the same key and scorer)."""
        p = self.params
        return json.dumps([row.get(p.messages_field), row.get(p.prompt_field), row.get(p.completion_field)],
                          sort_keys=True, ensure_ascii=False)

    def score_rows(self, client: RewardClient, rows: list[dict]) -> list[dict]:
        """One reply per row, in row order: {"id", "sample", **reply} or {"id", "sample", "error", ...}."""
        built = self.conversations(rows)
        out = [{"id": r.get("id"), "sample": r.get("sample", 0)} for r in rows]
        todo = [i for i, c in enumerate(built) if isinstance(c, Conversation)]
        for i, c in enumerate(built):
            if not isinstance(c, Conversation):
                out[i].update(c.as_dict())
        size = self.params.batch_size
        for start in range(0, len(todo), size):
            idx = todo[start:start + size]
            replies = client.score([built[i].text for i in idx], [built[i].messages for i in idx])
            for i, reply in zip(idx, replies):
                out[i].update(reply, tokens=built[i].tokens)
        return out


def _state(store, scorer: RewardScorer, part: PartInfo) -> dict | None:
    state = read_state(store, reward_state_name(part.name))
    return state if state.get("reward_hash") == scorer.identity(part.sha256) else None


def rewards_current(store, scorer: RewardScorer, part: PartInfo) -> bool:
    state = _state(store, scorer, part)
    return state is not None and describes(store, {reward_name(part.name): state.get("sha256")})


def read_rewards(store, scorer: RewardScorer, part: PartInfo) -> list[dict] | None:
    state = _state(store, scorer, part)
    data = read_described(store, reward_name(part.name), state.get("sha256")) if state is not None else None
    return None if data is None else read_rows(data)


def publish_rewards(store, scorer: RewardScorer, part: PartInfo, replies: list[dict]) -> dict:
    invalidate(store, reward_state_name(part.name))  # before the replies it describes are replaced
    sha, count, _ = publish(store, reward_name(part.name), replies)
    state = {"part": part.name, "shard": part.shard, "part_sha256": part.sha256, "reward_hash": scorer.identity(part.sha256),
             "server": scorer.server, "records": count, "sha256": sha,
             "unsent": sum(1 for r in replies if "error" in r)}
    store.write_bytes(reward_state_name(part.name), json.dumps(state, sort_keys=True).encode())
    return state


@dataclass(frozen=True)
class RewardCuration:
    """The curation stage's reward hook (infra/recipes/curate.py Curation.reward)."""

    scorer: RewardScorer

    def identity(self, generation_hash: str) -> str:
        p = self.scorer.params
        return config_hash({"generation": generation_hash, "scorer": self.scorer.settings(), "attributes": p.attributes,
                            "from_index": p.from_index, "weights": p.weights,
                            "keep_if": {k: v if isinstance(v, (int, float)) else v.model_dump() for k, v in p.keep_if.items()}})

    def filter(self):
        return reward_filter(self.scorer.params)

    def attach(self, store, part: PartInfo, rows: list[dict]) -> None:
        replies = read_rewards(store, self.scorer, part)
        if replies is None or len(replies) != len(rows):
            raise RewardStageError(f"part {store.uri(part.name)} has no reward replies matching its state "
                                   f"({store.uri(reward_name(part.name))}): rerun with the same run_id to score it again")
        for row, reply in zip(rows, replies):
            row["reward"] = {k: v for k, v in reply.items() if k not in ("id", "sample", "tokens")}


def write_parts(store, rows: Iterable[dict], shard_size: int, config_hash_: str) -> list[PartInfo]:
    """The input rows as parts of `shard_size`; a part whose state already names these bytes stays."""
    parts, shard, batch, line = [], 0, [], 0

    def flush():
        data = b"".join(map(json_line, batch))
        sha = hashlib.sha256(data).hexdigest()
        name = part_name(shard)
        old = read_state(store, state_name(name))
        if old.get("sha256") == sha and store.sha256(name) == sha:
            return PartInfo(**{k: old[k] for k in PartInfo.__dataclass_fields__ if k in old})
        invalidate(store, state_name(name))
        got_sha, count, size = publish(store, name, batch)
        info = PartInfo(name, shard, count, got_sha, size, config_hash_, line - len(batch) + 1, line, finished_at=time.time())
        store.write_bytes(state_name(name), info.to_json())
        return info

    for row in rows:
        batch.append(row)
        line += 1
        if len(batch) == shard_size:
            parts.append(flush())
            shard, batch = shard + 1, []
    if batch or not parts:
        parts.append(flush())
    return parts


def earlier_replies(store, scorer: RewardScorer) -> dict[str, dict]:
    """Every current reply of the store's parts (before they are rewritten), by `row_key`, without the
    row's id and sample: one small entry per row scored before by this scorer."""
    out: dict[str, dict] = {}
    for name in store.list_names():
        if not (name.startswith("part-") and name.endswith(".jsonl")):
            continue
        state = read_state(store, state_name(name))
        if not state.get("sha256") or (data := read_described(store, name, state["sha256"])) is None:
            continue
        replies = read_rewards(store, scorer, PartInfo(**{k: state[k] for k in PartInfo.__dataclass_fields__ if k in state}))
        rows = read_rows(data)
        if replies is not None and len(replies) == len(rows):
            out.update((scorer.row_key(r), {k: v for k, v in reply.items() if k not in ("id", "sample")})
                       for r, reply in zip(rows, replies))
    return out


def score_parts(store, scorer: RewardScorer, parts: list[PartInfo], connect: Callable[[], RewardClient],
                replace: Callable[[RewardClient, Exception], RewardClient], restarts_allowed: int,
                earlier: dict[str, dict] | None = None) -> dict:
    """Score every part whose replies are not current; a row whose conversation is in `earlier`
    (earlier_replies) takes its reply back and is not sent. `connect` gives a ready client (called
    only when a row needs one: a stage with every reply current or found starts no server); on a
    lost server, `replace` gives a ready new one, at most `restarts_allowed` times, and the part's
    rows are sent again (its replies are published only once all its rows have one)."""
    todo = [p for p in parts if not rewards_current(store, scorer, p)]
    earlier = earlier or {}
    client, restarts, scored, t0 = None, 0, 0, time.monotonic()
    try:
        for part in todo:
            rows = read_rows(store.read_bytes(part.name))
            found = [earlier.get(scorer.row_key(r)) for r in rows]
            ask = [r for r, f in zip(rows, found) if f is None]
            while ask:
                client = client or connect()
                try:
                    got = iter(scorer.score_rows(client, ask))
                    break
                except LOST as exc:
                    if restarts >= restarts_allowed:
                        raise RewardStageError(f"the reward server failed scoring {store.uri(part.name)} after {restarts} "
                                               f"replacement(s): {exc}; rerun with the same run_id: the {scored} "
                                               "part(s) scored are kept") from exc
                    restarts += 1
                    log.warning("reward server lost scoring %s (%s); replacing it (%d of %d)", part.name, exc,
                                restarts, restarts_allowed)
                    client = replace(client, exc)
            replies = [{"id": r.get("id"), "sample": r.get("sample", 0), **f} if f is not None else next(got)
                       for r, f in zip(rows, found)]
            state = publish_rewards(store, scorer, part, replies)
            scored += bool(ask)
            log.info("shard %d: %d rows scored, %d replies taken back from an earlier part (%d not sent)", part.shard,
                     len(ask), len(rows) - len(ask), state["unsent"])
    finally:
        if client is not None:
            client.close()
    return {"parts_scored": scored, "parts_reused": len(parts) - scored, "server_restarts": restarts,
            "scoring_s": round(time.monotonic() - t0, 3)}


def run_reward_stage_on(store, scorer: RewardScorer, input_uri: str, s3, **kwargs) -> dict:
    """`run_reward_stage` over the JSONL rows at `input_uri` (a parent's rows.jsonl, or the stage's input)."""
    from infra.storage import open_input

    with open_input(input_uri, s3) as stream:
        return run_reward_stage(store, scorer, (json.loads(line) for line in stream if line.strip()), **kwargs)


def run_reward_stage(store, scorer: RewardScorer, rows: Iterable[dict], *, shard_size: int, filters: FilterParams,
                     connect: Callable[[], RewardClient], replace: Callable[[RewardClient, Exception], RewardClient],
                     restarts_allowed: int, generation_hash: str) -> dict:
    """The whole stage: parts, replies, curation, then its manifest (written last, as a run's)."""
    earlier = earlier_replies(store, scorer)  # before write_parts rewrites a part whose rows shifted
    parts = write_parts(store, rows, shard_size, generation_hash)
    scoring = score_parts(store, scorer, parts, connect, replace, restarts_allowed, earlier)
    curation, curation_s = curate_run(store, Curation(filters=filters, reward=RewardCuration(scorer)), parts, generation_hash)
    records = sum(p.records for p in parts)
    manifest = {"kind": "reward", "config_hash": generation_hash, "records_in": records,
                "parts": [json.loads(p.to_json()) for p in parts], "reward": {**scoring, "server": scorer.server,
                "params": scorer.params.model_dump(mode="json"), "curation_s": round(curation_s or 0.0, 3)},
                "curation": curation}
    store.write_bytes(MANIFEST, json.dumps(manifest, indent=2).encode())
    return {"manifest": store.uri(MANIFEST), "records_written": records, "records_rejected": 0,
            "records_kept": curation["records_kept"], "filtered": curation["filtered"], **scoring}
