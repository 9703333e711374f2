"""A `pairs` stage of a pipeline: preference pairs from its parent's scored samples, on the CPU.

It reads its parent's kept rows (all its rows when the parent curates nothing: rows.py
kept_part_names), picks pairs by `pairs.score` (infra/recipes/pairs.py) and writes, in its own
stage directory `stages/{stage}/`, `pairs.jsonl` (one pair a line, prompts in their parent's order)
and a small `manifest.json` (its parameters, counts and reasons). No server, no template: a rerun
re-pairs from the parent's published rows in the time it takes to read them, so a new margin
(which changes only the stage's `kept` hash, infra/pipeline/hashes.py) needs no new run.

With `pairs.check` (infra/recipes/pair_check.py) each pair picked is put to a generation server in
both orders, and kept only when both answers pick its chosen response. The answers are checkpointed
in `pair-check.jsonl` under the exact prompt sent (and how, and to which server; written at most every
CHECKPOINT_S, at the end and on any error): a rerun, with another margin or after a kill, asks only for
what it has no answer to, and starts no server when it has them all. Which server answers is the caller's (`CheckServer.connect`, flows/pairs.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from infra.errors import InputError
from infra.pipeline.hashes import StageHash
from infra.pipeline.model import Pipeline, Stage
from infra.pipeline.rows import kept_part_names, stage_entry
from infra.engines.batch import GeneratedText, PromptBatch
from infra.prompting.prompt_format import RAW, PromptFormat
from infra.prompting.sampling import SamplingParams
from infra.prompting.tokens import ByteEstimate, TokenCounter, check_fits_context
from infra.recipes.pair_check import PairCheck, answer_key, check_contexts, verdict
from infra.recipes.pairs import Pair, make_pairs, pair_id, pair_row
from infra.recipes.templates import RenderError, load_template, prompt_char_limit, render
from infra.run.card import read_rows
from infra.run.layout import MANIFEST, STAGE_PAIR_CHECK, STAGE_PAIRS, stages_uri
from infra.run.lease import FencedStore, RunLease
from infra.storage import OutputStore, open_output_store
from infra.storage.jsonl import json_line

log = logging.getLogger(__name__)
CHECKPOINT_S = 10.0  # the most answers a kill -9 of a pair check loses: those of the last seconds


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


@dataclass
class CheckServer:
    """Where a pair check's questions go: `connect()` gives a ready client (called only when an answer
    is missing); `name` is the server's part of an answer's key (its url or profile); `said` tells the
    manifest how it was reached (set by connect)."""

    connect: Callable[[], object]
    name: str
    prompt_format: PromptFormat = RAW
    context_length: int = 4096
    counter: TokenCounter = ByteEstimate()
    batch_size: int = 32
    said: dict = field(default_factory=dict)


def check_pairs(pairs: list[Pair], check: PairCheck, own: OutputStore, server: CheckServer, settings) -> tuple[list[Pair], Counter, dict]:
    """The pairs both orders agree on, the others' reasons (per pair), and the counts asked and reused."""
    compiled = load_template(check.template, settings, "pairs.check.template").compiled()
    sampling = SamplingParams(tokens_to_generate=check.tokens_to_generate, greedy=True, end_strings=list(check.end_strings),
                              random_seed=check.seed)
    how = sampling.model_dump(mode="json") | {"prompt_format": server.prompt_format.identity()}
    answers = {a["key"]: a for a in read_rows(own, [STAGE_PAIR_CHECK]) if "reply" in a and "key" in a}
    checkpointed = len(answers)
    asked: list[list[str | dict]] = []  # per pair: its two orders' answer keys, or {"error": why}
    todo: dict[str, tuple[str, str]] = {}  # key -> (text to ask, pair id and order: for a reader of the file)
    for pair in pairs:
        both: list[str | dict] = []
        for order, ctx in zip(("chosen_a", "chosen_b"), check_contexts(pair.chosen.get("prompt"), pair.chosen.get("completion"),
                                                                        pair.rejected.get("completion"))):
            try:
                text = render(compiled, {**ctx, "row": pair.chosen}, prompt_char_limit(server.context_length))
            except RenderError as exc:
                both.append({"error": f"pairs.check.template cannot render this pair: {exc}"})
                continue
            wrapped = server.prompt_format.wrap(text)
            if (too_long := check_fits_context(wrapped, sampling, server.context_length, server.counter.count)) is not None:
                both.append({"error": f"pair check prompt: {too_long}"})
                continue
            key = answer_key(wrapped, how, server.name)
            both.append(key)
            if key not in answers:
                todo[key] = (text, f"{pair_id(pair)} {order}")
        asked.append(both)
    if todo:
        client = server.connect()
        keys = list(todo)
        written, last = len(answers), time.monotonic()

        def checkpoint() -> None:
            own.write_bytes(STAGE_PAIR_CHECK, b"".join(map(json_line, answers.values())))

        try:
            for start in range(0, len(keys), server.batch_size):
                chunk = keys[start:start + server.batch_size]
                batch = PromptBatch([todo[k][0] for k in chunk], sampling, server.prompt_format, batch_size=server.batch_size)
                for key, result in zip(chunk, client.generate_batch(batch)):
                    if isinstance(result, GeneratedText):  # a refusal is not kept: the next rerun asks again
                        answers[key] = {"key": key, "pair": todo[key][1], "reply": result.completion.text}
                # The file is rewritten whole: once per batch made a large check write its answers
                # quadratically often. At most every CHECKPOINT_S instead: a kill -9 loses at most that.
                if time.monotonic() - last >= CHECKPOINT_S:
                    checkpoint()
                    written, last = len(answers), time.monotonic()
        finally:  # at the end, and on any error: what was answered is kept
            if len(answers) != written:
                checkpoint()
    kept, dropped = [], Counter()
    pattern = check.pattern()
    for pair, both in zip(pairs, asked):
        first, swapped = (k if isinstance(k, dict) else answers.get(k, {"error": "the server gave no answer"}) for k in both)
        reason = verdict(first, swapped, pattern)
        if reason is None:
            kept.append(pair)
        else:
            dropped[reason] += 1
    return kept, dropped, {"pairs_checked": len(pairs), "answers_asked": len(todo),
                           "answers_reused": sum(1 for both in asked for k in both if isinstance(k, str) and k not in todo),
                           "answers_checkpointed": checkpointed}


