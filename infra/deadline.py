"""One deadline helper, used by every wait in the project.

A `Deadline` is a point on the monotonic clock. `poll_until` is the only polling loop: it
calls `check()` until it returns something other than None, sleeping `interval` between calls,
and raises `DeadlineExceeded` naming what it waited for and the last thing it saw.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from infra.errors import DeadlineExceeded

T = TypeVar("T")


@dataclass
class Deadline:
    seconds: float
    started: float = field(default_factory=time.monotonic)

    @property
    def at(self) -> float:
        return self.started + self.seconds

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def cap(self, timeout: float) -> float:
        """The smaller of `timeout` and what is left, so no single step outlives the deadline."""
        return min(timeout, self.remaining())


def poll_until(
    check: Callable[[], T | None],
    *,
    deadline: Deadline,
    interval: float,
    what: str,
    describe_last: Callable[[], str] | None = None,
) -> T:
    """Call `check` until it returns a value, or raise DeadlineExceeded when time runs out.

    `check` may raise to end the wait early (a job that died, a process that exited).
    """
    while True:
        result = check()
        if result is not None:
            return result
        if deadline.expired():
            seen = f" Last seen: {describe_last()}." if describe_last else ""
            raise DeadlineExceeded(
                f"Gave up waiting for {what} after {deadline.seconds:.0f} s.{seen} "
                "Raise the timeout if this is expected, otherwise look at the log tail above."
            )
        time.sleep(min(interval, max(deadline.remaining(), 0.01)))
