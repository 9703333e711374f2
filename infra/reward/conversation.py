"""The conversation a reward model scores, built from a row, in the model's own format, and checked
against its context before it is sent.

A row gives its turns as a `messages` list (role `system`, `user` or `assistant`, and `content`), or
as `prompt` and `completion`: one user turn and the assistant's reply. The text is NeMo-Aligner's
SteerLM format (examples/nlp/data/steerlm/common.py), which Nemotron-4-340B-Reward was trained on:

    <extra_id_0>System\\n{system}\\n<extra_id_1>User\\n{user}\\n<extra_id_1>Assistant\\n{reply}\\n<extra_id_2>

The model scores the last assistant turn. The system text is the stage's `system_prompt` unless the
messages carry one; pin it: hosted and self-hosted scores differ with it (NeMo-Aligner #217).
The text is counted with the run's token counter (the generator's tokenizer: Nemotron-4's reward model
shares it); one token is kept free for the BOS or EOS a server may add (NeMo-Aligner #231), so a row
over `context_length - 1` tokens is never sent: its reason is `reward_overlong`.
"""

from __future__ import annotations

from dataclasses import dataclass

from infra.prompting.tokens import TokenCounter

ROLES = ("system", "user", "assistant")
SPECIAL = ("<extra_id_0>", "<extra_id_1>", "<extra_id_2>")
BOS_EOS_RESERVE = 1


@dataclass(frozen=True)
class Conversation:
    text: str  # in the reward model's format
    messages: list[dict]  # the same turns as role/content, for endpoints that format them themselves
    tokens: int


@dataclass(frozen=True)
class Unscorable:
    """A row that is not sent: the reason (`reward_overlong`, `reward_no_conversation`), what was measured and the limit."""

    reason: str
    value: object = None
    limit: object = None

    def as_dict(self) -> dict:
        return {"error": self.reason, "value": self.value, "limit": self.limit}


def turns_of(row: dict, messages_field: str, prompt_field: str, completion_field: str) -> list[dict] | str:
    """The row's turns as role/content dicts, or why there are none."""
    messages = row.get(messages_field)
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            return f"{messages_field} is not a non-empty list of messages"
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return f"{messages_field}[{i}] is not {{role: system|user|assistant, content: text}}"
            out.append({"role": m["role"], "content": m["content"]})
    else:
        prompt, completion = row.get(prompt_field), row.get(completion_field)
        if not isinstance(prompt, str) or not isinstance(completion, str):
            return f"the row has neither {messages_field} nor text {prompt_field} and {completion_field}"
        out = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if out[-1]["role"] != "assistant":
        return "the last turn is not the assistant's: there is no reply to score"
    return out


def format_conversation(turns: list[dict], system_prompt: str) -> str:
    """The turns in the SteerLM format, ending in `<extra_id_2>` (where the scores are read)."""
    system = next((t["content"] for t in turns if t["role"] == "system"), system_prompt)
    body = "".join(f"<extra_id_1>{'User' if t['role'] == 'user' else 'Assistant'}\n{t['content']}\n"
                   for t in turns if t["role"] != "system")
    return f"<extra_id_0>System\n{system}\n{body}<extra_id_2>"


def build(row: dict, *, system_prompt: str, counter: TokenCounter, context_length: int, messages_field: str = "messages",
          prompt_field: str = "prompt", completion_field: str = "completion") -> Conversation | Unscorable:
    turns = turns_of(row, messages_field, prompt_field, completion_field)
    if isinstance(turns, str):
        return Unscorable("reward_no_conversation", turns)
    text = format_conversation(turns, system_prompt)
    limit = context_length - BOS_EOS_RESERVE
    # Counted whole, not count_within's proven bound: the row records `tokens` as what the reward model
    # read (one conversation of at most a few thousand tokens per row: small beside the scoring itself).
    tokens = counter.count(text)
    if tokens > limit:
        return Unscorable("reward_overlong", tokens, limit)
    return Conversation(text, [t for t in turns if t["role"] != "system"], tokens)
