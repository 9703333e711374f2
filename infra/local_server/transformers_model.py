"""A real model behind `/generate`: any causal LM that transformers can load from a local directory
(for tests: `tiny_model.make_tiny_model`), run on CPU with torch, under NeMo's generation semantics
(nemo_generation.py): row budgets, end strings, EOS fill.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from infra.errors import ConfigError
from infra.local_server.nemo_generation import (
    Engine,
    GenerateParams,
    Generation,
    StopRule,
    pad_rows,
    prompt_ids,
    row_budgets,
)

log = logging.getLogger(__name__)


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
