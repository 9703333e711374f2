"""One way to run a callable every N seconds on a daemon thread, until stopped: the Slurm job's
heartbeat file, the run lease's renewal, the watch on a server's parent process.

The callable is one beat. It returns False to end the thread (a lease another run took over is
not renewed again); anything else keeps it going. An exception of the types the owner expects
(`transient`: a storage hiccup, a file that could not be written) is logged as a warning on the
owner's logger and the beat is tried again at the next interval; any other exception is a bug,
logged with its traceback, and ends the thread (as an uncaught exception in a thread would).
The thread is a daemon: a process that exits without stopping it is not held up by it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    """`beat()` every `interval_s` seconds on a daemon thread named `name`, from `start()` until
    `stop()` or until a beat returns False. `immediately`: the first beat at start, not after one
    interval. `what` names the beat in the warning logged when it raises one of `transient`."""

    def __init__(self, name: str, beat: Callable[[], bool | None], interval_s: float, *, what: str,
                 transient: tuple[type[BaseException], ...] = (), immediately: bool = False,
                 logger: logging.Logger = log):
        self.name, self.interval_s, self.what = name, interval_s, what
        self._beat, self._transient, self._immediately, self._log = beat, transient, immediately, logger
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def stop(self, deadline_s: float = 30.0) -> None:
        """No beat after this one; wait at most `deadline_s` for a beat under way to end (never
        from the thread itself; 0: do not wait)."""
        self._stop.set()
        if (deadline_s > 0 and self._thread.is_alive() and self._thread is not threading.current_thread()):
            self._thread.join(timeout=deadline_s)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        if not self._immediately and self._stop.wait(self.interval_s):
            return
        while not self._stop.is_set():
            try:
                if self._beat() is False:
                    return
            except self._transient as exc:
                self._log.warning("%s: %s", self.what, exc)
            except Exception:
                self._log.exception("%s: unexpected error; %s stops", self.what, self.name)
                return
            if self._stop.wait(self.interval_s):
                return
