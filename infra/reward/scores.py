"""A reward stage's settings, a reply read as named attributes and a weighted scalar, and the
`keep_if` thresholds as filters (infra/recipes/filters.py's shape: None keeps, a Verdict drops).

Nemotron-4-340B-Reward returns 9 values per conversation; HelpSteer2's five attributes are at
indices 4-8 (helpfulness, correctness, coherence, complexity, verbosity), "typically between 0 and 4"
(https://huggingface.co/nvidia/Nemotron-4-340B-Reward). The model card's scalar weights over the 9
are [0, 0, 0, 0, 0.3, 0.74, 0.46, 0.47, -0.33]: `MODEL_CARD_WEIGHTS` below, by attribute. The reply
is read here, after it was checkpointed, so a new attribute map, weights or threshold needs no server.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator, model_validator

from infra.recipes.filters import Filter, Verdict

HELPSTEER2 = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
MODEL_CARD_WEIGHTS = {"helpfulness": 0.3, "correctness": 0.74, "coherence": 0.46, "complexity": 0.47, "verbosity": -0.33}
NAME = r"^[a-z][a-z0-9_]{0,39}$"
UNSENT = ("reward_overlong", "reward_no_conversation")  # infra/reward/conversation.py


class Bounds(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min: StrictFloat | StrictInt | None = Field(None, description="keep when the value is at least this")
    max: StrictFloat | StrictInt | None = Field(None, description="keep when the value is at most this")


class RewardParams(BaseModel):
    """A reward stage's `reward:` group (docs/pipelines.md, "Reward stage")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system_prompt: str = Field("", max_length=20_000, description="the conversation's system turn, unless the row's "
                               "messages carry one (pin it: scores depend on it)")
    messages_field: str = Field("messages", min_length=1, description="the row's field holding a list of "
                                "{role, content} turns; without it, prompt_field and completion_field are one exchange")
    prompt_field: str = Field("prompt", min_length=1, description="the user turn when the row has no messages")
    completion_field: str = Field("completion", min_length=1, description="the assistant turn scored")
    context_length: StrictInt = Field(4096, ge=16, le=1_048_576, description="the reward model's context in tokens; "
                                      "a longer conversation is dropped as reward_overlong, never sent")
    attributes: list[str] = Field(list(HELPSTEER2), min_length=1, max_length=64,
                                  description="the names of the values the model returns, from from_index on")
    from_index: StrictInt = Field(4, ge=0, le=1024, description="where the named values start in the model's reply "
                                  "(4 for Nemotron-4-340B-Reward's 9 values)")
    weights: dict[str, StrictFloat | StrictInt] | None = Field(
        None, description="a weighted scalar over the attributes, written as `reward`; the model card's: helpfulness "
                          "0.3, correctness 0.74, coherence 0.46, complexity 0.47, verbosity -0.33")
    keep_if: dict[str, StrictFloat | StrictInt | Bounds] = Field(
        default_factory=dict, description="per attribute (or `reward`, the scalar): a number keeps rows at or above it, "
                                          "{min, max} bounds it; a row failing one is filtered with the value measured")
    batch_size: StrictInt = Field(16, ge=1, le=1024, description="conversations per request to the reward server")

    @field_validator("attributes")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not re.match(NAME, name) or name == "reward":
                raise ValueError(f"attribute {name!r}: use lower-case letters, digits and _ (and not `reward`, the scalar)")
        if len(set(v)) != len(v):
            raise ValueError("attributes: a name is given twice")
        return v

    @model_validator(mode="after")
    def _known(self) -> "RewardParams":
        known = set(self.attributes)
        if self.weights is not None and (unknown := sorted(set(self.weights) - known)):
            raise ValueError(f"weights: {', '.join(unknown)} is not one of attributes ({', '.join(self.attributes)})")
        scalar = {"reward"} if self.weights is not None else set()
        if unknown := sorted(set(self.keep_if) - known - scalar):
            extra = "" if self.weights is not None else " (`reward`, the scalar, needs weights)"
            raise ValueError(f"keep_if: {', '.join(unknown)} is not one of attributes ({', '.join(self.attributes)}){extra}")
        return self


def read_scores(reply: dict, params: RewardParams) -> dict[str, float] | str:
    """The reply's attributes by name (and `reward`, the weighted scalar, when weights are set), or
    why they cannot be read."""
    if "attributes" in reply:
        got = reply["attributes"] or {}
        if missing := [a for a in params.attributes if not isinstance(got.get(a), (int, float))]:
            return f"the reply has no {', '.join(missing)}: {sorted(got)}"
        scores = {a: float(got[a]) for a in params.attributes}
    else:
        values = reply.get("rewards") or []
        n = len(params.attributes)
        if len(values) >= params.from_index + n:
            scores = dict(zip(params.attributes, values[params.from_index:params.from_index + n]))
        elif len(values) == n:  # a model returning exactly the named values
            scores = dict(zip(params.attributes, values))
        else:
            return f"{len(values)} values, but {n} attributes are read from index {params.from_index}"
    if params.weights is not None:
        scores["reward"] = round(sum(w * scores[a] for a, w in params.weights.items()), 6)
    return scores


def reward_filter(params: RewardParams) -> Filter:
    """Reads the row's checkpointed reply (`row["reward"]`, set by the stage from its reply file),
    replaces it with the scores, and drops on a failed or unread reply or a threshold."""
    bounds = {k: (v if isinstance(v, Bounds) else Bounds(min=v)) for k, v in params.keep_if.items()}

    def check(row: dict) -> Verdict | None:
        reply = row.get("reward") or {}
        if "error" in reply:  # never sent (overlong, no conversation: its reason), or the server refused it
            if reply["error"] in UNSENT:
                return Verdict(reply["error"], reply.get("value"), reply.get("limit"))
            return Verdict("reward_failed", str(reply["error"])[:200])
        scores = read_scores(reply, params)
        if isinstance(scores, str):
            return Verdict("reward_unreadable", scores[:200])
        row["reward"] = scores
        for name, b in bounds.items():
            if b.min is not None and scores[name] < b.min:
                return Verdict(f"reward_min_{name}", scores[name], b.min)
            if b.max is not None and scores[name] > b.max:
                return Verdict(f"reward_max_{name}", scores[name], b.max)
        return None

    return check
