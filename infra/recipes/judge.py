"""The judge: the run's own server scores each generated row, on the same allocation.

A row's judging prompt is `judge.template` (sandboxed Jinja2, as the prompt template) over the row's
fields, `id`, `sample`, `prompt` and `completion`. The judge's replies are a checkpoint of their
own, next to the part they judge (`part-NNNNN.jsonl.judge.jsonl`, one row per part row, in the
part's order) with a state object naming the judge's hash and the file's sha256 (infra/run/states.py:
trusted only while the file has it): a new judge template re-judges
without regenerating, and the score is read from the reply later (`filters`), so a new
score_pattern or min_score needs no server at all.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from infra.run.manifest import config_hash
from infra.engines.batch import GeneratedText, PromptBatch
from infra.engines.http import HttpClient
from infra.prompting.prompt_format import RAW, PromptFormat
from infra.recipes.params import JudgeParams
from infra.recipes.templates import PromptTemplate, RenderError, load_template, prompt_char_limit, render
from infra.prompting.sampling import SamplingParams
from infra.run.layout import judge_name, judge_state_name
from infra.run.states import describes, invalidate, read_described
from infra.storage.jsonl import publish, read_rows, read_state
from infra.prompting.tokens import ByteEstimate, TokenCounter, check_fits_context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Judge:
    """The loaded judge: its template read once at flow start."""

    params: JudgeParams
    template: PromptTemplate
    sampling: SamplingParams
    prompt_format: PromptFormat = RAW
    context_length: int = 4096
    counter: TokenCounter = ByteEstimate()  # the run's token counter: a judging prompt must fit as a prompt must

    def identity(self, generation_hash: str) -> str:
        """What makes a judgement: the parts judged, the template, how the judge samples and what it is sent."""
        return config_hash({"generation": generation_hash, "template_sha256": self.template.sha256,
                            "sampling": self.sampling.model_dump(mode="json"), "prompt_format": self.prompt_format.identity()})

    def prompts(self, rows: list[dict]) -> list[str | dict]:
        """Each row's judging prompt, or {"error": why} for a row it cannot be built for."""
        compiled, out, max_chars = self.template.compiled(), [], prompt_char_limit(self.context_length)
        count = self.counter.count
        for row in rows:
            try:
                text = render(compiled, {**row, "id": row.get("id"), "sample": row.get("sample", 0)}, max_chars)
            except RenderError as exc:
                out.append({"error": f"judge.template cannot render this record: {exc}"})
                continue
            if (too_long := check_fits_context(self.prompt_format.wrap(text), self.sampling, self.context_length, count)) is not None:
                out.append({"error": f"judge prompt: {too_long}"})
                continue
            out.append(text)
        return out

    def judge_rows(self, client: HttpClient, rows: list[dict], batch_size: int) -> list[dict]:
        """One judgement per row, in row order: {"id", "sample", "reply"} or {"id", "sample", "error"}."""
        prompts = self.prompts(rows)
        todo = [i for i, p in enumerate(prompts) if isinstance(p, str)]
        out: list[dict] = [{"id": r.get("id"), "sample": r.get("sample", 0)} for r in rows]
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                out[i].update(p)
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            batch = PromptBatch([prompts[i] for i in idx], self.sampling, self.prompt_format, batch_size=batch_size)
            for i, result in zip(idx, client.generate_batch(batch)):
                if isinstance(result, GeneratedText):
                    out[i]["reply"] = result.completion.text
                else:
                    out[i]["error"] = f"server rejected the judge prompt: {str(result.body if result.body is not None else result)[:300]}"
        return out


def load_judge(params: JudgeParams, settings, prompt_format: PromptFormat, add_bos: bool = False,
               counter: TokenCounter = ByteEstimate()) -> Judge | None:
    if not params.enabled:
        return None
    template = load_template(params.template, settings, "judge.template")
    sampling = SamplingParams(tokens_to_generate=params.tokens_to_generate, greedy=True, end_strings=list(params.end_strings),
                              add_BOS=add_bos)
    return Judge(params, template, sampling, prompt_format, settings.model.context_length, counter)


def judge_part(client, store, judge: Judge, part, batch_size: int, rows: list[dict] | None = None) -> dict:
    """Judge a published part's rows and publish the judgement and its state; returns the state."""
    if rows is None:
        rows = read_rows(store.read_bytes(part.name))
    judged = judge.judge_rows(client, rows, batch_size) if rows else []
    state = publish_judgement(store, judge, part, judged)
    log.info("shard %d: %d records judged (%d failed)", part.shard, state["records"], state["failed"])
    return state


def publish_judgement(store, judge: Judge, part, judged: list[dict]) -> dict:
    """The part's judgement rows, then the state naming the judge and the file's sha256."""
    invalidate(store, judge_state_name(part.name))  # before the judgement it describes is replaced
    sha, count, _size = publish(store, judge_name(part.name), judged)
    state = {"part": part.name, "shard": part.shard, "part_sha256": part.sha256, "judge_hash": judge.identity(part.config_hash),
             "records": count, "sha256": sha, "failed": sum(1 for j in judged if "error" in j)}
    store.write_bytes(judge_state_name(part.name), json.dumps(state, sort_keys=True).encode())
    return state


def _judge_state(store, judge: Judge, part) -> dict | None:
    """The part's judge state when it is this judge's, of these very rows; else None."""
    state = read_state(store, judge_state_name(part.name))
    if state.get("judge_hash") != judge.identity(part.config_hash) or state.get("part_sha256") != part.sha256:
        return None
    return state


def judged_current(store, judge: Judge, part) -> bool:
    """Has this part a judgement by this judge, of these very rows, its file holding the bytes its
    state names (infra.run.states)?"""
    state = _judge_state(store, judge, part)
    return state is not None and describes(store, {judge_name(part.name): state.get("sha256")})


def read_judgements(store, judge: Judge, part) -> list[dict] | None:
    """The part's judgement rows when they are this judge's and the very bytes its state names; else None."""
    state = _judge_state(store, judge, part)
    data = read_described(store, judge_name(part.name), state.get("sha256")) if state is not None else None
    return None if data is None else read_rows(data)
