"""`output_schema`: a reply that must be one JSON value matching a JSON Schema (Draft 2020-12). Pure.

The schema is checked once, before anything is read or allocated (`check_schema`): the meta-schema,
and bounds against a hostile one, each refused in one line: its size, nesting and node count; a
`$ref` that is not inside the schema (`#...`: nothing is ever fetched) or does not resolve there; `patternProperties` (the
validator matches those with `re`, unbounded, in three places); a `pattern` that is no regex, too
long, or backtracks catastrophically on short texts built to make it (infra/recipes/patterns.py
`backtracks`: refused before the GPU is held, not after, when a reply's validation runs out its bound);
a schema whose `$ref`s loop on one value (validation would never end).

A reply is parsed (`parse_reply`): the JSON value inside surrounding prose or a code fence (models
wrap JSON in both), at most MAX_REPLY_CHARS and MAX_CANDIDATES starting brackets tried; then
validated, every `pattern` searched in the `regex` module with infra.recipes.patterns' CPU-time
bound (a catastrophic pattern fails with its name, as the filters' patterns do). The result is the
value, or the parse or validation error: the row's `schema_invalid` reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator, SchemaError, ValidationError, validators
from referencing import Registry
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from infra.errors import ConfigError, one_line
from infra.recipes.patterns import UserPattern, checked_pattern, compile_pattern

DRAFT = "https://json-schema.org/draft/2020-12/schema"
MAX_SCHEMA_BYTES = 64 << 10  # far above any schema of a reply's fields; a larger one is refused
MAX_SCHEMA_DEPTH = 32
MAX_SCHEMA_NODES = 5000
MAX_PATTERN_CHARS = 1000
MAX_REPLY_CHARS = 256 << 10  # a longer reply is not parsed: it is invalid (no decoder or validator sees it)
MAX_CANDIDATES = 16  # opening brackets tried in one reply (a stray '{' in prose is skipped)
MAX_ERROR_CHARS = 300
_REFS = ("$ref", "$dynamicRef", "$recursiveRef")


def schema_from_text(value: Any) -> Any:
    """A schema given as JSON text, parsed; anything else as it is. A run's output_schema travels
    as text in its flow parameters: Prefect reads any object holding a `$ref` key in a flow
    parameter as a reference to one of its blocks, and fails the run before it starts."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise ValueError(f"not JSON text ({exc}); give the schema as a JSON object") from None
    except RecursionError:
        raise ValueError("JSON text nested too deep") from None


def check_schema(schema: Any) -> dict:
    """The schema, or ValueError with one line (a pydantic validator's error): a key it quotes may hold
    a line break, escaped here."""
    try:
        return _check_schema(schema)
    except ValueError as exc:
        raise ValueError(one_line(str(exc))) from None


def _check_schema(schema: Any) -> dict:
    if not isinstance(schema, dict):
        raise ValueError(f"must be a JSON object (a JSON Schema), not {type(schema).__name__}")
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_BYTES:
        raise ValueError(f"{size} bytes of JSON, over {MAX_SCHEMA_BYTES}: describe the reply's fields only")
    if schema.get("$schema", DRAFT) != DRAFT:
        raise ValueError(f"$schema {schema['$schema']!r}: only Draft 2020-12 ({DRAFT}) is read; drop $schema")
    nodes, refs, probed = 0, [], set()
    stack: list[tuple[Any, str, int]] = [(schema, "$", 1)]
    while stack:
        node, where, depth = stack.pop()
        nodes += 1
        if depth > MAX_SCHEMA_DEPTH or nodes > MAX_SCHEMA_NODES:
            raise ValueError(f"nests deeper than {MAX_SCHEMA_DEPTH} or holds over {MAX_SCHEMA_NODES} "
                             f"values (at {where}): describe the reply's fields only")
        if isinstance(node, dict):
            for key in _REFS:
                if key in node and not (isinstance(node[key], str) and node[key].startswith("#")):
                    raise ValueError(f"{where}.{key} {node[key]!r}: only references inside the schema (#/$defs/...) "
                                     "are followed; nothing is fetched. Inline the referenced schema under $defs")
                if key in node:
                    refs.append((f"{where}.{key}", node[key]))
            if "patternProperties" in node:
                raise ValueError(f"{where}.patternProperties: not supported (the validator would match its patterns "
                                 "without a time bound); list the properties, or use propertyNames with a pattern")
            if "pattern" in node and isinstance(node["pattern"], str):
                if len(node["pattern"]) > MAX_PATTERN_CHARS:
                    raise ValueError(f"{where}.pattern is {len(node['pattern'])} characters, over {MAX_PATTERN_CHARS}")
                if node["pattern"] not in probed:
                    probed.add(node["pattern"])
                    checked_pattern(node["pattern"], f"{where}.pattern")
            stack += [(v, f"{where}.{k}", depth + 1) for k, v in node.items()]
        elif isinstance(node, list):
            stack += [(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(node)]
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"not a valid JSON Schema (Draft 2020-12) at {exc.json_path}: "
                         f"{exc.message[:MAX_ERROR_CHARS]}") from None
    resolver = Registry().resolver_with_root(DRAFT202012.create_resource(schema))
    for where, ref in refs:
        try:
            resolver.lookup(ref)
        except Unresolvable:
            raise ValueError(f"{where} {ref!r} does not resolve inside the schema; define it (under $defs)") from None
    checker = Structured(schema)
    for probe in ({}, [], "", 0, None, True):  # a $ref loop recurses on any value the loop reaches
        try:
            checker.errors(probe)
        except RecursionError:
            raise ValueError("its $refs loop on one value (a schema that refers to itself without "
                             "descending into a property or item); validation would never end") from None
    return schema


