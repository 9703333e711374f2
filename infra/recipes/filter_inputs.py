"""What the filters and dedup read of a part, in a compact side file beside it, so a re-filter (new
thresholds, same run_id) reads columns of a few fields instead of parsing and re-dumping every row.

`part-00000.jsonl.filter-inputs.json` holds the part's sha256 and, per row in part order, its id,
sample, completion, generated_tokens and finish_reason (every field the filters, infra.recipes.filters,
and dedup read when there is no judge), and what they derive from the completion that no threshold
changes: the exact-dedup key, the repeated n-gram share for the pass's n-gram size, and what each of the
pass's must_match and must_not_match patterns found (a later pass searches only the patterns it lacks). The first
pass over a part parses it once, writes the side file and filters light rows built from it; a later
pass whose side file names the part's current sha256 reads only the side file and the part's raw
lines. Either way the kept rows are written as the part's own lines, byte for byte (a part line is
exactly what `json.dumps` of its row gives, so the kept file is the one a dump of the rows gives). A
missing, unreadable or stale side file takes the full path, which writes it afresh; a judge (whose
reply and score the kept rows carry) reads and dumps whole rows, as before.
"""

from __future__ import annotations

import json

from infra.recipes.dedup import exact_key
from infra.recipes.filters import match, repeated_ngram_share, user_patterns
from infra.recipes.params import FilterParams
from infra.run.layout import filter_inputs_name
from infra.storage.jsonl import read_state

COLUMNS = ("id", "sample", "completion", "generated_tokens", "finish_reason")
# Derived columns a light row carries under these keys; the filters and dedup use them when present.
EXACT_KEY, NGRAM, MATCHES = "_exact_key", "_ngram", "_matches"  # NGRAM: [n, share]; MATCHES: {pattern: match}


def build(store, part, rows: list[dict], params: FilterParams) -> list[dict]:
    """The side file of `rows` (the part's, parsed), written; returns its light rows."""
    gens = [r.get("generation") or {} for r in rows]
    texts = [r.get("completion") or "" for r in rows]
    state = {"part_sha256": part.sha256, "rows": len(rows), "id": [r.get("id") for r in rows],
             "sample": [r.get("sample", 0) for r in rows], "completion": [r.get("completion") for r in rows],
             "generated_tokens": [g.get("generated_tokens") for g in gens],
             "finish_reason": [g.get("finish_reason") for g in gens],
             # Derived only where this pass needs them (a later pass computes what is missing).
             "exact_key": [exact_key(t) for t in texts] if params.dedup_exact else None,
             "ngram": ({"n": params.ngram_size, "share": [repeated_ngram_share(t, params.ngram_size) for t in texts]}
                       if params.max_repeated_ngram_share is not None else None),
             "matches": {rx.pattern: [match(rx, t) for t in texts] for _, rx in user_patterns(params)} or None}
    store.write_bytes(filter_inputs_name(part.name), json.dumps(state, ensure_ascii=False).encode())
    return _light(state)


def light_rows(store, part) -> list[dict] | None:
    """The part's rows as the filters see them, from its side file; None when there is none of these
    very rows (then the part itself is read)."""
    state = read_state(store, filter_inputs_name(part.name))
    n = state.get("rows")
    if state.get("part_sha256") != part.sha256 or not isinstance(n, int) or n != part.records:
        return None
    if any(not isinstance(state.get(c), list) or len(state[c]) != n for c in COLUMNS):
        return None
    keys, ngram, matches = state.get("exact_key"), state.get("ngram"), state.get("matches")
    if (keys is not None and (not isinstance(keys, list) or len(keys) != n)) or \
            (ngram is not None and (not isinstance(ngram, dict) or len(ngram.get("share") or []) != n)) or \
            (matches is not None and (not isinstance(matches, dict) or
                                      any(not isinstance(v, list) or len(v) != n for v in matches.values()))):
        return None
    return _light(state)


def _light(state: dict) -> list[dict]:
    rows = [{"id": i, "sample": s, "completion": c, "generation": {"generated_tokens": t, "finish_reason": f}}
            for i, s, c, t, f in zip(*(state[c] for c in COLUMNS))]
    if (keys := state.get("exact_key")) is not None:
        for row, k in zip(rows, keys):
            row[EXACT_KEY] = k
    if (ngram := state.get("ngram")) is not None:
        for row, share in zip(rows, ngram["share"]):
            row[NGRAM] = (ngram["n"], share)
    if matches := state.get("matches"):
        patterns = list(matches)
        for row, found in zip(rows, zip(*matches.values())):
            row[MATCHES] = dict(zip(patterns, found))
    return rows


def raw_lines(data: bytes | None) -> list[bytes]:
    """A part's lines as stored (blank lines skipped, as `read_rows` does), each with its newline."""
    return [line + b"\n" for line in (data or b"").splitlines() if line.strip()]
