"""Turn NeMo's echoed reply (prompt + generation, end string left in) into a completion.

`reply[len(prompt):]` is right only when the prompt round-trips through the tokenizer, so:
exact prefix first; otherwise find where the prompt's tail meets the reply (NeMo-Skills' fix)
and flag the record; then trim at the first end string.
"""

from __future__ import annotations

from dataclasses import dataclass

PROBE_CHARS = 20


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
    # Otherwise the prompt changed inside (normalisation): find where its tail meets the reply,
    # looking only where the echoed prompt can end so a repeat in the generation is not taken.
    probe = prompt[-PROBE_CHARS:]
    window = reply[: len(prompt) + 2 * PROBE_CHARS]
    at = window.rfind(probe) if probe else -1
    if at != -1:
        return at + len(probe), "heuristic"
    return 0, "none"


def trim_at_end_strings(text: str, end_strings: list[str]) -> tuple[str, bool]:
    cut = min((i for s in end_strings if s and (i := text.find(s)) != -1), default=-1)
    if cut == -1:
        return text, False
    return text[:cut], True


def extract_completion(prompt: str, reply: str, end_strings: list[str]) -> Completion:
    start, how = generation_start(prompt, reply)
    text, ended = trim_at_end_strings(reply[start:], end_strings)
    return Completion(text=text, prompt_match=how, finish_reason="end_string" if ended else "length", generated_from=start)
