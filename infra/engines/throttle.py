"""Back-pressure on the OpenAI path: what a client does when the server answers 429 or 503.

Both mean "busy", not "gone" (vLLM and trtllm-serve behind a gateway or a rate limiter answer them
while healthy): the one request is sent again after a wait, and the replica keeps fewer requests in
flight for a while. Two pieces, both pure apart from the clock and a lock:

- `Backoff`: how long to wait before the next try (the server's `Retry-After` when it sends one,
  else exponential with jitter), within a count of tries and a deadline per request;
- `InFlightLimit`: an adaptive cap on the requests a replica has open (AIMD, as TCP's window):
  halved on a throttled reply, at most once per round (a reply to a request sent before the last
  cut does not cut again), and grown by one after a round of answered requests, up to the
  configured `max_in_flight`.
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from infra.deadline import Deadline
from infra.errors import ServerHung, ServerLost

log = logging.getLogger(__name__)

THROTTLE_STATUS = {429, 503}


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Retry-After in seconds: delta-seconds or an HTTP-date (RFC 9110 §10.2.3); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class Backoff:
    tries: int = 10  # sends of one request in all, the first included
    wait_s: float = 600.0  # the deadline for one request's tries and waits together
    first_s: float = 0.5
    max_s: float = 30.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random | None = None) -> float:
        """The wait after the `attempt`-th throttled reply: the server's Retry-After when given (it
        knows when it will have room), else exponential with jitter (requests throttled together
        do not come back together)."""
        if retry_after is not None:
            return retry_after
        ceiling = min(self.max_s, self.first_s * 2 ** (attempt - 1))
        return ceiling * (0.5 + 0.5 * (rng or random).random())


class InFlightLimit:
    """The requests one replica may have open now: at most `ceiling`, fewer while it throttles.
    `slot()` waits for room; that wait ends when a slot frees, and no request holds one longer
    than its read timeout, so a wait in which none frees for `stall_s` means a hung server."""

    def __init__(self, ceiling: int, where: str):
        self.ceiling = self.limit = ceiling
        self.where = where
        self.in_flight = 0
        self.round = 0  # how many cuts so far: a reply cuts only if its request was sent after the last one
        self._answered = 0
        self._released = 0  # slots freed so far: a waiter that saw one free is not stalled
        self._closed = threading.Event()
        self._cond = threading.Condition()

    @contextmanager
    def slot(self, stall_s: float) -> Iterator[int]:
        """Hold one slot while a request is open; yields the round it was sent in."""
        with self._cond:
            quiet = Deadline(stall_s)
            while self.in_flight >= self.limit and not self._closed.is_set():
                if quiet.expired():
                    raise ServerHung(f"{self.where}: no request of this replica finished within {stall_s:.0f} s "
                                     f"({self.in_flight} open, limit {self.limit}); release and restart it.")
                freed = self._released
                self._cond.wait(quiet.remaining())
                if self._released != freed:
                    quiet = Deadline(stall_s)
            if self._closed.is_set():
                raise ServerLost(f"{self.where}: the replica was released before this request was sent; "
                                 "its shard goes back to the queue.")
            self.in_flight += 1
            sent_in = self.round
        try:
            yield sent_in
        finally:
            with self._cond:
                self.in_flight -= 1
                self._released += 1
                self._cond.notify()

    def answered(self) -> None:
        """One request answered without throttling: after a round of them (`limit` answers), one more slot."""
        with self._cond:
            if self.limit >= self.ceiling:
                return
            self._answered += 1
            if self._answered >= self.limit:
                self._answered = 0
                self.limit += 1
                self._cond.notify()

    def throttled(self, sent_in: int, status: int) -> None:
        """A 429/503 to a request sent in round `sent_in`: halve the limit, once per round."""
        with self._cond:
            if sent_in != self.round or self.limit <= 1:
                return
            self.round += 1
            self._answered = 0
            first = self.limit == self.ceiling  # a warning when throttling starts, not at every cut after it
            self.limit = max(1, self.limit // 2)
            log.log(logging.WARNING if first else logging.INFO,
                    "%s answered HTTP %d (busy): %d requests in flight at most now (of %d), growing back as it answers",
                    self.where, status, self.limit, self.ceiling)

    def close(self) -> None:
        """No slot is given any more: every waiter raises ServerLost (the replica was released)."""
        with self._cond:
            self._closed.set()
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def wait_out(self, seconds: float) -> bool:
        """Sleep a throttle's wait; True (at once) when the replica is released meanwhile."""
        return self._closed.wait(seconds)
