"""A timed simulation behind `/generate`, under NeMo's generation semantics (nemo_generation.py).

`SimulatedEngine` has no model. Its text is a word sequence seeded by a hash of the prompt
(and `random_seed`), so the same request always gets the same answer; its tokens are
regex pieces (`\\s+`, `\\w+`, or one other character) that concatenate back to the input.
It sleeps for a modelled compute time so a benchmark sees a server that is busy for a
realistic share of the wall clock:

    steps = final batch length - shortest prompt     (NeMo starts at the shortest prompt;
                                                      final length <= longest + tokens_to_generate)
    sleep = prefill_s_per_token * longest_prompt_tokens * batch
          + steps * decode_step_s * (1 + decode_batch_slope * batch)

`finish_fraction` is the share of rows (chosen by the prompt's hash) that emit their first
end string early; the others run to their budget.

The defaults are zero (no sleep) so tests are fast. `PLANNING_340B_TP8_PP2` holds figures
resembling Nemotron-4-340B on 16 H100 (TP8, PP2) for capacity planning. They are ESTIMATES,
not measurements: the research notes (reference/nemo-generate-server.md §5) found no
published load-time or tokens/s figure for NeMo's server and estimate "tens of ms" per
decode step. How the numbers below were derived:

- decode_step_s = 0.05 (range 40–60 ms): 42.5 GB of bf16 weights per GPU read once per step
  at ~2–3 TB/s is ~15–20 ms per pipeline stage; with PP=2 and no micro-batch pipelining the
  two stages run one after the other, plus TP all-reduces and Python per-step overhead
  (per-row end-string detokenizing, top-k/top-p loops).
- decode_batch_slope = 0.004: decode is memory-bound, so the step time grows slowly with the
  batch (batch 128 -> x1.5) as KV-cache reads and the per-row Python loops add up.
- prefill_s_per_token = 2e-4: ~2 x 340e9 = 680 GFLOP per token; only one stage (8 GPUs) is
  busy at a time, ~40% of ~1 PFLOP/s bf16 each -> ~3.2 PFLOP/s -> ~0.2 ms per token.

So a batch of 128 prompts of 500 tokens with 256 new tokens would take about
12.8 s (prefill) + 256 x 0.05 x 1.51 = 19.4 s (decode) = 32 s, about 1,000 generated tok/s.
"""

from __future__ import annotations

import collections
import hashlib
import math
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from infra.errors import ConfigError
from infra.local_server.nemo_generation import (
    EOS_TOKEN,
    GenerateParams,
    Generation,
    StopRule,
    pad_rows,
    prompt_ids,
    row_budgets,
)


@dataclass(frozen=True)
class SimCost:
    """The simulated engine's compute-time model (see the module docstring)."""

    prefill_s_per_token: float = 0.0
    decode_step_s: float = 0.0
    decode_batch_slope: float = 0.0

    def seconds(self, *, batch: int, longest_prompt: int, steps: int) -> float:
        prefill = self.prefill_s_per_token * longest_prompt * batch
        decode = steps * self.decode_step_s * (1.0 + self.decode_batch_slope * batch)
        return prefill + decode


# Planning estimate for Nemotron-4-340B, 16 x H100, TP8 PP2. Not a measurement (see above).
PLANNING_340B_TP8_PP2 = SimCost(prefill_s_per_token=2e-4, decode_step_s=0.05, decode_batch_slope=0.004)

# Pieces that concatenate back to any text: whitespace runs, word runs, any other character.
_PIECE = re.compile(r"\s+|\w+|[^\w\s]", re.UNICODE)
_WORDS = (
    "the model writes a short answer about data with care and then it checks each step of its own "
    "work so that every line is clear useful correct and safe for people who read it later today "
    "because good examples help training more than many noisy ones in large sets"
).split()
# What the simulated model "says": mostly " word", sometimes "." or "," (6 % and 4 %).
_WORD_PIECES = (".", ",", *(" " + w for w in _WORDS))


def _next_word(rng: random.Random) -> int:
    """Index into _WORD_PIECES."""
    roll = rng.random()
    if roll < 0.06:
        return 0
    if roll < 0.10:
        return 1
    return 2 + int(rng.random() * len(_WORDS))


_RECENT_CHARS = 4_000_000  # of texts whose ids are kept (~24 MB for 14 k few-shot prompts, measured): shards in flight
_FULL_LOGPROB_WIDTH = 16  # the simulation has no real vocabulary; a small flat distribution stands in


