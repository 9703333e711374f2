"""NeMo 24.05's generation semantics, which every local model follows (text_generation_utils /
text_generation_strategy), because the orchestrator is written against those:

- The batch is padded to its longest prompt and steps until every row is done or
  `longest prompt + tokens_to_generate` is reached. A row's budget is therefore
  `longest - own_length + tokens_to_generate`: `tokens_to_generate` is not a per-row cap
  (the client makes it one: NemoClient._capped in infra/engines/nemo.py).
- A row is done when it emits EOS, when it emits an end string that is a single special
  token, or when the detokenized row (prompt included) ends with one of the other end strings.
  The end string stays in the text; rows that finish early are filled with EOS up to the
  batch's final length (`token_ids` shows the fill, `sentences` drop it, like SentencePiece).
- `repetition_penalty` only acts with `compute_logprob` (NeMo fills the penalty's history
  inside that branch only); `min_tokens_to_generate` only masks EOS; `random_seed` reseeds.

The models that answer `/generate` (the `Engine` protocol): `transformers_model.TransformersEngine`,
a real small model, and `simulated_model.SimulatedEngine`, a timed simulation.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

EOS_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class GenerateParams:
    """One request's sampling parameters, with NeMo 24.05's server-side defaults."""

    tokens_to_generate: int = 64
    temperature: float = 1.0
    add_BOS: bool = False
    top_k: float = 0
    top_p: float = 0.9
    greedy: bool = False
    repetition_penalty: float = 1.2
    min_tokens_to_generate: int = 0
    end_strings: tuple[str, ...] = (EOS_TOKEN,)
    compute_logprob: bool = False
    all_probs: bool = False
    random_seed: int | None = None


@dataclass
class Generation:
    """What an engine produced for one batch, before it is shaped into NeMo's reply."""

    rows: list[list[int]]  # prompt + generation + EOS fill; every row has the same length
    prompt_lengths: list[int]
    generated_lengths: list[int]  # tokens each row produced, its end token included, fill excluded
    logprob: list[list[float]] | None = None  # positions 1..L, prompt included (NeMo's layout)
    full_logprob: list[list[list[float]]] | None = None


class Engine(Protocol):
    name: str
    eos_id: int
    bos_id: int

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids` with special tokens dropped (what SentencePiece's decode_ids does)."""
        ...

    def token_text(self, token_id: int) -> str:
        """One token's text for the reply's `tokens` field; special tokens by name."""
        ...

    def is_special(self, token_id: int) -> bool: ...

    def generate(self, prompts: list[str], params: GenerateParams) -> Generation: ...


class StopRule:
    """NeMo's end_of_generation_condition for one request's end strings."""

    def __init__(self, engine: Engine, end_strings: Sequence[str]):
        self.stop_ids = {engine.eos_id}
        self.texts: list[str] = []
        for end in end_strings:
            ids = engine.tokenize(end)
            if len(ids) == 1 and engine.is_special(ids[0]):
                self.stop_ids.add(ids[0])
            else:
                # An empty end string matches every text, as in NeMo: the row stops at once.
                self.texts.append(end)
        self.longest_text = max((len(t) for t in self.texts), default=0)

    def is_end(self, last_id: int, text: Callable[[], str]) -> bool:
        """`text` is called only when a text end string must be checked (decoding is slow)."""
        if last_id in self.stop_ids:
            return True
        if not self.texts:
            return False
        decoded = text()
        return any(decoded.endswith(end) for end in self.texts)


def build_reply(engine: Engine, gen: Generation, params: GenerateParams) -> dict:
    """Shape a Generation like NeMo's `generate()` output (text_generation_utils)."""
    # A batch holds few distinct ids (the prompts' vocabulary plus what was generated): ask the engine
    # for each one's text once, then map every row through dicts, so the per-token work stays in C.
    texts = {t: engine.token_text(t) for t in set().union(*gen.rows)}
    widths = {t: 0 if engine.is_special(t) else len(text) for t, text in texts.items()}
    reply = {
        "sentences": [engine.detokenize(row) for row in gen.rows],
        "tokens": [list(map(texts.__getitem__, row)) for row in gen.rows],
        "token_ids": gen.rows,
        "offsets": [_offsets(row, widths) for row in gen.rows],
        "logprob": gen.logprob if params.compute_logprob else None,
    }
    if params.all_probs:
        reply["full_logprob"] = gen.full_logprob
    return reply


def _offsets(row: list[int], widths: dict[int, int]) -> list[int]:
    # NeMo's loop: start offsets of each token; special tokens take no room in the text.
    return list(itertools.accumulate(map(widths.__getitem__, row[:-1]), initial=0))


def row_budgets(prompt_lengths: list[int], tokens_to_generate: int) -> list[int]:
    """How many tokens each row may produce: NeMo steps to longest prompt + tokens_to_generate."""
    longest = max(prompt_lengths)  # an empty batch raises here, as NeMo's pad_batch does
    return [longest + tokens_to_generate - n for n in prompt_lengths]


def pad_rows(rows: list[list[int]], eos_id: int) -> list[list[int]]:
    width = max(len(r) for r in rows)
    return [r + [eos_id] * (width - len(r)) for r in rows]


def prompt_ids(engine: Engine, prompt: str, add_bos: bool) -> list[int]:
    if not isinstance(prompt, str):
        # NeMo's tokenizer raises on a non-string too (and the real server then hangs).
        raise TypeError(f"sentences must hold strings, got {type(prompt).__name__}")
    ids = engine.tokenize(prompt)
    return [engine.bos_id, *ids] if add_bos else ids
