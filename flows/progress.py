"""A run's progress for whoever runs the flow in this process: `nemotron-sdg run` shows a bar on a
terminal and plain periodic lines elsewhere. The Prefect UI has its own progress artifact; this
is the terminal's view, and costs nothing when nobody listens (deployments, tests)."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Protocol, TextIO


class ProgressListener(Protocol):
    def planned(self, total: int, done: int) -> None: ...
    def advanced(self, records: int, restarts: int, rollovers: int = 0) -> None: ...
    def close(self) -> None: ...


# Process-wide on purpose: the CLI listens to the flow it runs in this process, and the flow's
# parameters are its UI form, so a listener cannot be handed to it as one.
_listeners: list[ProgressListener] = []
_lock = threading.Lock()


@contextmanager
def listening(listener: ProgressListener):
    with _lock:
        _listeners.append(listener)
    try:
        yield listener
    finally:
        with _lock:
            _listeners.remove(listener)
        listener.close()


def planned(total: int, done: int) -> None:
    """`total` records the run will account for (written or refused), `done` already published."""
    for listener in list(_listeners):
        listener.planned(total, done)


def advanced(records: int, restarts: int, rollovers: int = 0) -> None:
    """A shard published `records` records (written + refused); `restarts` servers started anew after a
    failure so far, `rollovers` planned successor jobs (time limits)."""
    for listener in list(_listeners):
        listener.advanced(records, restarts, rollovers)


class _Counts:
    def __init__(self) -> None:
        self.total = self.done = self.restarts = self.rollovers = 0
        self.start_done, self.started = 0, time.monotonic()

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> float | None:
        rate = self.rate()
        return (self.total - self.done) / rate if rate > 0 else None


class PlainLines(_Counts):
    """One line per `every_s` at most (and the last one), for logs and pipes."""

    def __init__(self, stream: TextIO = sys.stderr, every_s: float = 10.0):
        super().__init__()
        self.stream, self.every_s, self._last = stream, every_s, 0.0

    def planned(self, total: int, done: int) -> None:
        self.total, self.done, self.start_done, self.started = total, done, done, time.monotonic()
        self._line()

    def advanced(self, records: int, restarts: int, rollovers: int = 0) -> None:
        self.done, self.restarts, self.rollovers = self.done + records, restarts, rollovers
        if self.done >= self.total or time.monotonic() - self._last >= self.every_s:
            self._line()

    def _line(self) -> None:
        self._last = time.monotonic()
        share = 100.0 * self.done / self.total if self.total else 100.0
        eta = self.eta_s()
        print(f"progress: {self.done}/{self.total} records ({share:.0f} %), {self.rate():.1f} records/s, "
              f"ETA {'—' if eta is None else f'{eta:.0f} s'}, server restarts {self.restarts}"
              + (f", rollovers {self.rollovers}" if self.rollovers else ""),
              file=self.stream, flush=True)

    def close(self) -> None:
        pass


class Bar(_Counts):
    """rich's progress bar (rich comes with Prefect): records done of total, records/s, ETA, restarts."""

    def __init__(self, stream: TextIO = sys.stderr):
        super().__init__()
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("records"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.1f} records/s"), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("restarts {task.fields[restarts]}"), TextColumn("rollovers {task.fields[rollovers]}"),
            console=Console(file=stream, force_terminal=True), transient=False,
        )
        self._task = None

    def planned(self, total: int, done: int) -> None:
        self.total, self.done, self.start_done, self.started = total, done, done, time.monotonic()
        self._progress.start()
        self._task = self._progress.add_task("run", total=total, completed=done, rate=0.0, restarts=0, rollovers=0)

    def advanced(self, records: int, restarts: int, rollovers: int = 0) -> None:
        self.done, self.restarts, self.rollovers = self.done + records, restarts, rollovers
        if self._task is not None:
            self._progress.update(self._task, completed=self.done, rate=self.rate(), restarts=restarts,
                                  rollovers=rollovers)

    def close(self) -> None:
        if self._task is not None:
            self._progress.stop()


def for_stream(stream: TextIO = sys.stderr) -> ProgressListener:
    return Bar(stream) if stream.isatty() else PlainLines(stream)