def _bounded_pattern(validator, pattern: str, instance, schema):
    if validator.is_type(instance, "string"):
        rx = _compiled(pattern)
        if rx.search(instance) is None:
            yield ValidationError(f"{instance[:80]!r} does not match {pattern!r}")


_PATTERNS: dict[str, UserPattern] = {}  # compiled once per pattern; patterns come from checked schemas


def _compiled(pattern: str) -> UserPattern:
    if (rx := _PATTERNS.get(pattern)) is None:
        rx = _PATTERNS.setdefault(pattern, compile_pattern(pattern, "output_schema pattern",
                                                           "then start a new run (--new-run) with the schema fixed"))
    return rx


# Draft 2020-12 with `pattern` searched in `regex`, within SEARCH_SECONDS of CPU time.
_Validator = validators.extend(Draft202012Validator, {"pattern": _bounded_pattern})


@dataclass(frozen=True)
class Parsed:
    value: Any


@dataclass(frozen=True)
class Invalid:
    error: str  # what a user reads in filtered.jsonl: why the reply is no value of the schema


@dataclass
class Structured:
    """A checked schema, ready to parse and validate replies."""

    schema: dict
    _validator: Any = field(init=False, repr=False)

    def __post_init__(self):
        self._validator = _Validator(self.schema)

    @property
    def kind(self) -> str | None:
        kind = self.schema.get("type")
        return kind if isinstance(kind, str) else None

    def errors(self, value: Any) -> str | None:
        """The first validation error (its path and message), or None."""
        error = next(iter(sorted(self._validator.iter_errors(value), key=lambda e: list(e.path))), None)
        return None if error is None else f"at {error.json_path}: {error.message}"[:MAX_ERROR_CHARS]

    def check(self, reply: str | None) -> Parsed | Invalid:
        found = parse_reply(reply, self.kind)
        if isinstance(found, Invalid):
            return found
        try:
            error = self.errors(found.value)
        except RecursionError:
            return Invalid("the reply nests too deep to validate")
        except Unresolvable as exc:  # a $ref under a nested $id, which the check resolved from the root
            raise ConfigError(f"output_schema: a $ref does not resolve ({exc}); fix the schema, then start a new run "
                              "(--new-run)") from None
        return found if error is None else Invalid(f"does not match output_schema {error}")


def _fenced(text: str) -> str:
    """The first code fence's content (```json ... ```), else the text."""
    start = text.find("```")
    if start < 0:
        return text
    body = text.find("\n", start)
    end = text.find("```", body + 1) if body >= 0 else -1
    return text[body + 1:end] if body >= 0 and end >= 0 else text


def parse_reply(reply: str | None, kind: str | None = None) -> Parsed | Invalid:
    """The first JSON value in the reply: the whole (fence-stripped) text when it is JSON, else the
    first `{` (an object schema), `[` (an array schema) or either that opens a complete value."""
    if reply is None:
        return Invalid("no reply")
    if len(reply) > MAX_REPLY_CHARS:
        return Invalid(f"reply of {len(reply)} characters, over {MAX_REPLY_CHARS}: not parsed")
    text = _fenced(reply).strip()
    decoder = json.JSONDecoder()
    try:
        return Parsed(json.loads(text))
    except ValueError:
        pass
    except RecursionError:
        return Invalid("invalid JSON: nested too deep")
    opens = {"object": "{", "array": "["}.get(kind or "", "{[")
    last = "no JSON " + {"{": "object ('{')", "[": "list ('[')"}.get(opens, "value") + " in the reply"
    pos, tries = 0, 0
    while tries < MAX_CANDIDATES:
        starts = [i for i in (text.find(c, pos) for c in opens) if i >= 0]
        if not starts:
            break
        pos, tries = min(starts), tries + 1
        try:
            return Parsed(decoder.raw_decode(text, pos)[0])
        except ValueError as exc:  # JSONDecodeError, or an integer of too many digits
            last = f"invalid JSON: {getattr(exc, 'msg', exc)} at character {getattr(exc, 'pos', '?')}"
        except RecursionError:
            return Invalid("invalid JSON: nested too deep")
        pos += 1
    return Invalid(last)


def reply_fields(value: Any, reserved: tuple[str, ...]) -> dict:
    """The row fields a valid reply brings: an object's fields under their names (one the row owns,
    id or completion ..., as output_<name>); any other value as `output`."""
    if isinstance(value, dict):
        return {(f"output_{k}" if k in reserved else k): v for k, v in value.items()}
    return {"output": value}