class SimulatedEngine:
    """No model: deterministic text, regex pseudo-tokens and a modelled compute time."""

    name = "simulated"
    eos_id = 0
    bos_id = 0

    def __init__(
        self,
        cost: SimCost = SimCost(),
        *,
        finish_fraction: float = 0.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not 0.0 <= finish_fraction <= 1.0:
            raise ConfigError(f"finish_fraction must be between 0 and 1, got {finish_fraction}")
        self.cost = cost
        self.finish_fraction = finish_fraction
        self._sleep = sleep
        # A vocabulary that grows as pieces are seen; id 0 is EOS.
        self._pieces: list[str] = [EOS_TOKEN]
        self._texts: list[str] = [""]  # what each id adds to a detokenized text (special tokens nothing)
        self._ids: dict[str, int] = {EOS_TOKEN: 0}
        self._vocab_lock = threading.Lock()
        self._word_ids = [self._id(piece) for piece in _WORD_PIECES]
        # Ids of recently tokenized texts: each sample index re-sends a shard's prompts (samples.py), and a
        # tokenizer is a pure function, so a prompt is split into pieces once. Bounded (oldest out first).
        # (An OrderedDict: a dict's first entry, after many deletions at its front, is a scan away.)
        self._recent: collections.OrderedDict[str, tuple[int, ...]] = collections.OrderedDict()
        self._recent_chars = 0

    def tokenize(self, text: str) -> list[int]:
        found = self._recent.get(text)
        if found is None:
            found = tuple(self._tokenize(text))
            with self._vocab_lock:
                # Checked before evicting: a text over the whole budget, or one another server thread
                # kept meanwhile, must not empty the memo for nothing.
                if len(text) <= _RECENT_CHARS and text not in self._recent:
                    while self._recent and self._recent_chars + len(text) > _RECENT_CHARS:
                        oldest, _ = self._recent.popitem(last=False)
                        self._recent_chars -= len(oldest)
                    self._recent[text] = found
                    self._recent_chars += len(text)
        return list(found)

    def _tokenize(self, text: str) -> list[int]:
        ids: list[int] = []
        for n, part in enumerate(text.split(EOS_TOKEN)):
            if n:
                ids.append(self.eos_id)  # a literal special token in the text, as real tokenizers do
            pieces = _PIECE.findall(part)
            known = list(map(self._ids.get, pieces))  # most pieces are known: no lock for them
            ids.extend(self._id(p) if i is None else i for p, i in zip(pieces, known))
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return "".join(map(self._texts.__getitem__, ids))

    def token_text(self, token_id: int) -> str:
        return self._pieces[token_id]

    def is_special(self, token_id: int) -> bool:
        return token_id == self.eos_id

    def generate(self, prompts: list[str], params: GenerateParams) -> Generation:
        began = time.monotonic()
        prompts_ids = [prompt_ids(self, p, params.add_BOS) for p in prompts]
        lengths = [len(ids) for ids in prompts_ids]
        budgets = row_budgets(lengths, params.tokens_to_generate)
        rule = StopRule(self, params.end_strings)
        generated = [
            self._continue(prompt, ids, budget, rule, params)
            for prompt, ids, budget in zip(prompts, prompts_ids, budgets)
        ]
        rows = pad_rows([p + g for p, g in zip(prompts_ids, generated)], self.eos_id)
        gen = Generation(rows=rows, prompt_lengths=lengths, generated_lengths=[len(g) for g in generated])
        if params.compute_logprob:
            gen.logprob, gen.full_logprob = self._logprobs(rows, params.all_probs)
        steps = len(rows[0]) - min(lengths)
        modelled = self.cost.seconds(batch=len(prompts), longest_prompt=max(lengths), steps=steps)
        # The Python work above already took some of the modelled time; sleep only the rest,
        # so the busy time a benchmark sees is the model's, not the model's plus ours.
        rest = modelled - (time.monotonic() - began)
        if rest > 0:  # a zero-cost model does not even yield the GIL
            self._sleep(rest)
        return gen

    def _continue(self, prompt: str, ids: list[int], budget: int, rule: StopRule, params: GenerateParams) -> list[int]:
        rng = random.Random(hashlib.sha256(f"{params.random_seed}\x00{prompt}".encode()).digest())
        finish_at = self._early_finish(rng, budget, params.min_tokens_to_generate)
        end_id = self._end_token(params.end_strings)
        # Text end strings need the row's text; keep only as much of its tail as they can match.
        keep = max(rule.longest_text, 1) if rule.texts else 0
        tail = self.detokenize(ids)[-keep:] if keep else ""
        out: list[int] = []
        for step in range(1, budget + 1):
            token = end_id if step == finish_at else self._word_ids[_next_word(rng)]
            out.append(token)
            if keep and token != self.eos_id:
                tail = (tail + self._pieces[token])[-keep:]
            if token in rule.stop_ids or (keep and rule.is_end(token, lambda: tail)):
                break
        return out

    def _early_finish(self, rng: random.Random, budget: int, min_tokens: int) -> int | None:
        # Draw both numbers every time so a row's text does not depend on finish_fraction.
        draw, position = rng.random(), rng.random()
        first = min_tokens + 1  # NeMo masks EOD until min_tokens_to_generate tokens exist
        if draw >= self.finish_fraction or first > budget:
            return None
        return first + int(position * (budget - first + 1))

    def _end_token(self, end_strings: Sequence[str]) -> int:
        for end in end_strings:
            if end and end != EOS_TOKEN:
                return self._id(end)
        return self.eos_id

    def _id(self, piece: str) -> int:
        with self._vocab_lock:
            found = self._ids.get(piece)
            if found is None:
                found = len(self._pieces)
                self._pieces.append(piece)
                self._texts.append(piece)
                self._ids[piece] = found  # last: a lock-free reader never sees an id without its text
            return found

    @staticmethod
    def _logprobs(rows: list[list[int]], all_probs: bool):
        # Stand-in numbers with NeMo's shapes: one value per position 1..L.
        logprob = [[-1.0 - (t % 7) / 4.0 for t in row[1:]] for row in rows]
        full = None
        if all_probs:
            flat = -math.log(_FULL_LOGPROB_WIDTH)
            full = [[[flat] * _FULL_LOGPROB_WIDTH for _ in row[1:]] for row in rows]
        return logprob, full
