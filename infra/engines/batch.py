"""What both API clients take and give for a shard's prompts (or a part's judging prompts), so the
generation step and the judge call one method whatever the engine: `generate_batch(PromptBatch)`
gives one `GeneratedText`, or the `RequestRejected` that refused it, per (prompt, sample), in
prompt-major order (result i * samples + s), however the requests were sent.

How each API sends them is its own: NeMo's /generate in length-grouped batches of one sample
index, a rejected batch bisected until the prompts at fault stand alone (nemo.py); OpenAI's
/v1/completions one prompt per request, its samples as `n`, all through the replica's bounded pool
(openai.py). Both derive a seeded request's seed as infra/prompting/samples.py says.

Results an earlier try of the shard already has (`PromptBatch.done`, from its spill:
infra/storage/spill.py) are not asked again, and each request's results are reported once all are
in (`OnRequest`), which is what a spill keeps. A seeded request not asked again leaves every other
request as it was: its seed and make-up do not depend on which others are sent.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Union

from infra.engines.completion import Completion
from infra import errors
from infra.errors import RequestRejected
from infra.prompting.prompt_format import RAW, PromptFormat
from infra.prompting.sampling import MAX_BATCH, SamplingParams


@dataclass(frozen=True)
class GeneratedText:
    prompt: str
    completion: Completion
    generated_tokens: int
    tokens_unit: str = "tokens"  # NeMo >= 2.1's /v1/completions counts whitespace-split "words"
    server_tokens: int | None = None  # what the server generated, where the row was cut to the cap


Result = Union[GeneratedText, RequestRejected]
OnResult = Callable[[Result], None]  # told of each result as it comes in (the run's circuit breaker)
# Told of each request's results, by position (prompt i, sample s -> i * samples + s), once all are in.
OnRequest = Callable[[list[tuple[int, Result]]], None]


@dataclass(frozen=True)
class PromptBatch:
    """Prompts to generate from, and how."""

    prompts: Sequence[str]  # as the records hold them: `prompt_format` wraps each as it is sent
    sampling: SamplingParams
    prompt_format: PromptFormat = RAW
    samples: int = 1  # results per prompt: the recipe's samples_per_prompt
    shard: int = 0  # a seeded request's seed derives from (seed, shard, …) (infra.prompting.samples)
    batch_size: int = MAX_BATCH  # NeMo: prompts per request
    length_window: int = 1  # NeMo: batches' worth of prompts sorted by length together (1: as given)
    lines: Sequence[int] | None = None  # the prompts' input lines, which name them in the log (None: the judge's)
    done: Mapping[int, Result] | None = None  # results in hand already, by position: not asked again
    output_schema: dict | None = None  # the reply's JSON Schema: sent where the engine constrains decoding (openai.py)


def where(line: int | None) -> str:
    """A prompt as the log names it."""
    return "(judge)" if line is None else f"at input line {line}"


_GENERATED_FIELDS = tuple(f.name for f in fields(GeneratedText))
_COMPLETION_FIELDS = tuple(f.name for f in fields(Completion))


def result_to_json(result: Result) -> dict:
    """A result as a spill keeps it: every field, so that `result_from_json` gives it back equal."""
    if isinstance(result, GeneratedText):
        # Field by field, as asdict gives them (every field is a scalar but the completion): asdict's
        # deep copy cost ~13 µs a row, a third of the flow's own work per request on a fast engine.
        return {f: getattr(result, f) for f in _GENERATED_FIELDS} | {
            "completion": {f: getattr(result.completion, f) for f in _COMPLETION_FIELDS}}
    body = result.body
    try:
        json.dumps(body)
    except (TypeError, ValueError):
        body = str(body)  # what the reject and the breaker read of it anyway
    return {"rejected": type(result).__name__, "message": str(result), "status": result.status, "body": body}


def result_from_json(data: dict) -> Result:
    if "rejected" in data:
        kind = getattr(errors, data["rejected"], None)
        kind = kind if isinstance(kind, type) and issubclass(kind, RequestRejected) else RequestRejected
        return kind(data["message"], status=data["status"], body=data["body"])
    return GeneratedText(**{**data, "completion": Completion(**data["completion"])})
