"""Client for OpenAI-compatible `POST /v1/completions` (vLLM, TensorRT-LLM's trtllm-serve, NeMo >= 2.1).

One prompt per request, its samples as `n`: with a prompt list one failed prompt fails the whole
request and the reply waits for the slowest, so the engine's continuous batching is fed by many
requests in flight instead (`max_in_flight`, a bounded thread pool shared by every shard of a
replica). Field mapping from the recipe's sampling parameters (reference/openai-engines.md §2, §3):

- tokens_to_generate -> max_tokens, always sent (the completions default is 16);
- greedy -> temperature 0; top_p outside (0, 1) -> 1.0 (off, as NeMo reads it); top_k > 0 and
  min_tokens_to_generate > 0 go as vLLM's top-level extras `top_k` / `min_tokens`;
- end_strings -> stop; for NeMo >= 2.1 also as `end_strings` (it reads only that one and ignores
  `stop`, and ignores `n`: each sample is then its own request). vLLM removes the matched stop string from the text; NeMo >= 2.1 leaves it in. The
  completion is trimmed at the first end string here too, so it never carries the end string:
  the same as the /generate path;
- the request's seed (infra.prompting.samples) -> seed;
- a run's output_schema -> the engine's constrained decoding (`constraint_fields`): vLLM's
  `structured_outputs: {json: schema}` (>= 0.10.2; `guided_json` was removed in 0.12), trtllm-serve's
  `response_format: {type: json, schema}` (its server started with a guided_decoding_backend);
  NeMo >= 2.1 and custom servers are sent none (the reply is validated after, on every engine);
- finish_reason stop -> "end_string", length -> "length", abort -> "abort"; NeMo >= 2.1 always
  answers "": "end_string" when an end string was found in the text, else "length" (as /generate);
- usage.completion_tokens -> generated_tokens (summed over the n choices by the server: a choice
  capped at max_tokens counts exactly that, the rest is split by text share; split_usage; a total
  below what the choices must have generated is one choice's, as llama-server reports it: the others
  are then counted by their text). NeMo >= 2.1 counts whitespace-split words, not tokens: its records
  say `generated_tokens_unit: words`;
- HTTP 400 (context length and any other refusal) -> that record is rejected with the server's
  message, read from both vLLM shapes (flat before 0.10.1, nested under `error` since) and
  trtllm-serve's `{"error": str}`;
- 429 and 503 -> back-pressure (infra.engines.throttle): that one request is sent again after a wait
  (the server's Retry-After, else backoff) and the replica keeps fewer requests in flight for a while;
  past `Backoff.tries` sends or its deadline, ServerThrottled: busy, never a lost server;
- other 5xx, 408 and connection errors -> transient; no progress within the read timeout -> a hung
  server (vLLM's engine can die while its HTTP side answers, vllm#39863).

Closing the client (its replica was released) fails what is still queued in its pool, or waiting
out a throttle, with ServerLost, so the shard waiting on it goes back to the queue; nothing more is
sent through it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import requests

from infra.engines.completion import Completion, trim_at_end_strings
from infra.deadline import Deadline
from infra.engines.batch import GeneratedText, OnRequest, OnResult, PromptBatch, Result, where
from infra.engines.http import HttpClient, reply_json
from infra.engines.throttle import THROTTLE_STATUS, Backoff, InFlightLimit, retry_after_s
from infra.errors import (BadRequest, ConfigError, RequestRejected, ServerLost, ServerThrottled, TransientServerError,
                          ValidationRejected)
from infra.prompting.samples import request_seed
from infra.prompting.sampling import SamplingParams
from infra.prompting.tokens import check_fits_context

log = logging.getLogger(__name__)

COMPLETIONS_PATH = "/v1/completions"
FINISH_REASONS = {"stop": "end_string", "length": "length", "abort": "abort"}
TRANSIENT_STATUS = {408}  # and 5xx other than 503; 429/503 are THROTTLE_STATUS


def constraint_fields(engine: str | None, schema: dict | None) -> dict:
    """The request fields that make `engine` decode only replies matching `schema` (none where it cannot)."""
    if schema is None:
        return {}
    if engine == "vllm":
        return {"structured_outputs": {"json": schema}}
    if engine == "trtllm":
        return {"response_format": {"type": "json", "schema": schema}}
    return {}


def request_body(model: str, prompt: str, sampling: SamplingParams, *, n: int = 1, seed: int | None = None,
                 end_strings_field: bool = False, constraint: dict | None = None) -> dict:
    """The JSON body for one prompt; every sampling field explicit (server defaults differ).
    `end_strings_field`: NeMo >= 2.1's own stop field (trtllm-serve refuses unknown fields)."""
    body: dict = {
        "model": model,
        "prompt": prompt,
        "max_tokens": sampling.tokens_to_generate,
        "temperature": 0.0 if sampling.greedy else sampling.temperature,
        "top_p": sampling.top_p if 0.0 < sampling.top_p < 1.0 and not sampling.greedy else 1.0,
        "n": n,
        "stop": list(sampling.end_strings),
    }
    if end_strings_field:
        body["end_strings"] = list(sampling.end_strings)
    else:  # vLLM and trtllm-serve add BOS unless told (add_special_tokens defaults to true): add_BOS decides,
        # as on the NeMo path (audit S1). NeMo >= 2.1's server fixes it itself and may refuse the field.
        body["add_special_tokens"] = sampling.add_BOS
    if sampling.top_k > 0 and not sampling.greedy:
        body["top_k"] = sampling.top_k
    if sampling.min_tokens_to_generate > 0:
        body["min_tokens"] = sampling.min_tokens_to_generate
    if seed is not None:
        body["seed"] = seed
    elif sampling.random_seed is not None:
        body["seed"] = sampling.random_seed
    return {**body, **(constraint or {})}


