"""The pairs stage's optional check on the generator: the order-swap trick of the Nemotron-4 340B
report. Each pair is put to the model twice as an A/B judging prompt, once with the chosen response
as A and once with it as B; the pair is kept only when both answers pick the chosen one. A model with
a position bias (always A) disagrees with itself on the swapped order and its pair is dropped.

Pure: the check's parameters, the two prompts of a pair, the choice read from a reply, the verdict.
infra/pipeline/pairs_stage.py asks the server and checkpoints the answers.

Reasons a checked pair is dropped (counted per pair, in the stage's `filtered`):
`pair_order_disagrees` (the two orders pick different responses: position bias),
`pair_check_prefers_rejected` (both orders pick the rejected response: the score and the model differ),
`pair_check_unparsed` (a reply with no choice in it), `pair_check_error` (a prompt that cannot be
rendered, is longer than the context, or that the server refused).
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from infra.errors import ConfigError
from infra.recipes.patterns import UserPattern, compile_pattern
from infra.recipes.templates import RenderError, is_template_uri, load_template, render

# Written for any instruction model; a user's template gets the same variables. The reply's first
# standalone A or B is the choice (choice_pattern).
DEFAULT_TEMPLATE = """\
Here is a question and two responses to it.

Question: {{ prompt }}

Response A: {{ response_a }}

Response B: {{ response_b }}

Which response is better, A or B? Answer with the letter only.
Answer:"""
DEFAULT_CHOICE = r"\b([AB])\b"
REASONS = ("pair_order_disagrees", "pair_check_prefers_rejected", "pair_check_unparsed", "pair_check_error")


class PairCheck(BaseModel):
    """A pairs stage's `check:` group (docs/pipelines.md, "Pairs stage"): asked of the pipeline's
    generation server, or of a server given by `url`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    template: str = Field(DEFAULT_TEMPLATE, min_length=1, description="the A/B judging prompt (sandboxed Jinja2) over "
                          "`prompt`, `response_a`, `response_b`; inline text or a .j2/.jinja/.txt path")
    choice_pattern: str = Field(DEFAULT_CHOICE, min_length=1, description="regex whose first group (else the whole "
                                "match) in the reply is the choice, A or B; no match: pair_check_unparsed")
    tokens_to_generate: StrictInt = Field(4, ge=1, le=256, description="tokens the model may answer with")
    end_strings: list[str] = Field(default_factory=lambda: ["\n"], description="the reply stops at the first of these")
    prompt_format: str | None = Field(None, pattern=r"^(raw|nemotron-instruct|chat)$",
                                      description="raw, nemotron-instruct or chat; default: the stage's, else the profile's")
    seed: StrictInt = Field(0, ge=0, lt=2**24, description="the requests' random_seed (decoding is greedy)")
    url: str | None = Field(None, pattern=r"^https?://[^\s]+$", description="a generation server already running, "
                            "used as is (nothing started or stopped); default: the pipeline's server, started for the check")

    @model_validator(mode="after")
    def _pattern(self) -> "PairCheck":
        compile_pattern(self.choice_pattern, "pairs.check.choice_pattern")
        return self

    def locations(self) -> dict[str, str]:
        return {"pairs.check.template": self.template.strip()} if is_template_uri(self.template) else {}

    def pattern(self) -> UserPattern:
        return compile_pattern(self.choice_pattern, "pairs.check.choice_pattern",
                               "then rerun under the same run_id: the answers are kept")


def check_contexts(prompt: str | None, chosen: str | None, rejected: str | None) -> tuple[dict, dict]:
    """The template's variables for the pair's two orders: chosen as A, then chosen as B."""
    base = {"prompt": prompt or "", "chosen": chosen or "", "rejected": rejected or ""}
    return ({**base, "response_a": chosen or "", "response_b": rejected or ""},
            {**base, "response_a": rejected or "", "response_b": chosen or ""})


def answer_key(text: str, sampling: dict, server: str) -> str:
    """What an answer is the answer to: the prompt exactly as sent, how it was decoded, and by which
    server; a checkpointed answer is reused only for the same key."""
    return hashlib.sha256(json.dumps([text, sampling, server], sort_keys=True).encode()).hexdigest()


def read_choice(reply: str | None, pattern: UserPattern) -> str | None:
    """"A" or "B" from the reply (the pattern's first group, else its match), or None."""
    m = pattern.search(reply or "")
    if m is None:
        return None
    got = (m.group(1) if m.re.groups and m.group(1) is not None else m.group(0)).strip().upper()
    return got if got in ("A", "B") else None


def verdict(first: dict, swapped: dict, pattern: UserPattern) -> str | None:
    """None when both orders pick the chosen response (A first, then B); else the reason it is dropped.
    Each answer is {"reply": text} or {"error": why}."""
    if "error" in first or "error" in swapped:
        return "pair_check_error"
    a, b = read_choice(first.get("reply"), pattern), read_choice(swapped.get("reply"), pattern)
    if a is None or b is None:
        return "pair_check_unparsed"
    if (a, b) == ("A", "B"):
        return None
    return "pair_check_prefers_rejected" if (a, b) == ("B", "A") else "pair_order_disagrees"


def check_template(check: PairCheck, rows: list[dict], settings, parent: str) -> None:
    """`nemotron-sdg check --pipeline`: the template read, and rendered for a pair of the parent's first
    rows in both orders, before anything is allocated; ConfigError naming what failed."""
    compiled = load_template(check.template, settings, "pairs.check.template").compiled()
    if not rows:
        return
    a, b = rows[0], rows[min(1, len(rows) - 1)]
    for ctx in check_contexts(a.get("prompt"), a.get("completion"), b.get("completion")):
        try:
            render(compiled, {**ctx, "row": a})
        except RenderError as exc:
            raise ConfigError(f"pairs.check.template cannot render a pair of stage {parent!r}'s rows: {exc}; it is given "
                              "prompt, response_a, response_b, chosen, rejected and row (the chosen row)") from None
