"""The local server's OpenAI-compatible side: `POST /v1/completions`, `GET /v1/models`, `GET /health`,
as vLLM answers them (reference/openai-engines.md §2), on the same port as `/generate`.

- One prompt (a string) per request, `n` samples, `max_tokens` (default 16), `stop` (the matched
  string removed from the text, as vLLM does), `seed`; `finish_reason` "stop" or "length"; `usage`
  in tokens, summed over the n choices.
- Prompt + max_tokens over `--max-model-len` -> HTTP 400 with vLLM's message, in the nested shape
  (vLLM >= 0.10.1) or the flat one (`--openai-error-shape flat`).
- A `model` other than the served name -> 404 NotFoundError.
- Fault switches count these requests with the /generate ones: crash, hang, 500 on a marker,
  400 on a marker.

The simulated engine with a cost model runs a **continuous-batching** scheduler here
(`ContinuousBatcher`): a fixed number of sequence slots; each step costs
`decode_step_s * (1 + decode_batch_slope * active) + prefill_s_per_token * (prompt tokens joining)`
-- the same cost model as the static /generate batches; waiting sequences join and finished
ones leave between steps. `GET /sim/stats` reports steps, busy slot-steps and the occupancy.
Any other engine (the real model, a zero-cost simulation) generates one request at a time behind
the /generate lock: the real model is not thread-safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from infra.local_server.constrained import requested_schema, value_of
from infra.local_server.nemo_generation import Engine, GenerateParams, StopRule, prompt_ids
from infra.local_server.service import FAULT_REJECT_MESSAGE
from infra.local_server.simulated_model import SimCost, SimulatedEngine

log = logging.getLogger(__name__)
ERROR_SHAPES = ("nested", "flat")


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def body(self, shape: str) -> dict:
        inner = {"message": self.message, "type": self.kind, "param": None, "code": self.status}
        return {"error": inner} if shape == "nested" else {"object": "error", **inner}


@dataclass
class _Sequence:
    steps: int
    prompt_tokens: int
    done: threading.Event = field(default_factory=threading.Event)


class ContinuousBatcher:
    """Times sequences through fixed slots, one decode step at a time (the text is made up front)."""

    def __init__(self, slots: int, cost: SimCost, sleep=time.sleep):
        self.slots, self.cost, self._sleep = slots, cost, sleep
        self._waiting: deque[_Sequence] = deque()
        self._cond = threading.Condition()
        self.steps = self.busy_slot_steps = self.generated = self.sequences = 0
        # Up to the last step a sequence joined at: "while work remains" (after it, the tail drains).
        self.joined_steps = self.joined_busy = 0
        self.busy_s = 0.0
        threading.Thread(target=self._run, name="continuous-batcher", daemon=True).start()

    def run(self, lengths: list[int], prompt_tokens: int) -> None:
        """Run one request's sequences (its n choices, `lengths` generated tokens each) to their end."""
        seqs = [_Sequence(max(1, n), prompt_tokens) for n in lengths]
        with self._cond:
            self._waiting.extend(seqs)
            self._cond.notify()
        for seq in seqs:
            seq.done.wait()

    def _run(self) -> None:
        active: list[_Sequence] = []
        while True:
            with self._cond:
                self._cond.wait_for(lambda: active or self._waiting)
                joining = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.slots - len(active)))]
                active.extend(joining)
            cost = self.cost.decode_step_s * (1 + self.cost.decode_batch_slope * len(active)) \
                + self.cost.prefill_s_per_token * sum(s.prompt_tokens for s in joining)
            self._sleep(cost)
            with self._cond:
                self.steps += 1
                self.busy_slot_steps += len(active)
                self.generated += len(active)
                self.busy_s += cost
                if joining or self._waiting:
                    self.joined_steps, self.joined_busy = self.steps, self.busy_slot_steps
            for seq in active:
                seq.steps -= 1
            for seq in [s for s in active if s.steps <= 0]:
                active.remove(seq)
                self.sequences += 1
                seq.done.set()

    def stats(self) -> dict:
        with self._cond:
            return {"slots": self.slots, "steps": self.steps, "busy_slot_steps": self.busy_slot_steps,
                    "occupancy": round(self.busy_slot_steps / (self.slots * self.steps), 4) if self.steps else None,
                    "occupancy_while_work_remains": round(self.joined_busy / (self.slots * self.joined_steps), 4)
                    if self.joined_steps else None,
                    "generated_tokens": self.generated, "sequences": self.sequences, "busy_s": round(self.busy_s, 3),
                    "waiting": len(self._waiting)}


