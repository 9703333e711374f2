"""What answers `/generate` inside the local server: a real small model, or a timed simulation.

Both engines follow NeMo 24.05's generation semantics (text_generation_utils /
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

Engines:

`TransformersEngine(model_dir)` loads any causal LM that transformers can load from a local
directory (for tests: `tiny_model.make_tiny_model`) and runs it on CPU with torch.

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

import hashlib
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from infra.errors import ConfigError

log = logging.getLogger(__name__)

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
    tokens = [[engine.token_text(t) for t in row] for row in gen.rows]
    reply = {
        "sentences": [engine.detokenize(row) for row in gen.rows],
        "tokens": tokens,
        "token_ids": gen.rows,
        "offsets": [_offsets(engine, row, pieces) for row, pieces in zip(gen.rows, tokens)],
        "logprob": gen.logprob if params.compute_logprob else None,
    }
    if params.all_probs:
        reply["full_logprob"] = gen.full_logprob
    return reply


def _offsets(engine: Engine, row: list[int], pieces: list[str]) -> list[int]:
    # NeMo's loop: start offsets of each token; special tokens take no room in the text.
    offsets = [0]
    for token_id, piece in zip(row[:-1], pieces[:-1]):
        offsets.append(offsets[-1] + (0 if engine.is_special(token_id) else len(piece)))
    return offsets


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


# --------------------------------------------------------------------------- transformers


class TransformersEngine:
    """A local causal LM on CPU. Loads with local files only (no hub access)."""

    name = "transformers"

    def __init__(self, model_dir: str | os.PathLike[str], *, threads: int = 2):
        # No internet here: without this, a missing file becomes a long hub timeout.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"No model in {path} (config.json missing). Build a tiny one with "
                f"`python -m infra.local_server make-tiny-model {path}` or pass another --model-dir."
            )
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(max(1, threads))
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        self.model.eval()
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ConfigError(f"The tokenizer in {path} has no eos token; NeMo's EOD needs one.")
        self.eos_id = int(eos)
        bos = self.tokenizer.bos_token_id
        self.bos_id = int(bos) if bos is not None else self.eos_id
        self._special = set(self.tokenizer.all_special_ids)
        log.info("loaded %s from %s (vocab %d)", type(self.model).__name__, path, len(self.tokenizer))

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def generate(self, prompts: list[str], params: GenerateParams) -> Generation:
        torch = self._torch
        prompts_ids = [prompt_ids(self, p, params.add_BOS) for p in prompts]
        lengths = [len(ids) for ids in prompts_ids]
        budgets = row_budgets(lengths, params.tokens_to_generate)
        input_ids, mask = self._left_pad(prompts_ids)
        stops = _RowStops(self, StopRule(self, params.end_strings), prompts_ids, budgets, start=input_ids.shape[1])
        if params.random_seed is not None:
            torch.manual_seed(params.random_seed)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                generation_config=self._generation_config(params, max(budgets)),
                stopping_criteria=_stopping_list([stops]),
            )
        generated = out[:, input_ids.shape[1]:].tolist()
        kept = [stops.done_at[i] or len(generated[i]) for i in range(len(prompts))]
        rows = pad_rows([p + g[:k] for p, g, k in zip(prompts_ids, generated, kept)], self.eos_id)
        gen = Generation(rows=rows, prompt_lengths=lengths, generated_lengths=kept)
        if params.compute_logprob:
            gen.logprob, gen.full_logprob = self._logprobs(rows, params.all_probs)
        return gen

    def _left_pad(self, rows: list[list[int]]):
        # Left padding keeps every row's last prompt token at the same position, which is
        # what batched decoding with a causal LM needs.
        torch = self._torch
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.eos_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
                mask[i, width - len(row):] = 1
        return ids, mask

    def _generation_config(self, params: GenerateParams, max_new: int):
        from transformers import GenerationConfig

        settings: dict = dict(
            max_new_tokens=max_new,
            min_new_tokens=params.min_tokens_to_generate,
            eos_token_id=self.eos_id,
            pad_token_id=self.eos_id,  # finished rows are filled with EOD, as in NeMo
            bos_token_id=self.bos_id,
        )
        if params.greedy:
            settings["do_sample"] = False
        else:
            settings.update(
                do_sample=True,
                temperature=float(params.temperature),
                top_k=int(params.top_k),
                # NeMo applies nucleus filtering only for 0 < p < 1; 0 and 1 both mean "off".
                top_p=float(params.top_p) if 0.0 < params.top_p < 1.0 else 1.0,
            )
        if params.compute_logprob:
            settings["repetition_penalty"] = float(params.repetition_penalty)
        return GenerationConfig(**settings)

    def _logprobs(self, rows: list[list[int]], all_probs: bool):
        torch = self._torch
        ids = torch.tensor(rows, dtype=torch.long)
        with torch.inference_mode():
            logits = self.model(input_ids=ids).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        chosen = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        return chosen.tolist(), (logp.tolist() if all_probs else None)


def _stopping_list(criteria: list):
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList(criteria)


class _RowStops:
    """Per-row stop check for transformers' generate(), recording how many tokens each row kept."""

    def __init__(self, engine: Engine, rule: StopRule, prompts_ids: list[list[int]], budgets: list[int], *, start: int):
        self.engine = engine
        self.rule = rule
        self.prompts_ids = prompts_ids
        self.budgets = budgets
        self.start = start
        self.done_at: list[int | None] = [None] * len(budgets)

    def __call__(self, input_ids, scores=None, **kwargs):
        produced = input_ids.shape[1] - self.start
        tail = input_ids[:, self.start:].tolist()
        for i, row in enumerate(tail):
            if self.done_at[i] is None and self._row_done(i, row, produced):
                self.done_at[i] = produced
        done = [d is not None for d in self.done_at]
        return self.engine._torch.tensor(done, dtype=self.engine._torch.bool, device=input_ids.device)

    def _row_done(self, i: int, generated: list[int], produced: int) -> bool:
        def text() -> str:
            return self.engine.detokenize(self.prompts_ids[i] + generated)

        return produced >= self.budgets[i] or self.rule.is_end(generated[-1], text)


# --------------------------------------------------------------------------- simulated


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
        self._ids: dict[str, int] = {EOS_TOKEN: 0}
        self._vocab_lock = threading.Lock()
        self._word_ids = [self._id(piece) for piece in _WORD_PIECES]

    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = []
        for n, part in enumerate(text.split(EOS_TOKEN)):
            if n:
                ids.append(self.eos_id)  # a literal special token in the text, as real tokenizers do
            ids.extend(self._id(piece) for piece in _PIECE.findall(part))
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return "".join(self._pieces[i] for i in ids if i != self.eos_id)

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
        self._sleep(max(0.0, modelled - (time.monotonic() - began)))
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
            if rule.is_end(token, lambda: tail):
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
                found = self._ids[piece] = len(self._pieces)
                self._pieces.append(piece)
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
