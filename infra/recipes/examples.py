"""Few-shot examples: a small JSONL file held in memory, k chosen per record from its id.

The choice is a partial Fisher-Yates shuffle driven by sha256(record id, step): the same on
every rerun and every Python version, k hashes per record whatever the pool size. An example
is never the record itself: one with the record's id, or with the record's fields (the same
object, id aside), is left out.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from infra.errors import ConfigError
from infra.recipes.templates import read_text

MAX_EXAMPLES_BYTES = 16 << 20


def _content_key(obj: dict) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in obj.items() if k != "id"}, sort_keys=True,
                                     ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class Examples:
    uri: str
    sha256: str  # of the file's bytes: part of the run's config
    items: tuple[dict, ...]

    def __post_init__(self):
        by_id: dict[str, list[int]] = {}
        by_content: dict[str, list[int]] = {}
        for i, ex in enumerate(self.items):
            if "id" in ex:
                by_id.setdefault(str(ex["id"]), []).append(i)
            by_content.setdefault(_content_key(ex), []).append(i)
        object.__setattr__(self, "_by_id", by_id)
        object.__setattr__(self, "_by_content", by_content)
        # The field names (id aside) of the examples: a record with other names equals none of them,
        # and is not hashed (a JSON dump and a sha256 per record, most of a pick's cost).
        object.__setattr__(self, "_names", {frozenset(ex.keys() - {"id"}) for ex in self.items})

    def excluded(self, record_id: str, fields: dict) -> set[int]:
        """The examples that are this record."""
        same = set(self._by_id.get(record_id, ()))
        if frozenset(fields.keys() - {"id"}) in self._names:
            same |= set(self._by_content.get(_content_key(fields), ()))
        return same

    def pick(self, record_id: str, fields: dict, k: int) -> list[dict] | None:
        """k examples for this record, in a stable order; None when fewer than k are not the record."""
        skip = self.excluded(record_id, fields)
        n = len(self.items)
        if n - len(skip) < k:
            return None
        swaps: dict[int, int] = {}
        chosen: list[int] = []
        step = 0
        while len(chosen) < k:  # at most k + len(skip) steps
            h = int.from_bytes(hashlib.sha256(f"{record_id}\x00{step}".encode()).digest()[:8], "big")
            j = step + h % (n - step)
            picked = swaps.get(j, j)
            swaps[j] = swaps.get(step, step)
            if picked not in skip:
                chosen.append(picked)
            step += 1
        return [self.items[i] for i in chosen]


def load_examples(uri: str, settings, k: int) -> Examples:
    data = read_text(uri, settings, "examples file", MAX_EXAMPLES_BYTES)
    items = []
    for lineno, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"examples file {uri} line {lineno}: not valid JSON ({exc}). Fix the line.") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"examples file {uri} line {lineno}: expected a JSON object, got {type(obj).__name__}.")
        items.append(obj)
    if len(items) <= k:
        raise ConfigError(f"examples file {uri} has {len(items)} example(s); examples_per_prompt={k} needs at least "
                          f"{k + 1} (one may be the record itself). Add examples or lower examples_per_prompt.")
    return Examples(uri, hashlib.sha256(data).hexdigest(), tuple(items))