class CompletionsService:
    """POST /v1/completions without HTTP. `lock` serialises engines that are not thread-safe."""

    def __init__(self, engine: Engine, *, served_model: str, max_model_len: int, error_shape: str = "nested",
                 slots: int = 256, lock=None, model_root: str | None = None):
        self.served_model, self.max_model_len, self.error_shape = served_model, max_model_len, error_shape
        # What is loaded, as vLLM's `root` names it: `served_model` is only the name requests carry.
        self.model_root = model_root or served_model
        self.batcher = None
        if isinstance(engine, SimulatedEngine) and engine.cost != SimCost():
            # The text from a zero-cost twin; the time from the scheduler.
            self.batcher = ContinuousBatcher(slots, engine.cost)
            engine = SimulatedEngine(SimCost(), finish_fraction=engine.finish_fraction)
        self.engine = engine
        self._lock = lock

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.served_model, "object": "model", "owned_by": "nemotron-sdg",
                                            "root": self.model_root, "max_model_len": self.max_model_len}]}

    def complete(self, body: object) -> dict:
        params, prompt, n = self._read(body)
        try:  # vLLM's structured_outputs, trtllm-serve's response_format: a JSON value of the schema (constrained.py)
            schema = requested_schema(body)
        except ValueError as exc:
            raise OpenAIError(400, str(exc)) from None
        ids = prompt_ids(self.engine, prompt, params.add_BOS)
        if len(ids) + params.tokens_to_generate > self.max_model_len:
            total = len(ids) + params.tokens_to_generate
            raise OpenAIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                                   f"requested {total} tokens ({len(ids)} in the messages, {params.tokens_to_generate} "
                                   "in the completion). Please reduce the length of the messages or completion.")
        choices, lengths = [], []
        for i in range(n):
            seed = None if params.random_seed is None else _choice_seed(params.random_seed, i)
            text, reason, stop_reason, tokens = self._one(prompt, ids, GenerateParams(**{**params.__dict__, "random_seed": seed}))
            if schema is not None:
                text, reason, stop_reason = json.dumps(value_of(schema, text.split())), "stop", None
            choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason,
                            "stop_reason": stop_reason})
            lengths.append(tokens)
        if self.batcher is not None:
            self.batcher.run(lengths, len(ids))
        generated = sum(lengths)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.served_model, "choices": choices,
                "usage": {"prompt_tokens": len(ids), "completion_tokens": generated,
                          "total_tokens": len(ids) + generated}}

    def _one(self, prompt: str, ids: list[int], params: GenerateParams) -> tuple[str, str, str | None, int]:
        if self._lock is not None and self.batcher is None:
            with self._lock.held():
                gen = self.engine.generate([prompt], params)
        else:
            gen = self.engine.generate([prompt], params)
        start = gen.prompt_lengths[0]
        out = gen.rows[0][start:start + gen.generated_lengths[0]]
        rule = StopRule(self.engine, params.end_strings)
        stopped = bool(out) and rule.is_end(out[-1], lambda: self.engine.detokenize(ids + out))
        text, matched = self.engine.detokenize(out), None
        for end in params.end_strings:  # vLLM drops the matched stop string from the text, keeps it in stop_reason
            if stopped and end and text.endswith(end):
                text, matched = text[: -len(end)], end
                break
        return text, "stop" if stopped else "length", matched, len(out)

    def _read(self, body: object) -> tuple[GenerateParams, str, int]:
        if not isinstance(body, dict):
            raise OpenAIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.served_model:
            raise OpenAIError(404, f"The model `{model}` does not exist.", "NotFoundError")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise OpenAIError(400, "prompt must be one non-empty string (this stand-in takes one prompt per request)")
        n, max_tokens = body.get("n", 1), body.get("max_tokens", 16)
        if type(n) is not int or n < 1 or type(max_tokens) is not int or max_tokens < 1:
            raise OpenAIError(400, f"n and max_tokens must be integers >= 1, got n={n!r}, max_tokens={max_tokens!r}")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise OpenAIError(400, "stop must be a string or a list of strings")
        temperature = float(body.get("temperature", 1.0))
        seed = body.get("seed")
        # vLLM's and trtllm-serve's default: the tokenizer's special tokens (BOS) are added unless the
        # request says otherwise (the run's client always says, as add_BOS: audit S1).
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise OpenAIError(400, f"add_special_tokens must be true or false, got {special!r}")
        params = GenerateParams(
            add_BOS=special,
            tokens_to_generate=max_tokens, temperature=temperature if temperature > 0 else 1.0,
            greedy=temperature == 0, top_k=int(body.get("top_k") or 0), top_p=float(body.get("top_p", 1.0)),
            repetition_penalty=1.0, min_tokens_to_generate=int(body.get("min_tokens") or 0),
            end_strings=tuple(stop), random_seed=int(seed) % 2**24 if isinstance(seed, int) else None)
        return params, prompt, n


