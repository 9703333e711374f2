"""Client for NeMo 24.05's PUT /generate (API `nemo-generate`).

Everything is validated before sending, because a malformed request can hang all ranks of the
server (an empty list or a non-string item raises inside generation after the ranks have
synchronised). The transport is a `requests.Session` passed in, with explicit connect and read
timeouts on every call.

A shard sends its requests one at a time, so a kill loses at most its one request in flight. The
replica's requests in flight are bounded here (`max_in_flight`, the flow's `in_flight`, shared by
every shard of the replica), not by the number of shard tasks: the flow runs one shard task more
than that, and the spare one waits for a slot. So while a shard parses a reply, appends it to its
spill, or publishes its part, another shard's request takes its slot and the server is never left
with fewer requests than `in_flight` between two of a shard's requests or between two shards.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

import requests

from infra.engines.batch import GeneratedText, OnRequest, OnResult, PromptBatch, Result, where
from infra.engines.completion import extract_completion, pairing_error, trim_at_end_strings
from infra.errors import (
    BadRequest,
    ConfigError,
    ReplyMismatch,
    RequestRejected,
    ServerFailure,
    TransientServerError,
    ValidationRejected,
)
from infra.engines.http import HttpClient, reply_json
from infra.engines.throttle import InFlightLimit
from infra.prompting.prompt_format import PromptFormat
from infra.prompting.samples import sample_batches
from infra.prompting.sampling import MAX_BATCH, SamplingParams
from infra.prompting.tokens import check_fits_context, estimate_tokens

log = logging.getLogger(__name__)


def validate_batch(prompts: Sequence[object], sampling: SamplingParams, context_length: int,
                   count_tokens: Callable[[str], int] = estimate_tokens) -> None:
    """Raise ConfigError unless `prompts` is 1–128 non-empty strings that fit the context."""
    if not isinstance(prompts, (list, tuple)):
        raise ConfigError(f"sentences must be a list of strings, got {type(prompts).__name__}")
    if not 1 <= len(prompts) <= MAX_BATCH:
        raise ConfigError(f"a request carries 1–{MAX_BATCH} prompts, got {len(prompts)}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ConfigError(f"prompt {i} must be a non-empty string, got {p!r:.60}")
        if (reason := check_fits_context(p, sampling, context_length, count_tokens)) is not None:
            raise ConfigError(f"prompt {i}: {reason}; shorten it or lower tokens_to_generate")
    if sampling.tokens_to_generate >= context_length:
        raise ConfigError(f"tokens_to_generate {sampling.tokens_to_generate} must be < context length {context_length}")


def _row_offsets(reply: dict, i: int, start: int) -> tuple[list[int] | None, int | None]:
    """Row i's token start offsets at or after `start` (ints only) and its text's length, each None
    when the reply lacks it. Read once per row: a few-shot prompt's offsets are most of the row."""
    offsets, sentences = reply.get("offsets"), reply.get("sentences")
    if not (isinstance(offsets, list) and i < len(offsets) and isinstance(offsets[i], list)):
        return None, None
    end = len(sentences[i]) if isinstance(sentences, list) and i < len(sentences) and isinstance(sentences[i], str) else None
    row = offsets[i]
    # A well-formed row is ascending ints: checked and cut in C, not compared element by element.
    if set(map(type, row)) <= {int} and row == sorted(row):  # sorted: linear on a sorted list
        return row[bisect.bisect_left(row, start):], end
    return [o for o in row if isinstance(o, int) and o >= start], end


def _row_tokens(reply: dict, i: int, start: int) -> tuple[bool, int, list[int] | None]:
    """Row i's generated tokens, read from its offsets in one pass: (whether it stopped on a special
    token, how many tokens it generated, where those that take room in its text begin; None
    without offsets).

    Special tokens take no room in the text, so the stop token (an EOS or an end of turn) and the
    EOS fill of rows that finished before the batch's longest all sit at the text's end: a token
    there means the row stopped on one (the echo drops it, so the end string is not in the text),
    and it counts as one generated token, the fill as none."""
    row, end = _row_offsets(reply, i, start)  # the generated tokens: their text starts at or after `start`
    if row is None:
        return False, 0, None
    if end is None:
        return False, len(row), row
    starts = [o for o in row if o < end]
    past_end = len(starts) < len(row)
    return end > start and past_end, len(starts) + past_end, starts


