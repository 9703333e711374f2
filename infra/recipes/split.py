"""`split`: one reply of a pipeline stage becomes several rows (subtopics, questions ...). Pure.

A reply is cut into items by one parser (numbered or bulleted list, one item a line, a JSON list
of strings or objects, or a regex's group). A reply that gives no item, or fewer than `min_items`,
is dropped as a filter drops a row (a `Verdict`: `split_unparsed`, `split_too_few`, with what was
seen), counted, never a crash. More than `max_items` are cut to the first `max_items` by default:
a model asked for ten items that writes twelve wrote ten good ones first, and the cut bounds a
stage's fan-out (1 -> max_items), which is what the user set max_items for; `too_many: drop` drops
such a reply instead (`split_too_many`), for prompts where an overlong list means the model
misread the task. Each item's row gets a derived id and its lineage (infra.recipes.lineage).

Hostile replies: a reply over MAX_SPLIT_CHARS is not parsed (`split_unparsed`), so a reply of
50 MB costs a length check, and the JSON decoder never sees more than that; a regex runs in
infra.recipes.patterns with its CPU-time bound (a catastrophic pattern fails with its name, as
the filters' patterns do: it would be as slow on every reply).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from infra.recipes.filters import Verdict
from infra.recipes.lineage import ROW_FIELDS, child_id, child_lineage
from infra.recipes.patterns import checked_pattern, compile_pattern

Parser = Literal["numbered_list", "bulleted_list", "lines", "json_list", "regex"]
MAX_SPLIT_ITEMS = 1000  # fan-out of one reply; far above any list a prompt asks for
MAX_SPLIT_CHARS = 1 << 20  # 1 MiB: far above any reply of tokens_to_generate; a longer one is not parsed
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # a name a template can write as {{ name }}
_NUMBERED = re.compile(r"([ \t]*)(?:\d{1,6}[.)]|\(\d{1,6}\))(?:[ \t]+(.*))?")
_BULLETED = re.compile(r"([ \t]*)[-*+\u2022\u2023\u25e6\u25aa\u2013](?:[ \t]+(.*))?")
_MARKERS = {"numbered_list": _NUMBERED, "bulleted_list": _BULLETED}


class SplitParams(BaseModel):
    """How a stage's reply becomes several rows. Shown in the Prefect UI form with these descriptions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    parser: Parser = Field(
        description="numbered_list (1. / 1) / (1) items), bulleted_list (- * + • items), lines (each non-blank line), "
                    "json_list (the first [...] in the reply: strings, or objects whose fields become the row's), "
                    "regex (every match of `pattern`, its one group)")
    into: str = Field(description="the field each item's text goes to ({{ into }} in the next stage's template)")
    min_items: StrictInt = Field(1, ge=1, le=MAX_SPLIT_ITEMS, description="a reply with fewer items is dropped as split_too_few")
    max_items: StrictInt = Field(
        100, ge=1, le=MAX_SPLIT_ITEMS, description="a reply with more items keeps its first max_items (or is dropped: too_many)")
    too_many: Literal["truncate", "drop"] = Field(
        "truncate", description="past max_items: keep the first max_items, or drop the reply as split_too_many")
    pattern: str | None = Field(None, description="regex parser only: a regex with exactly one group, the item "
                                                  "(searched with a 1 CPU second bound per reply)")
    strip: StrictBool = Field(True, description="strip spaces around each item (lines, regex, json strings); "
                                                "an item blank after stripping is never a row")

    @model_validator(mode="after")
    def _check(self) -> "SplitParams":
        if not _FIELD.fullmatch(self.into) or self.into in ROW_FIELDS:
            raise ValueError(f"split.into {self.into!r} must be a field name (letters, digits, '_'; not a digit first) "
                             f"and not one of the row's own fields {list(ROW_FIELDS)}")
        if self.min_items > self.max_items:
            raise ValueError(f"split.min_items {self.min_items} is above split.max_items {self.max_items}")
        if self.parser == "regex":
            if not self.pattern:
                raise ValueError("split.parser regex needs split.pattern, a regex with one group: the item")
            groups = checked_pattern(self.pattern, "split.pattern").compiled.groups
            if groups != 1:
                raise ValueError(f"split.pattern {self.pattern!r} has {groups} groups: it needs exactly one, the item "
                                 "(write other groups as (?:...))")
        elif self.pattern is not None:
            raise ValueError(f"split.pattern is only read by the regex parser, not by {self.parser}: remove it")
        return self


Item = str | dict


@dataclass(frozen=True)
class Split:
    items: list[Item]  # strings, or dicts for JSON objects; at most max_items
    found: int  # items in the reply (the regex parser stops counting at max_items + 1)


def split_reply(reply: str | None, params: SplitParams, validated: list | None = None) -> Split | Verdict:
    """The reply's items, or why it is dropped. `validated`: the reply's JSON list as output_schema
    parsed and validated it (infra/recipes/structured.py), cut here instead of the text."""
    if validated is not None:
        found = _json_elements(validated, params.strip)
        return _counted(found, params) if not isinstance(found, Verdict) else found
    if reply is None:
        return Verdict("split_unparsed", "no reply", params.parser)
    if len(reply) > MAX_SPLIT_CHARS:
        return Verdict("split_unparsed", f"reply of {len(reply)} characters, over {MAX_SPLIT_CHARS}", params.parser)
    if params.parser == "json_list":
        found = _json_items(reply, params.strip)
        if isinstance(found, Verdict):
            return found
    elif params.parser == "regex":
        rx = compile_pattern(params.pattern, "split.pattern", "then rerun under the same run_id")
        found = [_clean(m.group(1), params.strip) for m in rx.finditer(reply, params.max_items + 1) if m.group(1) is not None]
        found = [i for i in found if i]
    elif params.parser == "lines":
        found = [i for line in reply.splitlines() if (i := _clean(line, params.strip))]
    else:
        found = _list_items(reply, _MARKERS[params.parser])
    return _counted(found, params) if found else Verdict("split_unparsed", reply[:100], params.parser)