def error_message(payload: object) -> str:
    """The server's message from vLLM's flat (< 0.10.1) or nested (>= 0.10.1) shape, or trtllm's string."""
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
        if isinstance(payload.get("message"), str):
            return payload["message"]
        if isinstance(payload.get("detail"), str):  # FastAPI's own 4xx
            return payload["detail"]
    return str(payload)[:500]


def split_usage(total: int | None, texts: list[str], count: Callable[[str], int],
                capped: list[bool] | None = None, max_tokens: int | None = None) -> list[int]:
    """Per-choice generated tokens from the request's total (the server sums over n): exact for
    n == 1 and for a choice that ended at the cap (`capped`: finish `length`, exactly max_tokens);
    the rest of the total shared out over the other choices by each text's counted length, the
    remainder to the longest, none above max_tokens. (By text share alone, a capped sample of 16
    could be given 17 beside a shorter one: issue 25's real vLLM run.)"""
    if total is None:
        return [count(t) for t in texts]
    if len(texts) == 1:
        return [total]
    capped = capped if capped is not None and max_tokens is not None else [False] * len(texts)
    shares = [max_tokens if cap else 0 for cap in capped]
    rest = [i for i, cap in enumerate(capped) if not cap]
    if not rest:
        return shares
    if total < sum(shares) + len(rest):
        # Less than the capped choices' tokens plus one (the end) for each other: the server counted
        # one choice, not the sum (llama-server with n > 1); the others are counted by their text.
        return [n if capped[i] else min(max(count(texts[i]), 1), max_tokens or 1 << 30) for i, n in enumerate(shares)]
    left = max(total - sum(shares), 0)
    weights = {i: max(count(texts[i]), 1) for i in rest}
    for i in rest:
        shares[i] = left * weights[i] // sum(weights.values())
    shares[max(rest, key=lambda i: weights[i])] += left - sum(shares[i] for i in rest)
    return [min(n, max_tokens) if max_tokens is not None else n for n in shares]


@dataclass(frozen=True)
class Choice:
    text: str
    finish_reason: str


