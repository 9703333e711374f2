"""Reading a pipeline file: YAML (JSON when its name ends in .json), from a local path, file:// or
s3://, through the input storage and NSDG_ALLOWED_URIS like any input.

A pipeline file may come from someone else, so what it can cost is bounded before it is believed:
at most `MAX_PIPELINE_BYTES`, `MAX_DEPTH` levels of nesting and `MAX_NODES` values; YAML is read
with the safe loader only (no Python objects), and aliases are refused (`*a`, and so `<<: *a`): a
few lines of nested aliases expand into billions of values (the "billion laughs"). A key given
twice is refused rather than the last one silently winning.

Locations in the file (inputs, templates, examples) that are relative paths are taken relative to
the file's own folder (or s3 prefix), so a pipeline and its templates travel together.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from infra.errors import ConfigError
from infra.pipeline.model import Pipeline, Stage
from infra.recipes.templates import is_template_uri, read_text
from infra.storage.locations import check_allowed
from infra.storage.uris import is_s3, local_path

MAX_PIPELINE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 20_000
SHOWN_PROBLEMS = 3


class _Refused(Exception):
    """The file is refused before it is read further; the message says where and why."""


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader, refusing aliases, deep nesting, too many values and keys given twice."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = self._nodes = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(f"line {line}: YAML alias *{event.anchor}: aliases are refused (a few nested ones expand "
                           "into billions of values); write the value out")
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Refused(f"line {line}: more than {MAX_NODES} values; a pipeline is a few stages of settings")
        if self._depth >= MAX_DEPTH:
            raise _Refused(f"line {line}: nested more than {MAX_DEPTH} levels deep")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key, _value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if (key.tag, key.value) in seen:
                    raise _Refused(f"line {key.start_mark.line + 1}: key {key.value!r} given twice; keep one")
                seen.add((key.tag, key.value))
        return super().construct_mapping(node, deep)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"key {key!r} given twice in one object; keep one")
        out[key] = value
    return out


def _check_shape(data: Any) -> None:
    """Depth and value count of parsed JSON (YAML is bounded while it is composed)."""
    stack, nodes = [(data, 1)], 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise _Refused(f"more than {MAX_NODES} values; a pipeline is a few stages of settings")
        if depth > MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children)


def parse_text(text: str, name: str) -> Any:
    """The file's value: JSON for a .json name, else YAML (of which JSON is mostly a subset)."""
    if name.lower().endswith(".json"):
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicates)
        except json.JSONDecodeError as exc:
            raise _Refused(f"line {exc.lineno}: not JSON: {exc.msg}") from None
        except RecursionError:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep") from None
        _check_shape(data)
        return data
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise _Refused(f"{where}not YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise _Refused(f"not YAML: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    except RecursionError:
        raise _Refused(f"nested more than {MAX_DEPTH} levels deep") from None


def describe_errors(exc: ValidationError, data: dict) -> str:
    """One line: each problem (the first few) naming the stage and the field."""
    stages = data.get("stages") if isinstance(data.get("stages"), list) else []
    problems = []
    for error in exc.errors():
        loc, msg = list(error["loc"]), error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        where = []
        if loc[:1] == ["stages"] and len(loc) > 1 and isinstance(loc[1], int):
            raw = stages[loc[1]] if loc[1] < len(stages) else None
            name = raw.get("name") if isinstance(raw, dict) else None
            where.append(f"stage {name!r}" if isinstance(name, str) else f"stages[{loc[1]}]")
            loc = loc[2:]
        if loc:
            where.append(".".join(map(str, loc)))
        problems.append(": ".join([*where, msg]).replace("\n", " "))
    more = len(problems) - SHOWN_PROBLEMS
    return "; ".join(problems[:SHOWN_PROBLEMS]) + (f" (and {more} more)" if more > 0 else "")


def pipeline_from_text(text: str, name: str) -> Pipeline:
    """The validated pipeline in `text` (the file `name`); ConfigError naming `name` and the problem."""
    try:
        data = parse_text(text, name)
    except _Refused as exc:
        raise ConfigError(f"pipeline {name}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"pipeline {name}: holds a {type(data).__name__}, not a pipeline (an object with input, "
                          "servers, defaults, stages; docs/pipelines.md)")
    try:
        return Pipeline.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"pipeline {name}: {describe_errors(exc, data)}") from None


def _relative_to(value: str | None, base: str) -> str | None:
    """`value` as the pipeline file at `base` means it: a relative path is in the file's folder."""
    if value is None or is_s3(value) or value.startswith("file://") or Path(value).expanduser().is_absolute():
        return value
    if is_s3(base):
        return posixpath.join(posixpath.dirname(base), value)
    return str(local_path(base).parent / value)


def _stage_relative_to(stage: Stage, base: str) -> Stage:
    def template(value: str | None) -> str | None:
        return _relative_to(value.strip(), base) if value and is_template_uri(value) else value

    recipe = stage.recipe.model_copy(update={"prompt_template": template(stage.recipe.prompt_template),
                                             "examples_uri": _relative_to(stage.recipe.examples_uri, base)})
    judge = stage.judge.model_copy(update={"template": template(stage.judge.template)})
    pairs = stage.pairs
    if pairs is not None and pairs.check is not None:  # the pair check's A/B template, a path like the others
        pairs = pairs.model_copy(update={"check": pairs.check.model_copy(update={"template": template(pairs.check.template)})})
    return stage.model_copy(update={"input": _relative_to(stage.input, base), "recipe": recipe, "judge": judge, "pairs": pairs})


def relative_to(pipeline: Pipeline, base: str) -> Pipeline:
    """The pipeline with its relative locations taken from the folder of `base` (the file's location)."""
    return pipeline.model_copy(update={"input": _relative_to(pipeline.input, base),
                                       "stages": [_stage_relative_to(s, base) for s in pipeline.stages]})


def locations(pipeline: Pipeline) -> dict[str, str]:
    """Every location the pipeline reads, by what names it in the file."""
    found = {"input": pipeline.input} if pipeline.input else {}
    for stage in pipeline.stages:
        where = f"stage {stage.name!r}"
        if stage.input:
            found[f"{where}: input"] = stage.input
        check = stage.pairs.check.locations() if stage.pairs is not None and stage.pairs.check is not None else {}
        for what, uri in {**stage.recipe.locations(), **stage.judge.locations(), **check}.items():
            found[f"{where}: {what}"] = uri
    return found


def load_pipeline(uri: str, settings) -> Pipeline:
    """The pipeline file at `uri`, validated, its locations resolved and each inside NSDG_ALLOWED_URIS."""
    check_allowed(uri, settings.allowed_uris, what="--pipeline")
    if not is_s3(uri) and not local_path(uri).is_file():
        raise ConfigError(f"pipeline {uri}: no such file ({local_path(uri).resolve()}); give the path of a pipeline "
                          "file (docs/pipelines.md)")
    data = read_text(uri, settings, "pipeline file", MAX_PIPELINE_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"pipeline {uri}: not UTF-8 (byte {exc.start}); save it as UTF-8 text") from None
    pipeline = relative_to(pipeline_from_text(text, uri), uri)
    for what, location in locations(pipeline).items():
        check_allowed(location, settings.allowed_uris, what=f"pipeline {uri}: {what}")
    return pipeline
