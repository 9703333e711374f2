"""Taking an flock with a deadline: a blocking flock waits forever on a holder that is stopped
(SIGSTOP, a frozen node) or hung inside its step."""

from __future__ import annotations

import fcntl
import time

from infra.deadline import Deadline
from infra.errors import StorageError

# A compare-and-write holds its lock for milliseconds; a lock held this long belongs to a process
# stopped or hung inside the step.
LOCK_WAIT_S = 30.0


def flock_within(lock, where: str, wait_s: float = LOCK_WAIT_S) -> None:
    """An exclusive flock on the open file `lock`, or StorageError after `wait_s` naming `where`."""
    deadline = Deadline(wait_s)
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if deadline.expired():
                raise StorageError(
                    f"{where}: another process has held its write lock for {wait_s:.0f} s, so it is stopped or hung "
                    "inside a write (find it with `fuser` on the lock file beside it); resume or end it, then retry"
                ) from None
            time.sleep(0.05)
