"""Ctrl-C, SIGTERM and SIGHUP during `nemotron-sdg run`: the first one stops the run, as an
exception in the main thread, so the flow crashes the way Prefect handles (its crash hook releases the
server and the run's lease) and the CLI says how to resume. Any later one is only noted: a second
Ctrl-C in the middle of that teardown would cut the release short.

SIGINT raises KeyboardInterrupt, as Python's default does. SIGTERM and SIGHUP raise Prefect's
TerminationSignal, as Prefect's own SIGTERM handler does while a flow runs (it takes over SIGTERM for
the flow and gives it back after): Python's default for them ends the process at once, releasing
nothing and leaving the temporary API server behind."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager

from prefect.exceptions import TerminationSignal

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def signal_of(exc: BaseException) -> int | None:
    """The signal an exception stands for, or None."""
    if isinstance(exc, KeyboardInterrupt):
        return signal.SIGINT
    if isinstance(exc, TerminationSignal):
        return exc.signal
    return None


class FirstSignalStops:
    """While entered: the first of SIGNALS raises in the main thread, later ones print `note`."""

    def __init__(self, note: str):
        self.note = note
        self.received: int | None = None

    def seen(self, exc: BaseException) -> int | None:
        """Record an exception that stands for a signal (Prefect's handler raised it, not ours): a
        later signal is then only noted. Returns the signal."""
        signum = signal_of(exc)
        if signum is not None and self.received is None:
            self.received = signum
        if signum is not None:
            # Ours again: Prefect's own handler, which raised this, may have left the default in
            # place, and a second Ctrl-C would then kill the process in the middle of its teardown.
            for s in SIGNALS:
                signal.signal(s, self._handle)
        return signum

    def exiting(self) -> None:
        """The run is stopped and the process about to exit: later signals are ignored outright.
        Python's finalization puts a Python-level handler back to the default, and a second Ctrl-C
        landing there would kill the process (exit -2) after its resume line; an ignored signal
        stays ignored through it."""
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            # os.write: print() from a handler can find stderr's buffer in use by the interrupted code.
            os.write(2, f"{signal.Signals(signum).name}: {self.note}\n".encode())
            return
        self.received = signum
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise TerminationSignal(signal=signum)

    @contextmanager
    def installed(self):
        """After a signal, the handlers stay: what is left is the process's exit (atexit, the task
        threads' join), where Python's default would print a KeyboardInterrupt traceback."""
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        finally:
            if self.received is None:
                for s, handler in previous.items():
                    signal.signal(s, handler)