class OpenAIClient(HttpClient):
    api = "openai-completions"

    def __init__(self, base_url: str, *, model: str, max_in_flight: int = 256, nemo_openai: bool = False,
                 backoff: Backoff = Backoff(), engine: str | None = None, **kw):
        super().__init__(base_url, connections=max_in_flight, **kw)
        self.model = model
        self.max_in_flight = max_in_flight
        self.backoff = backoff
        # The pool's threads are the most requests in flight; the limit is how many may be now.
        self.limit = InFlightLimit(max_in_flight, self.base_url)
        # NeMo >= 2.1 ignores `n` and `stop` and counts words as usage.
        self.nemo_openai = nemo_openai
        self.engine = engine  # which constrained-decoding fields it takes (constraint_fields)
        self.tokens_unit = "words" if nemo_openai else "tokens"
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    @property
    def completions_url(self) -> str:
        return self.base_url + COMPLETIONS_PATH

    # --- the bounded pool every shard of this replica shares ---------------------------------

    def submit(self, fn: Callable, *args, **kw) -> concurrent.futures.Future:
        with self._pool_lock:
            if self.limit.closed:
                raise self._released()
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="completion")
            return self._pool.submit(self._unless_closed, fn, *args, **kw)

    def _unless_closed(self, fn: Callable, *args, **kw):
        if self.limit.closed:  # queued when its replica was released: fail as lost, send nothing
            raise self._released()
        return fn(*args, **kw)

    def _released(self) -> ServerLost:
        return ServerLost(f"{self.base_url}: the replica was released before this request was sent; "
                          "its shard goes back to the queue.")

    def close(self) -> None:
        """The replica is released: what is queued here fails at once with ServerLost, never a bare
        CancelledError (which no caller would read as a lost server, and so would fail the run)."""
        self.limit.close()
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False)  # the queued calls run, see the close, and raise ServerLost
                self._pool = None

    # --- one request -------------------------------------------------------------------------

    def check_prompt(self, prompt: object, sampling: SamplingParams) -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"a prompt must be a non-empty string, got {prompt!r:.60}")
        if sampling.tokens_to_generate >= self.context_length:
            raise ConfigError(f"tokens_to_generate {sampling.tokens_to_generate} must be < context length {self.context_length}")
        # The plan's rule with the plan's counter: a prompt the plan accepted always passes.
        if (reason := check_fits_context(prompt, sampling, self.context_length, self.count_tokens)) is not None:
            raise ConfigError(f"{reason}; shorten the prompt or lower tokens_to_generate")

    def complete_raw(self, prompt: str, sampling: SamplingParams, *, n: int = 1, seed: int | None = None,
                     read_timeout: float | None = None, schema: dict | None = None) -> dict:
        self.check_prompt(prompt, sampling)
        body = request_body(self.model, prompt, sampling, n=n, seed=seed, end_strings_field=self.nemo_openai,
                            constraint=constraint_fields(self.engine, schema))
        return self._parse(self._send_while_throttled(body, n, read_timeout), n)

    def _send_while_throttled(self, body: dict, n: int, read_timeout: float | None) -> requests.Response:
        """One prompt's request, sent again while the server answers 429/503 (busy): each such reply
        lowers this replica's in-flight limit and is waited out (Retry-After, else backoff), within
        `backoff.tries` sends and `backoff.wait_s` (a probe's own timeout when shorter)."""
        patience = Deadline(self.backoff.wait_s if read_timeout is None else min(read_timeout, self.backoff.wait_s))
        # No request holds a slot longer than a connect plus a read timeout: waiting longer for one is a hang.
        stall_s = self.connect_timeout + max(self.read_timeout, read_timeout or 0.0)
        seen: list[str] = []
        request = self.prepare("POST", self.completions_url, body)  # once: each try sends the same bytes
        for attempt in range(1, self.backoff.tries + 1):
            with self.limit.slot(stall_s) as sent_in:
                resp = self.send(request, read_timeout=read_timeout,
                                 what=f"one prompt (n={n})",
                                 hung="the engine may have died while its HTTP side still answers (vllm#39863)")
            if resp.status_code not in THROTTLE_STATUS:
                self.limit.answered()
                return resp
            self.limit.throttled(sent_in, resp.status_code)
            after = retry_after_s(resp.headers.get("Retry-After"))
            seen.append(f"{resp.status_code}" + (f" (Retry-After {after:.0f} s)" if after is not None else ""))
            wait = self.backoff.delay(attempt, after)
            if attempt == self.backoff.tries or wait > patience.remaining():
                break
            if self.limit.wait_out(wait):
                raise self._released()
        left = "" if attempt == self.backoff.tries else f", and the next wait ({wait:.0f} s) would pass its deadline"
        raise ServerThrottled(
            f"POST {self.completions_url} (n={n}): the server answered {len(seen)} tries of one prompt over "
            f"{patience.elapsed():.0f} s with HTTP {', '.join(seen)}{left}: it is busy (throttling), not lost; "
            f"{self.limit.limit} of {self.max_in_flight} requests were allowed in flight at the end. Lower "
            f"NSDG_SERVER__MAX_IN_FLIGHT, raise NSDG_SERVER__THROTTLE_WAIT_S ({self.backoff.wait_s:.0f} s) or "
            f"NSDG_SERVER__THROTTLE_TRIES ({self.backoff.tries}), or ask the server's owner about its rate limit; "
            "then rerun with the same run_id (published shards are kept).")

    def _parse(self, resp: requests.Response, n: int) -> dict:
        try:
            payload = reply_json(resp)
        except ValueError:
            payload = resp.text[:500]
        where = f"POST {self.completions_url} (n={n})"
        status = resp.status_code
        if status == 200:
            choices = payload.get("choices") if isinstance(payload, dict) else None
            if isinstance(choices, list) and len(choices) == n and all(
                    isinstance(c, dict) and isinstance(c.get("text"), str) for c in choices):
                return payload
            raise ValidationRejected(f"{where}: the reply is not {n} completion choice(s): {payload!r:.300}",
                                     status=200, body=f"malformed reply: {payload!r:.300}")
        message = error_message(payload)
        if status >= 500 or status in TRANSIENT_STATUS:
            raise TransientServerError(f"{where} got HTTP {status}: {message:.300}")
        if status == 400:
            raise BadRequest(f"{where} got HTTP 400: {message:.300}", status=400, body=message)
        raise RequestRejected(f"{where} got HTTP {status}: {message:.300}. Check the served model name "
                              f"({self.model!r}) and the engine's API.", status=status, body=message)

    def complete(self, prompt: str, sampling: SamplingParams, *, n: int = 1, seed: int | None = None,
                 read_timeout: float | None = None, schema: dict | None = None) -> list[GeneratedText]:
        """n samples of one prompt, in choice-index order."""
        reply = self.complete_raw(prompt, sampling, n=n, seed=seed, read_timeout=read_timeout, schema=schema)
        choices = sorted(reply["choices"], key=lambda c: c.get("index", 0) if isinstance(c.get("index"), int) else 0)
        parsed = [self._choice(c, sampling.end_strings) for c in choices]
        usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
        total = usage.get("completion_tokens") if isinstance(usage.get("completion_tokens"), int) else None
        tokens = split_usage(total, [c.text for c in parsed], self.count_tokens,
                             [c.finish_reason == "length" for c in parsed], sampling.tokens_to_generate)
        return [GeneratedText(prompt, Completion(c.text, "exact", c.finish_reason, 0), t, self.tokens_unit)
                for c, t in zip(parsed, tokens)]

    @staticmethod
    def _choice(choice: dict, end_strings: list[str]) -> Choice:
        text, ended = trim_at_end_strings(choice["text"], end_strings)
        reason = choice.get("finish_reason")
        if reason in FINISH_REASONS:
            return Choice(text, FINISH_REASONS[reason])
        if not reason:  # NeMo >= 2.1: always ""
            return Choice(text, "end_string" if ended else "length")
        return Choice(text, str(reason))  # newer vLLM: "error", "repetition": kept as the server said

    def samples(self, prompt: str, sampling: SamplingParams, n: int, seeds: list[int | None],
                schema: dict | None = None) -> list[GeneratedText]:
        """n samples of one prompt: one request with `n` (seeds[0]), or n requests where the engine ignores n."""
        if not self.nemo_openai or n == 1:
            return self.complete(prompt, sampling, n=n, seed=seeds[0], schema=schema)
        return [g for s in range(n) for g in self.complete(prompt, sampling, seed=seeds[s], schema=schema)]

    # --- a shard's prompts ---------------------------------------------------------------------

    def generate_batch(self, batch: PromptBatch, on_result: OnResult | None = None,
                       on_request: OnRequest | None = None) -> list[Result]:
        """One request per prompt (its samples as `n`), all handed to this replica's bounded pool at
        once, so the engine's continuous batching always has work; results prompt-major. A seeded
        batch derives each prompt's seeds from (seed, shard, prompt, sample): one prompt per request
        makes a sample independent of what else is in flight. A prompt whose samples are all in
        `batch.done` is not sent; `on_request` hears of each prompt's, in prompt order."""
        n, seed, done = batch.samples, batch.sampling.random_seed, batch.done or {}
        futures = []
        for i, prompt in enumerate(batch.prompts):
            if all(i * n + s in done for s in range(n)):
                futures.append(None)
                continue
            seeds = [None if seed is None else request_seed(seed, batch.shard, i, s) for s in range(n)]
            futures.append(self.submit(self._samples_or_reject, batch.prompt_format.wrap(prompt), batch.sampling, n,
                                       seeds, batch.lines[i] if batch.lines is not None else None, batch.output_schema))
        results: list[Result] = []
        try:
            for i, fut in enumerate(futures):
                if fut is None:
                    results += [done[i * n + s] for s in range(n)]
                    continue
                got = fut.result()
                for result in got:
                    results.append(result)
                    if on_result is not None:
                        on_result(result)
                if on_request is not None:
                    on_request([(i * n + s, result) for s, result in enumerate(got)])
        except BaseException:
            for fut in futures:  # a lost server or an open breaker: the rest of the batch is not sent
                if fut is not None:
                    fut.cancel()
            raise
        return results

    def _samples_or_reject(self, prompt: str, sampling: SamplingParams, n: int, seeds: list[int | None],
                           line: int | None, schema: dict | None = None) -> list[Result]:
        try:
            return self.samples(prompt, sampling, n, seeds, schema)
        except RequestRejected as exc:
            log.warning("prompt %s rejected by the server: %s", where(line), exc)
            return [exc] * n

    # --- liveness ----------------------------------------------------------------------------

    def get(self, path: str, timeout: float) -> requests.Response:
        return self.session.get(self.base_url + path, timeout=(self.connect_timeout, timeout))

    def port_open(self) -> bool:
        try:
            self.get("/", self.connect_timeout)
        except requests.RequestException:
            return False
        return True

    def keep_alive(self, timeout: float | None = None) -> None:
        self.complete_raw("Hello", SamplingParams(tokens_to_generate=1, greedy=True, end_strings=[]), read_timeout=timeout)
