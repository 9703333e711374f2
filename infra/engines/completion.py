"""Turn NeMo's echoed reply (prompt + generation, end string left in) into a completion.

`reply[len(prompt):]` is right only when the prompt round-trips through the tokenizer, so:
exact prefix first; otherwise find where the prompt's tail meets the reply (NeMo-Skills' fix)
and flag the record; then trim at the first end string.

Replies are paired with prompts by position, so `pairing_error` checks that each reply echoes
its own prompt: a reply that echoes nothing, or echoes another prompt of the batch better (a
proxy that reorders or duplicates sentences), fails the batch instead of publishing another
prompt's completion.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

PROBE_CHARS = 20
# How far the echoed prompt may end from len(prompt) for the tail probe to count: a few
# normalised characters (NBSP -> space, NFC/NFD) move it, a repeat in the generation is further.
TAIL_SLACK = PROBE_CHARS
# The share of the prompt a heuristic echo must keep (from both ends) to be the prompt's own.
MIN_ECHO_SHARE = 0.5


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_match: str  # "exact" | "heuristic" | "none"
    finish_reason: str  # "end_string" | "length"
    generated_from: int  # character offset in the reply where the generation starts


def generation_start(prompt: str, reply: str) -> tuple[int, str]:
    """Where the generation begins in `reply`, and how that was found."""
    if reply.startswith(prompt):
        return len(prompt), "exact"
    # The reply lost the head of the prompt (a dropped leading space, a special token):
    # it starts somewhere inside the prompt (NeMo-Skills' fix, commit 289efe99).
    head = reply[:PROBE_CHARS]
    b = prompt.find(head) if head else -1
    if b > 0 and reply.startswith(prompt[b:]):
        return len(prompt) - b, "heuristic"
    # Otherwise the prompt changed inside (normalisation): find where its tail meets the reply.
    # Only where the echo can end (within TAIL_SLACK of len(prompt)), and the first occurrence
    # there: a base model repeating the prompt's last line early in its generation puts a later
    # copy of the tail in that window, and taking it would cut the head off the completion.
    probe = prompt[-PROBE_CHARS:]
    if probe:
        lo = max(0, len(prompt) - len(probe) - TAIL_SLACK)
        at = reply.find(probe, lo, len(prompt) + TAIL_SLACK)
        if at != -1:
            return at + len(probe), "heuristic"
    return 0, "none"


def echo_share(prompt: str, reply: str, start: int) -> float:
    """How much of `prompt` the echo `reply[:start]` keeps, counted from both ends: 1.0 for an
    exact echo, less when characters inside were changed, near 0 for another text."""
    echo = reply[:start]
    head = len(os.path.commonprefix([prompt, echo]))
    tail = len(os.path.commonprefix([prompt[head:][::-1], echo[head:][::-1]]))
    return (head + tail) / max(len(prompt), 1)


def pairing_error(prompts: Sequence[str], replies: Sequence[str], completions: Sequence[Completion]) -> str | None:
    """None when every reply echoes its own prompt, else why not (for the first that does not).

    An exact echo is its own. A heuristic one must keep MIN_ECHO_SHARE of its prompt and no other
    prompt of the batch may be echoed better (exactly, or keeping a larger share)."""
    for i, (prompt, reply, c) in enumerate(zip(prompts, replies, completions)):
        if c.prompt_match == "exact":
            continue
        if c.prompt_match == "none":
            return f"reply {i} does not echo its prompt (prompt ends {prompt[-40:]!r}, reply starts {reply[:40]!r})"
        own = echo_share(prompt, reply, c.generated_from)
        if own < MIN_ECHO_SHARE:
            return f"reply {i} echoes only {own:.0%} of its prompt (reply starts {reply[:40]!r})"
        others = [(j, other) for j, other in enumerate(prompts) if other != prompt]
        if (j := next((j for j, other in others if reply.startswith(other)), None)) is not None:
            return f"reply {i} echoes prompt {j} of the batch exactly, not its own: the server reordered or duplicated replies"
        for j, other in others:
            start, how = generation_start(other, reply)
            if how == "heuristic" and echo_share(other, reply, start) > own:
                return f"reply {i} echoes prompt {j} of the batch better than its own: the server reordered or duplicated replies"
    return None


def trim_at_end_strings(text: str, end_strings: list[str]) -> tuple[str, bool]:
    cut = min((i for s in end_strings if s and (i := text.find(s)) != -1), default=-1)
    if cut == -1:
        return text, False
    return text[:cut], True


def extract_completion(prompt: str, reply: str, end_strings: list[str]) -> Completion:
    start, how = generation_start(prompt, reply)
    text, ended = trim_at_end_strings(reply[start:], end_strings)
    return Completion(text=text, prompt_match=how, finish_reason="end_string" if ended else "length", generated_from=start)
