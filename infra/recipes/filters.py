"""Filters over generated (and judged) records, each named with its parameters.

As in datatrove's filters, a filter looks at one row and returns None (keep) or a `Verdict`
(drop: the filter's name, the value it measured, the limit it applied). The chain runs the cheap
filters first and stops at the first that drops; run-level dedup (infra.recipes.dedup) comes
after, so a record dropped for another reason never shadows a later one as "the first".
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from infra.recipes.params import FilterParams, JudgeParams
from infra.recipes.patterns import UserPattern, compile_pattern

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Verdict:
    filter: str
    value: object = None  # what the filter measured
    limit: object = None  # what it compared against

    def as_dict(self) -> dict:
        return {"filter": self.filter, "value": self.value, "limit": self.limit}


Filter = Callable[[dict], Verdict | None]


def normalize(text: str) -> str:
    """The text exact dedup compares: Unicode NFKC, case-folded, runs of spaces made one, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())  # split(): any Unicode space, faster than a regex


def words(text: str) -> list[str]:
    """Case-folded word tokens, for n-grams and shingles (no NFKC: a word is a word in either form)."""
    return _WORD.findall(text.casefold())


def repeated_ngram_share(text: str, n: int) -> float:
    """The share of the text's word n-grams that repeat an earlier one (0 for fewer than n words)."""
    toks = words(text)
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    return 0.0 if not grams else round(1 - len(set(grams)) / len(grams), 4)


def parse_score(reply: str | None, pattern: UserPattern) -> float | None:
    """The score in a judge's reply: the pattern's first group (else its whole match) as a number."""
    if reply is None:
        return None
    m = pattern.search(reply)
    if m is None:
        return None
    try:
        return float(m.group(1) if m.groups() else m.group(0))
    except (TypeError, ValueError):
        return None


def _ngram_share(row: dict, n: int) -> float:
    """A light row of a re-filter carries its share for one n (infra.recipes.filter_inputs); else measured."""
    known = row.get("_ngram")
    return known[1] if known is not None and known[0] == n else repeated_ngram_share(row.get("completion") or "", n)


def user_patterns(params: FilterParams) -> list[tuple[str, UserPattern]]:
    """The must_match then the must_not_match patterns, compiled, each named as the user names it."""
    return [(kind, compile_pattern(pattern, f"filters.{kind}[{i}]"))
            for kind in ("must_match", "must_not_match") for i, pattern in enumerate(getattr(params, kind))]


def match(rx: UserPattern, text: str) -> str | None:
    """What the pattern found first in the text, cut to 100 characters (a must_not_match verdict's value), or None."""
    m = rx.search(text)
    return None if m is None else m.group(0)[:100]


_UNSEEN = object()


def _match(row: dict, rx: UserPattern) -> str | None:
    """A light row of a re-filter carries each match of the patterns its side file was built with (a
    search with a time bound costs ~4 µs however short the text); else searched."""
    known = row.get("_matches")
    if known is not None and (found := known.get(rx.pattern, _UNSEEN)) is not _UNSEEN:
        return found
    return match(rx, row.get("completion") or "")


def _tokens(row: dict) -> int:
    return int((row.get("generation") or {}).get("generated_tokens") or 0)


def _schema_invalid(row: dict) -> Verdict | None:
    """A row whose reply never matched output_schema (infra/recipes/structured.py): the last
    attempt's parse or validation error, and the attempts made."""
    s = (row.get("generation") or {}).get("structured") or {}
    return Verdict("schema_invalid", s["error"], s.get("attempts")) if s.get("error") else None


def build_filters(params: FilterParams, judge: JudgeParams | None = None, *, schema: bool = False) -> list[tuple[str, Filter]]:
    """The row filters the parameters ask for, cheapest first."""
    out: list[tuple[str, Filter]] = [("schema_invalid", _schema_invalid)] if schema else []
    if params.drop_truncated:
        out.append(("truncated", lambda r: Verdict("truncated", "length", "finish_reason")
                    if (r.get("generation") or {}).get("finish_reason") == "length" else None))
    if (lo := params.min_completion_tokens) is not None:
        out.append(("min_completion_tokens", lambda r: Verdict("min_completion_tokens", n, lo) if (n := _tokens(r)) < lo else None))
    if (hi := params.max_completion_tokens) is not None:
        out.append(("max_completion_tokens", lambda r: Verdict("max_completion_tokens", n, hi) if (n := _tokens(r)) > hi else None))
    for kind, rx in user_patterns(params):
        if kind == "must_match":
            out.append((kind, lambda r, rx=rx: None if _match(r, rx) is not None else Verdict("must_match", False, rx.pattern)))
        else:
            out.append((kind, lambda r, rx=rx: Verdict("must_not_match", m, rx.pattern) if (m := _match(r, rx)) is not None else None))
    if (share := params.max_repeated_ngram_share) is not None:
        n = params.ngram_size
        out.append(("repeated_ngrams", lambda r: Verdict("repeated_ngrams", s, share)
                    if (s := _ngram_share(r, n)) > share else None))
    if judge is not None and judge.enabled:
        out.append(("judge", _judge_filter(judge)))
    return out


def _judge_filter(judge: JudgeParams) -> Filter:
    """Reads the score from the row's judge reply (so a new score_pattern or min_score needs no GPU),
    sets `row["judge"]["score"]`, and drops unparsed or failed replies under reasons of their own."""
    rx = compile_pattern(judge.score_pattern, "judge.score_pattern")

    def check(row: dict) -> Verdict | None:
        j = row.get("judge") or {}
        if j.get("error"):
            return Verdict("judge_failed", j["error"][:200])
        score = parse_score(j.get("reply"), rx)
        j["score"] = score
        if score is None:
            return Verdict("judge_unparsed", (j.get("reply") or "")[:100], judge.score_pattern)
        if judge.min_score is not None and score < judge.min_score:
            return Verdict("judge_min_score", score, judge.min_score)
        return None

    return check


def first_verdict(filters: list[tuple[str, Filter]], row: dict) -> Verdict | None:
    for _name, f in filters:
        if (v := f(row)) is not None:
            return v
    return None
