"""Constrained decoding, as the stand-in plays it: a request carrying vLLM's `structured_outputs:
{json: schema}` or trtllm-serve's `response_format: {type: json, schema}` is answered with a JSON
value of that schema instead of free text, so a run over the `vllm` or `trtllm` engine can be
checked end to end against the request fields those engines read (infra/engines/openai.py
constraint_fields). Neither field in the request: the reply is the model's text, as NeMo's.

The simulated engine decodes no grammar: it builds a small value of the schema (required and
listed properties, `minItems` items, an enum's or a const's first value), filling strings with the
words it generated, so two requests still differ as their free text would. A malformed field is a
400, as the engines' request validation answers.
"""

from __future__ import annotations

from typing import Any


def requested_schema(body: dict) -> dict | None:
    """The JSON Schema a request constrains its reply to, or None; ValueError (the route's 400) for a malformed field."""
    outputs, fmt = body.get("structured_outputs"), body.get("response_format")
    if outputs is not None:
        if not isinstance(outputs, dict) or not isinstance(outputs.get("json"), (dict, str)):
            raise ValueError("structured_outputs must be an object with a `json` schema (vLLM's StructuredOutputsParams)")
        return outputs["json"] if isinstance(outputs["json"], dict) else {}
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json", "json_object"):
            raise ValueError("response_format.type must be text, json or json_object (trtllm-serve's ResponseFormat)")
        if fmt["type"] == "json" and not isinstance(fmt.get("schema"), dict):
            raise ValueError("response_format.schema is required for response_format.type == 'json'")
        return fmt.get("schema") if fmt["type"] == "json" else ({} if fmt["type"] == "json_object" else None)
    return None


def value_of(schema: Any, words: list[str], depth: int = 0) -> Any:
    """A small value of `schema`, its strings taken from `words` (the engine's free text)."""
    if not isinstance(schema, dict) or depth > 8:
        return {}
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    kind = kind[0] if isinstance(kind, list) and kind else kind
    if kind == "string":
        text = " ".join(words[:3]) or "x"
        return text.ljust(int(schema.get("minLength") or 0), "x")
    if kind in ("integer", "number"):
        return max(len(words), int(schema.get("minimum") or 0))
    if kind == "boolean":
        return bool(len(words) % 2)
    if kind == "null":
        return None
    if kind == "array":
        count = int(schema.get("minItems") or 1)
        return [value_of(schema.get("items"), words[i:] or words, depth + 1) for i in range(count)]
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    names = list(dict.fromkeys([*(schema.get("required") or []), *props]))
    return {name: value_of(props.get(name, {"type": "string"}), words[i:] or words, depth + 1)
            for i, name in enumerate(names) if isinstance(name, str)}
