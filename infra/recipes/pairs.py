"""Preference pairs from several scored responses to one prompt: pure functions, no I/O.

Rows are grouped by the prompt they answer. A stage's own rows (its parts) share their record's
`id` and differ by `sample`; rows that went through a later stage (a stage's `rows.jsonl`, or a
stage scoring them) carry a derived id `{record}.{sample}/{stage}.{item}` (infra/recipes/lineage.py),
whose `record` is the prompt: `prompt_key` with the name of the stage that generated the samples
reads it back. Each row's score is one field, named by a dotted path (`judge.score`,
`reward.helpfulness`, `reward.scalar`): a number, or the row is unscored.

Strategies, on a prompt's scored rows:
- `best_vs_worst`: one pair, the best row against the worst;
- `best_vs_random`: one pair, the best row against a row drawn (seeded by `seed` and the prompt's
  id, so a prompt's pair does not depend on the other prompts) among those far enough below it;
- `all_pairs`: every two rows whose scores differ by at least the margin, better one chosen.
A pair needs chosen > rejected (equal scores are a tie and never pair) and chosen - rejected >=
`min_margin`, and the chosen row's score >= `min_chosen` when set. Equal scores are ordered by
sample (then split item), lowest first, so the result is the same on every run.

A prompt that gives no pair counts once under one reason: `pairs_single` (fewer than two scored
rows), `pairs_low_chosen` (its best is below min_chosen), `pairs_tie` (every scored row equal),
`pairs_margin` (no two rows far enough apart). Rows without the score count as `pairs_unscored`.
With `check`, the pairs picked here are then put to the generator in both orders (pair_check.py).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from infra.recipes.lineage import parse_child_id
from infra.recipes.pair_check import PairCheck

Strategy = Literal["best_vs_worst", "best_vs_random", "all_pairs"]
SCORE_PATH = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){0,7}$"


class PairParams(BaseModel):
    """How a `pairs` stage picks chosen and rejected responses (docs/pipelines.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    score: str = Field(pattern=SCORE_PATH, description="the row's score, a dotted path: judge.score, "
                                                        "reward.helpfulness, reward.scalar")
    strategy: Strategy = Field("best_vs_worst", description="best_vs_worst, best_vs_random (seeded) or all_pairs")
    min_margin: float = Field(0.0, ge=0, allow_inf_nan=False,
                              description="chosen score - rejected score must be at least this (and > 0: ties never pair)")
    min_chosen: float | None = Field(None, allow_inf_nan=False, description="the chosen row's score must be at least this")
    seed: StrictInt = Field(0, description="best_vs_random's draw, with the prompt's id")
    check: PairCheck | None = Field(None, description="ask the generator A/B, in both orders, and keep a pair only when "
                                    "both pick the chosen response (infra/recipes/pair_check.py); off by default")


@dataclass(frozen=True)
class Pair:
    prompt_id: str
    chosen: dict
    rejected: dict
    chosen_score: float
    rejected_score: float
    chosen_at: tuple[int, ...] = (0,)  # each row's place among its prompt's rows (prompt_key)
    rejected_at: tuple[int, ...] = (0,)


@dataclass
class Pairing:
    pairs: list[Pair] = field(default_factory=list)
    prompts: int = 0  # prompts seen
    dropped: Counter = field(default_factory=Counter)  # reasons, per prompt (pairs_unscored: per row)


def score_of(row: dict, path: str) -> float | None:
    """The number at `path` (a.b.c) in the row, or None: missing, not a number, a bool, NaN or infinite."""
    value: object = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def prompt_key(row: dict, samples_stage: str | None = None) -> tuple[str, tuple[int, ...]]:
    """The prompt a row answers and the row's place among its prompt's rows (sample, then item).
    With `samples_stage` (the stage that generated the samples) and an id that stage derived, the
    prompt is the id's record; otherwise the row's own `id` and `sample`."""
    row_id = str(row.get("id"))
    seg = parse_child_id(row_id, samples_stage) if samples_stage else None
    if seg is not None:
        return seg.parent_id, (seg.sample, seg.item, int(row.get("sample", 0) or 0))
    return row_id, (int(row.get("sample", 0) or 0),)


def _pairs_of(prompt: str, scored: list[tuple[float, tuple[int, ...], dict]], p: PairParams) -> list[Pair] | str:
    if len(scored) < 2:
        return "pairs_single"
    # Best first; equal scores by sample, lowest first (the determinism the docs promise).
    ranked = sorted(scored, key=lambda s: (-s[0], s[1]))
    best, worst = ranked[0], min(scored, key=lambda s: (s[0], s[1]))
    if p.min_chosen is not None and best[0] < p.min_chosen:
        return "pairs_low_chosen"
    if best[0] == worst[0]:
        return "pairs_tie"

    def far(hi, lo) -> bool:
        return hi[0] > lo[0] and hi[0] - lo[0] >= p.min_margin

    if p.strategy == "best_vs_worst":
        chosen = [(best, worst)] if far(best, worst) else []
    elif p.strategy == "best_vs_random":
        below = sorted((s for s in scored if far(best, s)), key=lambda s: s[1])
        chosen = [(best, random.Random(f"{p.seed}\x00{prompt}").choice(below))] if below else []
    else:
        chosen = [(hi, lo) for i, hi in enumerate(ranked) for lo in ranked[i + 1:]
                  if far(hi, lo) and (p.min_chosen is None or hi[0] >= p.min_chosen)]
    if not chosen:
        return "pairs_margin"
    return [Pair(prompt, hi[2], lo[2], hi[0], lo[0], hi[1], lo[1]) for hi, lo in chosen]


def make_pairs(rows: Iterable[dict], params: PairParams, samples_stage: str | None = None) -> Pairing:
    """Every prompt's pairs, prompts in the order their first row comes, each prompt's pairs best
    chosen first. Reads the rows whole (one stage's kept rows)."""
    groups: dict[str, list[tuple[float, tuple[int, ...], dict]]] = {}
    out = Pairing()
    for row in rows:
        prompt, order = prompt_key(row, samples_stage)
        group = groups.setdefault(prompt, [])
        score = score_of(row, params.score)
        if score is None:
            out.dropped["pairs_unscored"] += 1
            continue
        group.append((score, order, row))
    for prompt, scored in groups.items():
        out.prompts += 1
        got = _pairs_of(prompt, scored, params)
        if isinstance(got, str):
            out.dropped[got] += 1
        else:
            out.pairs += got
    return out


def pair_id(pair: Pair) -> str:
    """The pair's id: its prompt's, and the places of its chosen and rejected rows among that prompt's."""
    return f"{pair.prompt_id}/pair." + "-".join("_".join(map(str, a)) for a in (pair.chosen_at, pair.rejected_at))


def pair_row(pair: Pair, params: PairParams) -> dict:
    """A pair as the pairs stage writes it (`pairs.jsonl`), from which every preference export is made."""
    c, r = pair.chosen, pair.rejected
    return {"id": pair_id(pair), "prompt_id": pair.prompt_id,
            "prompt": c.get("prompt"), "chosen": c.get("completion"), "rejected": r.get("completion"),
            "chosen_score": pair.chosen_score, "rejected_score": pair.rejected_score,
            "margin": pair.chosen_score - pair.rejected_score, "score": params.score,
            "chosen_id": c.get("id"), "rejected_id": r.get("id"),
            "chosen_sample": c.get("sample", 0), "rejected_sample": r.get("sample", 0),
            **({"lineage": c["lineage"]} if c.get("lineage") else {})}