class NemoClient(HttpClient):
    api = "nemo-generate"

    def __init__(self, base_url: str, *, echo: Callable[[str], str] = lambda text: text,
                 keep_first: Callable[[str, int], str] | None = None, max_in_flight: int | None = None, **kw):
        """`keep_first`: the run's tokenizer's TokenCounter.keep_first, which cuts a row to
        tokens_to_generate in its tokens (with `count_tokens` its count); without one (no
        tokenizer here) the cut is on the server's own token offsets. `max_in_flight`: the most
        requests open at once through this client, whichever threads send them (None: no bound)."""
        super().__init__(base_url, **kw)
        self.echo = echo
        self.keep_first = keep_first
        self.limit = InFlightLimit(max_in_flight, self.base_url) if max_in_flight else None

    def close(self) -> None:
        """The replica is released: a request waiting for a slot fails with ServerLost (its shard goes
        back to the queue); the requests open finish or fail on their own."""
        if self.limit is not None:
            self.limit.close()

    @property
    def generate_url(self) -> str:
        return f"{self.base_url}/generate"

    def port_open(self) -> bool:
        """True once anything answers HTTP on the port (NeMo answers 404 on `/` once it listens;
        before the model has loaded on every rank the connection is refused)."""
        try:
            self.session.put(self.base_url + "/", timeout=(self.connect_timeout, self.connect_timeout))
        except requests.RequestException:
            return False
        return True

    def generate_raw(self, prompts: list[str], sampling: SamplingParams, *, read_timeout: float | None = None) -> dict:
        validate_batch(prompts, sampling, self.context_length, self.count_tokens)
        request = self.prepare("PUT", self.generate_url, {"sentences": list(prompts), **sampling.request_fields()})
        with self._slot(read_timeout):  # the send and the reply's read (requests reads it whole), not its parsing
            resp = self.send(request, read_timeout=read_timeout, what=f"a batch of {len(prompts)}",
                             hung="the server may be hung (a hung NeMo server never answers)")
        return self._parse(resp, len(prompts))

    def _slot(self, read_timeout: float | None):
        """One of the replica's `max_in_flight` request slots. No request holds one longer than a
        connect plus a read timeout, so a wait longer than that for one to free is a hung server."""
        if self.limit is None:
            return contextlib.nullcontext()
        return self.limit.slot(self.connect_timeout + max(self.read_timeout, read_timeout or 0.0))

    def _parse(self, resp: requests.Response, n: int) -> dict:
        try:
            payload = reply_json(resp)
        except ValueError:
            payload = resp.text[:500]
        where = f"PUT {self.generate_url} ({n} prompts)"
        if resp.status_code == 200:
            if isinstance(payload, dict) and isinstance(payload.get("sentences"), list) and len(payload["sentences"]) == n:
                return payload
            raise ValidationRejected(
                f"{where} was rejected by the server: {payload!r:.300}. Fix the request; it is not retried.",
                status=200, body=payload,
            )
        if resp.status_code == 400:
            raise BadRequest(f"{where} got HTTP 400: {payload!r:.300}", status=400, body=payload)
        if resp.status_code == 500:
            raise ServerFailure(
                f"{where} got HTTP 500 {payload!r:.200}: a key was missing or generation raised "
                "(the server may now be hung; check its log).",
                status=500, body=payload,
            )
        if resp.status_code >= 500:
            raise TransientServerError(f"{where} got HTTP {resp.status_code}: {payload!r:.200}")
        raise RequestRejected(f"{where} got HTTP {resp.status_code}: {payload!r:.300}", status=resp.status_code, body=payload)

    def generate(self, prompts: list[str], sampling: SamplingParams, **kw) -> list[GeneratedText]:
        reply = self.generate_raw(prompts, sampling, **kw)
        sentences = reply["sentences"]
        for i, sentence in enumerate(sentences):
            if not isinstance(sentence, str):
                raise ValidationRejected(f"reply sentence {i} is not a string: {sentence!r:.100}", status=200, body=None)
        # The server echoes each prompt as its tokenizer round-trips it; strip exactly that.
        echoes = [self.echo(p) for p in prompts]
        completions = [extract_completion(e, s, sampling.end_strings) for e, s in zip(echoes, sentences)]
        # Sentences are paired with prompts by position: check each echoes its own prompt, so a
        # reordered or duplicated reply fails the batch (bisection then isolates it) instead of
        # publishing another prompt's completion.
        if (why := pairing_error(echoes, sentences, completions)) is not None:
            raise ReplyMismatch(f"PUT {self.generate_url} ({len(prompts)} prompts): {why}. The batch is bisected; "
                                "a prompt whose reply still does not match becomes a reject.", status=200, body=why)
        out = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            if completion.prompt_match != "exact":
                log.warning("prompt %d did not round-trip through the tokenizer; stripped by %s match", i, completion.prompt_match)
            stop_token, generated, starts = _row_tokens(reply, i, completion.generated_from)
            if completion.finish_reason == "length" and stop_token:
                completion = replace(completion, finish_reason="end_string")
            gen = GeneratedText(prompt, completion, generated)
            out.append(self._capped(gen, sentences[i], starts, stop_token, sampling))
        return out

    def generate_batch(self, batch: PromptBatch, on_result: OnResult | None = None,
                       on_request: OnRequest | None = None) -> list[Result]:
        """Results prompt-major (infra/engines/batch.py), whatever order the requests went in: each
        sample index is its own pass over one batch plan, prompts grouped by this client's token
        counter (the run's) within `length_window` batches, each request seeded as
        infra/prompting/samples.py says. A planned request whose results are all in `batch.done` is
        not sent; with the same plan (a seeded run's batch_size is in its config) the others are
        sent exactly as they would have been."""
        n, done = batch.samples, batch.done or {}
        results: list[Result | None] = [None] * (len(batch.prompts) * n)
        for sample, indices, sampling in sample_batches(batch.prompts, n, batch.shard, batch.sampling, batch.batch_size,
                                                        batch.length_window, self.count_tokens):
            todo = [i for i in indices if i * n + sample not in done]
            for i in indices:
                results[i * n + sample] = done.get(i * n + sample)
            if not todo:
                continue
            lines = [batch.lines[i] for i in todo] if batch.lines is not None else None
            got = list(zip(todo, self._bisected([batch.prompts[i] for i in todo], sampling, batch.prompt_format, lines)))
            for i, result in got:
                results[i * n + sample] = result
                if on_result is not None:
                    on_result(result)
            if on_request is not None:
                on_request([(i * n + sample, result) for i, result in got])
        return results  # type: ignore[return-value]

    def _bisected(self, prompts: list[str], sampling: SamplingParams, fmt: PromptFormat,
                  lines: list[int] | None) -> list[Result]:
        """One request's results in its order. A rejected request is split in halves until the
        prompts at fault stand alone; validation errors are never retried as they are."""
        try:
            return self.generate([fmt.wrap(p) for p in prompts], sampling)
        except RequestRejected as exc:
            if len(prompts) == 1:
                log.warning("prompt %s rejected by the server: %s", where(lines[0] if lines else None), exc)
                return [exc]
            mid = len(prompts) // 2
            log.info("batch of %d rejected (%s); bisecting", len(prompts), type(exc).__name__)
            halves = (lines[:mid], lines[mid:]) if lines else (None, None)
            return (self._bisected(prompts[:mid], sampling, fmt, halves[0])
                    + self._bisected(prompts[mid:], sampling, fmt, halves[1]))

    def _capped(self, gen: GeneratedText, sentence: str, starts: list[int] | None, stop_token: bool,
                sampling: SamplingParams) -> GeneratedText:
        """The row as a per-row cap of tokens_to_generate would have ended it. NeMo steps every row
        of a batch to its longest prompt + tokens_to_generate, so a shorter prompt's row runs past
        the cap (reference/nemo-generate-server.md): cut its generation to the first
        tokens_to_generate tokens (a stop token counts as one, as the server counts it), read the
        end strings in what is left, and keep the server's count beside the count kept."""
        cap, c = sampling.tokens_to_generate, gen.completion
        generation = sentence[c.generated_from:]  # end string and all: trimmed again after the cut
        if self.keep_first is not None:
            n = self.count_tokens(generation)
            kept = self.keep_first(generation, cap) if n > cap else generation
        elif starts is not None:
            n = len(starts)
            kept = sentence[c.generated_from:starts[cap]] if n > cap else generation
        else:
            return gen  # no tokenizer and no offsets: nothing to count the cap in
        if n + stop_token <= cap:
            return gen
        text, ended = trim_at_end_strings(kept, sampling.end_strings)
        tokens = self.count_tokens(kept) if self.keep_first is not None else min(n, cap)
        return replace(gen, completion=replace(c, text=text, finish_reason="end_string" if ended else "length"),
                       generated_tokens=tokens, server_tokens=gen.generated_tokens)

    def keep_alive(self, timeout: float | None = None) -> None:
        """The same 1-token generation, raising what it meets: also sent to an idle server so that
        its ranks never sit in NCCL's collective longer than its timeout (5 h in megatron_gpt_eval.py)."""
        self.generate_raw(["Hello"], SamplingParams(tokens_to_generate=1, greedy=True), read_timeout=timeout)
