"""PUT /generate without HTTP: validation, one generation at a time, injected faults, a stats file.

- One generation at a time behind a FIFO lock: later requests wait, sockets open, in
  arrival order. Validation happens before the lock, as in TGS (nemo_validation.py).
- Fault switches (for the fault suite) are a `FaultPlan`; they count the OpenAI side's requests
  too (openai_api.py shares the service's arrivals and lock).
- With a stats file, each generation appends one JSON line (start, end, batch, tokens) for benchmarks,
  and each prompt's first characters (`heads`): tests tell which requests a rerun asked again.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from infra.local_server.nemo_generation import Engine, GenerateParams, build_reply
from infra.local_server.nemo_validation import Rejection, validate_request

log = logging.getLogger(__name__)

FAULT_REJECT_MESSAGE = "request rejected by --fault-reject-on (fault injection)"


@dataclass(frozen=True)
class FaultPlan:
    """Failures to inject. Request numbers count every PUT /generate on arrival, from 1."""

    crash_after: int | None = None  # request crash_after+1 kills the process (os._exit(1))
    hang_after: int | None = None  # request hang_after+1 takes the lock and never answers
    fail_on: str | None = None  # a prompt containing this -> 500, as an exception in generation
    reject_on: str | None = None  # a prompt containing this -> 200 + JSON string
    throttle_every: int | None = None  # every N-th request -> 503, the next such one 429, ... (OpenAI side only)
    # With a marker, the crash and hang faults fire once across restarts: the first to fire
    # creates the file, and a server started while it exists injects neither.
    once_marker: Path | None = None

    def armed(self) -> "FaultPlan":
        if self.once_marker is not None and self.once_marker.exists():
            return FaultPlan(fail_on=self.fail_on, reject_on=self.reject_on, throttle_every=self.throttle_every)
        return self

    def fired(self, what: str) -> None:
        if self.once_marker is not None:
            self.once_marker.write_text(f"{what} at {time.time()}\n")

    def hang_if_due(self, number: int, where: str) -> None:
        """Request `number` never returns past hang_after (both APIs)."""
        if self.hang_after is not None and number > self.hang_after:
            log.error("fault injection: request %d %s (--fault-hang-after %d)", number, where, self.hang_after)
            self.fired("hang")
            threading.Event().wait()

    def fails(self, prompts: list) -> bool:
        """A prompt names fail_on: the request fails as an error inside generation would (500)."""
        return self.fail_on is not None and _mentions(prompts, self.fail_on)

    def rejects(self, prompts: list) -> bool:
        """A prompt names reject_on: the request is refused (NeMo: 200 + a string; OpenAI: 400)."""
        return self.reject_on is not None and _mentions(prompts, self.reject_on)


class InjectedFailure(RuntimeError):
    """Raised inside generation by --fault-500-on."""


class FifoLock:
    """A lock granted in arrival order, so queued requests are served FIFO.

    The holder hands the lock straight to the next waiter's own gate: one wake-up per release.
    (A ticket lock on one Condition with notify_all woke every waiter at every release: with the
    256 connections an OpenAI client keeps open, that cost the server ~2 ms of CPU a request, 5x
    its work, and made the zero-cost ceiling measure this stand-in's scheduling, not the client.)
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._busy = False
        self._waiting: collections.deque[threading.Lock] = collections.deque()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._mutex:
            gate = None
            if self._busy:
                gate = threading.Lock()
                gate.acquire()
                self._waiting.append(gate)
            else:
                self._busy = True
        if gate is not None:
            gate.acquire()  # released by the holder before us: the lock is ours, still marked busy
        try:
            yield
        finally:
            with self._mutex:
                if self._waiting:
                    self._waiting.popleft().release()
                else:
                    self._busy = False


class GenerateService:
    """PUT /generate without HTTP: validation, the lock, faults, stats."""

    def __init__(
        self,
        engine: Engine,
        *,
        faults: FaultPlan = FaultPlan(),
        extra_latency_s: float = 0.0,
        stats_file: Path | None = None,
    ):
        self.engine = engine
        self.faults = faults
        self.extra_latency_s = extra_latency_s
        self.stats_file = stats_file
        self._lock = FifoLock()
        self._arrivals = itertools.count(1)

    def arrive(self) -> int:
        """Count a request as it arrives; the crash fault fires here, before any work."""
        number = next(self._arrivals)
        crash_after = self.faults.crash_after
        if crash_after is not None and number > crash_after:
            log.error("fault injection: crashing on request %d (--fault-crash-after %d)", number, crash_after)
            self.faults.fired("crash")
            os._exit(1)  # no cleanup, no reply: as abrupt as a killed rank
        return number

    def handle(self, number: int, body: object) -> tuple[int, object]:
        """Return (status, JSON payload). Exceptions mean 500, as flask_restful makes them."""
        outcome = validate_request(body)  # type: ignore[arg-type]  # a non-dict raises -> 500
        if isinstance(outcome, Rejection):
            log.info("request %d rejected (%d): %s", number, outcome.status, outcome.message)
            return outcome.status, outcome.message
        sentences, params = outcome
        if self.faults.rejects(sentences):
            return 200, FAULT_REJECT_MESSAGE
        with self._lock.held():
            return 200, self._generate(number, sentences, params)

    def _generate(self, number: int, sentences: list, params: GenerateParams) -> dict:
        self.faults.hang_if_due(number, "holds the lock forever")
        started = time.time()
        if self.extra_latency_s:
            time.sleep(self.extra_latency_s)
        if self.faults.fails(sentences):
            raise InjectedFailure(f"--fault-500-on {self.faults.fail_on!r} matched request {number}")
        if params.all_probs and not params.compute_logprob:
            # NeMo fills full_logprob only inside the compute_logprob branch and fails without it.
            raise ValueError("all_probs needs compute_logprob")
        generation = self.engine.generate(sentences, params)
        reply = build_reply(self.engine, generation, params)
        self._record(started, time.time(), generation, sentences)
        # The seed names a seeded request (infra/prompting/samples.py): tests tell which batches were asked again.
        log.info("request %d: %d sentences, %d tokens generated, seed %s", number, len(sentences),
                 sum(generation.generated_lengths), params.random_seed)
        return reply

    def _record(self, started: float, ended: float, generation, sentences: list = ()) -> None:
        if self.stats_file is None:
            return
        line = {
            "start": started,
            "end": ended,
            "batch": len(generation.rows),
            "prompt_tokens": sum(generation.prompt_lengths),
            "generated_tokens": sum(generation.generated_lengths),
            "heads": [s[:HEAD_CHARS] for s in sentences if isinstance(s, str)],
        }
        # Called under the generation lock, so lines never interleave.
        with open(self.stats_file, "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")


HEAD_CHARS = 48  # of each prompt in the stats file: enough to tell a template's prompts, small beside a batch


def _mentions(sentences: list, needle: str) -> bool:
    return any(isinstance(s, str) and needle in s for s in sentences)
