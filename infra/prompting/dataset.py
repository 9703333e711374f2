"""The prompt dataset: streamed line by line, never loaded whole.

JSONL (one object a line, the prompt under `prompt_field`, other fields passed through) or plain
text (one prompt a line). Each record gets an id that is stable across reruns of the same input:
the input's own `id` field when it has one, else one derived from the line number and prompt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Literal

import orjson

from infra.run.layout import part_name

Format = Literal["jsonl", "text"]
MAX_LINE_BYTES = 1 << 20  # 1 MiB: far above 4096 tokens; a longer line is a mistake, not a prompt
RESERVED_FIELDS = ("id", "sample", "prompt", "completion", "generation")


@dataclass(frozen=True)
class Record:
    id: str
    prompt: str
    line: int
    fields: dict = field(default_factory=dict)
    given_id: bool = False  # the input named it; else derived from the line number and prompt


@dataclass(frozen=True)
class BadLine:
    line: int
    reason: str
    raw: str  # at most 200 characters of the line, for the rejects file

    def as_reject(self, source: str) -> dict:
        return {"source": source, "line": self.line, "reason": self.reason, "raw": self.raw}


def detect_format(uri: str) -> Format:
    name = uri.lower().removesuffix(".gz")
    return "text" if name.endswith(".txt") else "jsonl"


def derived_id(line: int, prompt: str) -> str:
    return f"L{line:09d}-{hashlib.sha256(prompt.encode()).hexdigest()[:8]}"


def parse_line(raw: bytes, line: int, fmt: Format, prompt_field: str | None, id_field: str = "id") -> Record | BadLine | None:
    """A record, a bad line with its reason, or None for a blank line. `prompt_field` None: a
    template builds the prompt from the fields (infra.recipes), so none is required here."""
    if fmt == "jsonl" and prompt_field is not None and (rec := _plain_record(raw, line, prompt_field, id_field)) is not None:
        return rec
    shown = raw[:200].decode("utf-8", errors="replace")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadLine(line, f"not valid UTF-8 at byte {exc.start}", shown)
    text = text.rstrip("\r\n")
    if not text.strip():
        return None
    if fmt == "text":
        return Record(derived_id(line, text), text, line)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return BadLine(line, f"invalid JSON: {exc.msg} at column {exc.colno}", shown)
    if not isinstance(obj, dict):
        return BadLine(line, f"expected a JSON object, got {type(obj).__name__}", shown)
    if prompt_field is None:
        return _templated_record(obj, text, line, id_field, shown)
    prompt = obj.get(prompt_field)
    if prompt is None:
        return BadLine(line, f"missing prompt field {prompt_field!r}", shown)
    if not isinstance(prompt, str):
        return BadLine(line, f"prompt field {prompt_field!r} is a {type(prompt).__name__}, not a string", shown)
    if not prompt.strip():
        return BadLine(line, f"prompt field {prompt_field!r} is empty", shown)
    rid = obj.get(id_field)
    if rid is not None and not isinstance(rid, (str, int)):
        return BadLine(line, f"id field {id_field!r} must be a string or integer", shown)
    return _prompt_record(obj, prompt, rid, line, prompt_field, id_field)


def _prompt_record(obj: dict, prompt: str, rid: str | int | None, line: int, prompt_field: str, id_field: str) -> Record:
    """The record of a checked line: every field but the prompt and the id passes through; no id, one derived."""
    passthrough = {k: v for k, v in obj.items() if k != prompt_field and k != id_field}
    if rid is None:
        return Record(derived_id(line, prompt), prompt, line, passthrough)
    return Record(str(rid), prompt, line, passthrough, given_id=True)


def _plain_record(raw: bytes, line: int, prompt_field: str, id_field: str) -> Record | None:
    """The usual line read in one orjson call: an object whose prompt is a non-blank string and whose
    id, if it has one, is a string or an int. None for anything else, and for what orjson refuses
    that json may take (NaN, 1e400, a lone surrogate, a BOM): parse_line's careful path reads those,
    with its reasons. Where both accept a line they build the same dict (a repeated key keeps its
    first place and last value in both). Why: the plan and then the generation pass read every line,
    and json.loads's own Python costs a few µs a line (issue 28)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(obj) is not dict:
        return None
    prompt, rid = obj.get(prompt_field), obj.get(id_field)
    if type(prompt) is not str or not prompt.strip() or not (rid is None or type(rid) is str or type(rid) is int):
        return None
    return _prompt_record(obj, prompt, rid, line, prompt_field, id_field)


def _templated_record(obj: dict, text: str, line: int, id_field: str, shown: str) -> Record | BadLine:
    """A record whose prompt the template renders: every field but the id passes through, and a
    derived id hashes the whole line."""
    rid = obj.get(id_field)
    if rid is not None and not isinstance(rid, (str, int)):
        return BadLine(line, f"id field {id_field!r} must be a string or integer", shown)
    fields = {k: v for k, v in obj.items() if k != id_field}
    if rid is None:
        return Record(derived_id(line, text), "", line, fields)
    return Record(str(rid), "", line, fields, given_id=True)


def iter_lines(stream: BinaryIO, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) pairs; bytes is None for a line longer than `max_line_bytes`, whose
    rest is skipped without holding it in memory."""
    lineno = 0
    while True:
        chunk = stream.readline(max_line_bytes + 1)
        if not chunk:
            return
        lineno += 1
        if len(chunk) > max_line_bytes and not chunk.endswith(b"\n"):
            while (more := stream.readline(1 << 20)) and not more.endswith(b"\n"):
                pass
            yield lineno, None
            continue
        yield lineno, chunk


def iter_input(stream: BinaryIO, fmt: Format, prompt_field: str | None, id_field: str = "id",
               max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Record | BadLine]:
    for lineno, raw in iter_lines(stream, max_line_bytes):
        if raw is None:
            yield BadLine(lineno, f"line longer than {max_line_bytes} bytes", "")
            continue
        item = parse_line(raw, lineno, fmt, prompt_field, id_field)
        if item is not None:
            yield item


@dataclass(frozen=True)
class Shard:
    index: int
    records: list[Record]

    @property
    def name(self) -> str:
        return part_name(self.index)




def iter_shards(records: Iterable[Record], shard_size: int, skip: frozenset[int] = frozenset()) -> Iterator[Shard]:
    """Cut records into fixed-size shards in input order. Shards in `skip` (already published)
    are read past but not built, so memory holds one shard at a time."""
    index, count, batch = 0, 0, []
    for rec in records:
        if index not in skip:
            batch.append(rec)
        count += 1
        if count == shard_size:
            if index not in skip:
                yield Shard(index, batch)
            index, count, batch = index + 1, 0, []
    if count and index not in skip:
        yield Shard(index, batch)


def shard_count(records: int, shard_size: int) -> int:
    return -(-records // shard_size)