def _counted(found: list[Item], params: SplitParams) -> Split | Verdict:
    if not found:
        return Verdict("split_unparsed", "an empty list", params.parser)
    if len(found) < params.min_items:
        return Verdict("split_too_few", len(found), params.min_items)
    if len(found) > params.max_items:
        if params.too_many == "drop":
            return Verdict("split_too_many", len(found), params.max_items)
    return Split(found[:params.max_items], len(found))


def _clean(text: str, strip: bool) -> str:
    return text.strip() if strip else ("" if not text.strip() else text)


def _list_items(reply: str, marker: re.Pattern) -> list[str]:
    """Items at the first marker's indentation. An indented line under an item continues it (a
    wrapped line); an indented marker of either kind is a nested item, left inside its parent's
    reply and not made a row, and so is what follows it; an unindented line that is no item
    (a preamble, "I hope this helps") ends the item before it."""
    items: list[list[str]] = []
    top: int | None = None
    current: list[str] | None = None
    for line in reply.splitlines():
        m = marker.fullmatch(line)
        indent = len(line.expandtabs(4)) - len(line.expandtabs(4).lstrip())
        if m is not None and (top is None or indent <= top):
            top = indent if top is None else min(top, indent)
            current = [m.group(2) or ""]
            items.append(current)
        elif not line.strip():
            continue  # a blank line inside a list: the next line decides
        elif top is None or indent <= top or m is not None or any(p.fullmatch(line) for p in _MARKERS.values()):
            current = None
        elif current is not None:
            current.append(line)
    return [text for parts in items if (text := " ".join(p.strip() for p in parts).strip())]


def _json_items(reply: str, strip: bool) -> list[Item] | Verdict:
    """The first JSON list in the reply (text before and after it ignored: models wrap JSON in prose
    and code fences). Strings and objects; any other element fails the reply."""
    start = reply.find("[")
    if start < 0:
        return Verdict("split_unparsed", "no JSON list ('[') in the reply", "json_list")
    try:
        value, _end = json.JSONDecoder().raw_decode(reply, start)
    except ValueError as exc:  # JSONDecodeError, or an integer of too many digits
        return Verdict("split_unparsed", f"invalid JSON list: {getattr(exc, 'msg', exc)} at character {getattr(exc, 'pos', '?')}", "json_list")
    except RecursionError:
        return Verdict("split_unparsed", "invalid JSON list: nested too deep", "json_list")
    return _json_elements(value, strip)


def _json_elements(value: list, strip: bool) -> list[Item] | Verdict:
    """A JSON list's strings and objects; any other element fails the reply."""
    if not isinstance(value, list):
        return Verdict("split_unparsed", f"a JSON {type(value).__name__}, not a list", "json_list")
    items: list[Item] = []
    for i, element in enumerate(value):
        if isinstance(element, str):
            if text := _clean(element, strip):
                items.append(text)
        elif isinstance(element, dict):
            if element:
                items.append(element)
        else:
            return Verdict("split_unparsed", f"element {i} is {type(element).__name__}, not a string or an object", "json_list")
    return items


def item_fields(item: Item, into: str) -> dict:
    """The row fields an item brings: a string under `into`; an object's fields under their names,
    one the row owns (id, completion ...) renamed item_<name>, as output_record renames input_<name>."""
    if isinstance(item, str):
        return {into: item}
    return {(f"item_{k}" if k in ROW_FIELDS else k): v for k, v in item.items()}


def stage_rows(row: dict, stage: str, split: SplitParams | None) -> list[dict] | Verdict:
    """The rows stage `stage` writes for one generated row (output_record's shape: the record's
    fields, its id, sample, prompt, completion, generation, and `lineage` when the record came from
    an earlier stage): one per item, or one with item 0 when the stage does not split. Each gets a
    derived id and its lineage; a split row's `completion` is its item (filters and dedup then judge
    items, not the whole reply), and a record field its item also names moves to `parent.<name>`."""
    record_id, sample = str(row["id"]), int(row.get("sample", 0))
    lineage = child_lineage(row.get("lineage") or [], record_id)
    structured = (row.get("generation") or {}).get("structured")
    validated = row.get("output") if split is not None and structured and isinstance(row.get("output"), list) else None
    base = {k: v for k, v in row.items() if k not in ("id", "lineage") and not (validated is not None and k == "output")}
    if split is None:
        return [{**base, "id": child_id(record_id, sample, stage, 0), "lineage": lineage}]
    result = split_reply(row.get("completion"), split, validated)
    if isinstance(result, Verdict):
        return result
    rows = []
    for i, item in enumerate(result.items):
        own = item_fields(item, split.into)
        moved = {k: v for k, v in base.items() if k in own}
        child = {k: v for k, v in base.items() if k not in own}
        if moved:
            child["parent"] = {**(child.get("parent") or {}), **moved}
        text = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
        rows.append({**child, **own, "id": child_id(record_id, sample, stage, i), "completion": text,
                     "lineage": lineage, "split": {"item": i, "items": len(result.items), "found": result.found}})
    return rows
