"""TGS `put()`'s request validation for the local `/generate` server (service.py): its checks, in its
order, with its exact messages (checked against NeMo's own code: tests/nemo_reference.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from infra.local_server.nemo_generation import GenerateParams

log = logging.getLogger(__name__)

MAX_SENTENCES = 128
TASK_IDS_MESSAGE = (
    "Input at 'sentences' must by a tuple of two tensors like:"
    "                    (context_tokens_tensor, context_length_tensor) if task ids are given"
)
ALLOWED_KEYS = frozenset({
    "all_probs", "sentences", "task_ids", "tokens_to_generate", "temperature", "add_BOS", "greedy",
    "top_k", "top_p", "neighbors", "repetition_penalty", "min_tokens_to_generate", "end_strings",
    "compute_logprob", "random_seed",
})

# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class Rejection:
    """A validation failure, answered the way TGS answers it (default: 200 + JSON string)."""

    message: str
    status: int = 200


def _is_number(value: object) -> bool:
    # TGS uses `type(x) == int or type(x) == float`, so booleans are not numbers here.
    return type(value) in (int, float)


def validate_request(body: dict) -> tuple[list, GenerateParams] | Rejection:
    """TGS `put()`'s checks, in its order, with its messages. Raises where TGS raises (-> 500)."""
    for key in body.keys():
        if key not in ALLOWED_KEYS:
            log.error("The request key %s is not allowed", key)  # TGS logs it at ERROR, then goes on
    sentences = body["sentences"]  # KeyError -> 500, as in TGS
    if len(sentences) > MAX_SENTENCES:  # TypeError for a non-sized value -> 500
        return Rejection(f"Maximum number of sentences is {MAX_SENTENCES}", 400)
    if "task_ids" in body:
        return Rejection(TASK_IDS_MESSAGE)  # JSON cannot carry the tuple TGS wants
    fields = {}
    for check in _CHECKS:
        outcome = check(body)
        if isinstance(outcome, Rejection):
            return outcome
        fields.update(outcome)
    # NeMo's tokenize_batch iterates whatever passed len(): a string gives one prompt per
    # character, an object its keys. Non-string items raise in the engine (-> 500).
    return list(sentences), GenerateParams(**fields)


def _int_at_least(key: str, minimum: int, message: str):
    def check(body: dict) -> dict | Rejection:
        if key not in body:
            return {}
        value = body[key]
        if not isinstance(value, int) or value < minimum:  # isinstance: True passes, as in TGS
            return Rejection(message)
        return {key: value}
    return check


def _boolean(key: str):
    def check(body: dict) -> dict | Rejection:
        if key not in body:
            return {}
        if not isinstance(body[key], bool):
            return Rejection(f"{key} must be a boolean value")
        return {key: body[key]}
    return check


def _number(key: str, accept: Callable[[float], bool], message: str):
    def check(body: dict) -> dict | Rejection:
        if key not in body:
            return {}
        value = body[key]
        if not _is_number(value) or not accept(value):
            return Rejection(message)
        return {key: value}
    return check


def _end_strings(body: dict) -> dict | Rejection:
    if "end_strings" not in body:
        return {}
    value = body["end_strings"]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        return Rejection("expect end_strings to be a list of strings")
    return {"end_strings": tuple(value)}


def _neighbors(body: dict) -> dict | Rejection:
    # RETRO only: validated, then ignored for GPT.
    outcome = _int_at_least("neighbors", 0, "num of neighbors must be an integer no less than 0")(body)
    return outcome if isinstance(outcome, Rejection) else {}


def _random_seed(body: dict) -> dict | Rejection:
    if "random_seed" not in body:
        return {}
    value = body["random_seed"]
    if value is not None and (not isinstance(value, int) or value < 0):
        return Rejection("random_seed must be a positive integer number or None")
    return {"random_seed": value}


_CHECKS = (
    _int_at_least("tokens_to_generate", 1, "tokens_to_generate must be an integer greater than 0"),
    _boolean("all_probs"),
    _number("temperature", lambda t: 0.0 < t <= 100.0, "temperature must be a positive number less than or equal to 100.0"),
    _boolean("add_BOS"),
    _boolean("greedy"),
    _number("top_k", lambda k: 0 <= k, "top_k must be a positive integer number"),
    _number("top_p", lambda p: 0.0 <= p <= 1.0, "top_p must be a positive number less than or equal to 1.0"),
    _number("repetition_penalty", lambda r: 1.0 <= r, "repetition_penalty must be a positive number no less than 1.0"),
    _end_strings,
    _int_at_least("min_tokens_to_generate", 0, "min_tokens_to_generate must be an integer no less than 0"),
    _neighbors,
    _boolean("compute_logprob"),
    _random_seed,
)