def _choice_seed(seed: int, index: int) -> int:
    if index == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{index}".encode()).digest()[:4], "big") % 2**24


# --------------------------------------------------------------------------- HTTP glue

OPENAI_GET = ("/health", "/v1/models", "/sim/stats")


def serve_openai(handler, method: str) -> bool:
    """Answer `handler`'s request if it is an OpenAI route (GET above, POST /v1/completions);
    False leaves it to the NeMo routes. Replies keep the connection open, as uvicorn does."""
    completions: CompletionsService | None = handler.server.completions
    route = handler._route()
    if completions is None or (method, route) not in {*(("GET", p) for p in OPENAI_GET), ("POST", "/v1/completions")}:
        return False
    body = handler._read_body()
    if route == "/health":
        handler._send(200, b"", keep_alive=True)
    elif route == "/v1/models":
        handler._send(200, _json(completions.models()), keep_alive=True)
    elif route == "/sim/stats":
        handler._send(200, _json(completions.batcher.stats() if completions.batcher else {}), keep_alive=True)
    else:
        handler._send(*_complete(handler.server.service, completions, body), keep_alive=True)
    return True


def _complete(service, completions: CompletionsService, raw: bytes) -> tuple[int, bytes]:
    import json

    number = service.arrive()  # the crash fault fires here, as on /generate
    faults = service.faults
    try:
        body = json.loads(raw)
        prompt = body.get("prompt") if isinstance(body, dict) else None
        faults.hang_if_due(number, "never answers")
        if faults.throttle_every is not None and number % faults.throttle_every == 0:
            status = 429 if number // faults.throttle_every % 2 == 0 else 503  # both mean busy: try again later
            kind = "RateLimitError" if status == 429 else "ServiceUnavailableError"
            return status, _json(OpenAIError(status, "busy (--fault-throttle-every)", kind).body(completions.error_shape))
        if faults.fails([prompt]):
            return 500, _json(OpenAIError(500, "injected failure", "InternalServerError").body(completions.error_shape))
        if faults.rejects([prompt]):
            raise OpenAIError(400, FAULT_REJECT_MESSAGE)
        if service.extra_latency_s:
            time.sleep(service.extra_latency_s)
        return 200, _json(completions.complete(body))
    except ValueError:
        return 400, _json(OpenAIError(400, "the body is not JSON").body(completions.error_shape))
    except OpenAIError as exc:
        return exc.status, _json(exc.body(completions.error_shape))


def _json(obj: object) -> bytes:
    import json

    return json.dumps(obj).encode()