def run_pairs(the: Pipeline, stage: Stage, output_uri: str, run_id: str, settings, lease: RunLease | None,
              hashes: StageHash, check_server: CheckServer | None = None) -> dict:
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
    check = None
    if stage.pairs.check is not None and got.pairs:
        if check_server is None:
            raise InputError(f"stage {stage.name!r}: pairs.check needs a generation server, and none was given")
        got.pairs, checked_out, check = check_pairs(got.pairs, stage.pairs.check, own, check_server, settings)
        got.dropped.update(checked_out)
        said = dict(check_server.said)
        if "model" not in said:  # every answer was checkpointed: the model that gave them, from the last manifest
            before = json.loads(own.read_bytes(MANIFEST) or b"{}").get("check") or {}
            said |= {k: before[k] for k in ("model", "said") if k in before}
        check |= {"dropped": dict(sorted(checked_out.items())), **said}
    lines = [json.dumps(pair_row(p, stage.pairs), ensure_ascii=False) for p in got.pairs]
    own.write_bytes(STAGE_PAIRS, "".join(f"{line}\n" for line in lines).encode("utf-8"))
    dropped = dict(sorted(got.dropped.items()))
    manifest = {"stage": stage.name, "kind": "pairs", "from": stage.from_, "pairs_params": stage.pairs.model_dump(mode="json"),
                "config_hash": config_hash, "kept_hash": kept_hash, "rows_in": len(rows), "prompts": got.prompts,
                "pairs": len(lines), "dropped": dropped, "pairs_uri": own.uri(STAGE_PAIRS),
                **({"check": check} if check is not None else {})}
    own.write_bytes(MANIFEST, json.dumps(manifest, indent=2).encode())
    log.info("stage %s: %d pairs from %d rows of %s (dropped: %s)", stage.name, len(lines), len(rows), stage.from_,
             dropped or "none")
    # Its pairs are its rows out and kept; it passes no rows on (no stage reads a pairs stage).
    made = {"split_dropped": {}, "rows": 0, "rows_uri": own.uri(STAGE_PAIRS), "kept_parts": [own.uri(STAGE_PAIRS)]}
    return stage_entry(stage, parent.uri(MANIFEST), hashes, records_in=len(rows), rows_out=len(lines), kept=len(lines),
                       filtered=dropped, rows=made, manifest=own.uri(MANIFEST), prompts=got.prompts, pairs=len(lines),
                       **({"check": check} if check is not None else {}))
