"""Worker processes that count word by word beside the caller.

Word-by-word counting (`WordCounts` in infra/prompting/word_counts.py) is `str.split` and a dict
look-up per word: Python work that holds the GIL, so threads cannot spread it. Forked processes
can: each starts with a copy of the caller's word cache and the loaded model (nothing to load,
nothing pickled but the texts, their counts and the words each side learned since: a word is
encoded once, not once per process). A batch is cut into pieces of about PIECE_CHARS characters,
all handed to the workers when the batch is started (`start`); when the caller asks for the counts
(`Counting.result`) it takes back the pieces no worker has begun, from the tail, one at a time, and
counts them itself, while the workers go on from the head (each piece is claimed once, in memory
shared since the fork: a worker skips a piece the caller took; futures are never cancelled, since
Python 3.11's pool, broken with a cancelled future queued, fails in its own thread and leaves the
queue's feeder thread blocked for good). So the shares balance themselves, on an
idle or a busy machine, and a caller that starts a batch before it reads the next one (the plan's
scan) has the workers count while it parses: a 2-core machine's second core is busy the whole scan,
not only while both count.

Started once per counter, on the first batch with enough text to pay for the transfer, and only
where `fork` exists and this process may use more than one core; closed with the counter
(`close`), at interpreter exit (concurrent.futures joins its workers), and a worker whose parent
died (kill -9) exits within a second on its own. A broken pool (a worker killed) is dropped and
the batch counted here, serially: the counts never depend on whether workers ran.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

log = logging.getLogger(__name__)

PARALLEL_MIN_CHARS = 256_000  # below this, a batch costs ~10 ms to count: not worth the transfer
MAX_WORKERS = 7  # with the caller, 8 processes at most, as the encoder's threads (a login node is shared)
PARENT_POLL_S = 1.0
# A share counts at ~50 ns a character; its deadline is ~20x that, plus a start: a worker that
# hangs (a lock held in another thread at fork) costs one batch counted again here, never the run.
SHARE_DEADLINE_S = 30.0
SHARE_DEADLINE_S_PER_CHAR = 1e-6


def usable_cores() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


def can_fork() -> bool:
    return hasattr(os, "sched_getaffinity") and "fork" in multiprocessing.get_all_start_methods()


_WORKER_STATE = None  # in a worker: the forked copy of the caller's counter
_CLAIMS = None  # in a worker: the claims shared with the caller


class _Claims:
    """Which process counts a piece: its id written into a slot of shared memory, under a lock,
    by whichever process comes first (ids grow; a slot is reused only SLOTS pieces later)."""

    SLOTS = 1 << 14
    LOCK_S = 5.0  # a worker killed inside the lock's few instructions: the pool counts as broken

    def __init__(self, ctx):
        self._ids = ctx.Array("q", self.SLOTS, lock=False)
        self._lock = ctx.Lock()

    def take(self, piece: int) -> bool:
        if not self._lock.acquire(timeout=self.LOCK_S):
            raise TimeoutError(f"a counting worker held the piece lock for {self.LOCK_S:.0f} s")
        try:
            slot = piece % self.SLOTS
            if self._ids[slot] == piece:
                return False
            self._ids[slot] = piece
            return True
        finally:
            self._lock.release()


def _adopt(state, parent: int, claims: _Claims) -> None:
    """A worker's start: take the forked counter as its own, and exit when the parent is gone."""
    global _WORKER_STATE, _CLAIMS
    _WORKER_STATE, _CLAIMS = state.forked(), claims
    # The parent's handlers (the CLI's Ctrl-C, a flow run's SIGTERM) are not a worker's: a Ctrl-C
    # reaches the whole process group, and the parent stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="count-worker-parent").start()


def _exit_with_parent(parent: int) -> None:
    # Orphaned (the parent killed), a worker would wait on its queue forever: re-parented, it leaves.
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(0)


def _count_share(piece: int, texts: list[str], cap: int, words: dict[str, int]) -> tuple[list[int] | None, dict[str, int]]:
    """A piece's counts (None: the caller took it), and the words this worker encoded for them
    (to the caller, who passes them on)."""
    _WORKER_STATE.learn(words)
    if not _CLAIMS.take(piece):
        return None, {}
    return _WORKER_STATE.within_here(texts, cap), _WORKER_STATE.learned()


def _chars(texts: Sequence[str]) -> int:
    return sum(map(len, texts))


PIECE_CHARS = 100_000  # ~4 ms of counting: the caller takes back at most ~2 pieces too few per batch
MAX_PIECES = 64


def _pieces(texts: Sequence[str], pieces: int) -> list[tuple[int, int]]:
    """`texts` cut into `pieces` consecutive ranges of about equal characters."""
    total, bounds, chars = _chars(texts), [0], 0
    for i, t in enumerate(texts):
        chars += len(t)
        if chars * pieces >= total * len(bounds) and len(bounds) < pieces and i + 1 < len(texts):
            bounds.append(i + 1)
    bounds.append(len(texts))
    return list(zip(bounds, bounds[1:]))


class CountWorkers:
    """A forked pool of `workers` processes for one counter; `state` must offer `forked()` (the
    copy a worker keeps), `within_here(texts, cap)` (the serial count), and `learned()` (the words
    it encoded since last asked) and `learn(words)` (another process's)."""

    def __init__(self, state, workers: int):
        self.workers = workers
        self._state = state
        self._to_send: dict[str, int] = {}  # words the workers have not been told yet
        ctx = multiprocessing.get_context("fork")
        self._claims, self._pieces = _Claims(ctx), 0
        self._pool: ProcessPoolExecutor | None = ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_adopt, initargs=(state, os.getpid(), self._claims))
        # Forked now (the first task forks them all), with this process's objects frozen out of the
        # collector: a worker's collections then never walk (and so copy) the parent's memory.
        gc.freeze()
        try:
            self._pool.submit(int).result()
        finally:
            gc.unfreeze()

    @classmethod
    def start(cls, state, workers: int) -> "CountWorkers | None":
        """The pool, or None where it cannot start (fork refused: out of memory, process limit)."""
        try:
            return cls(state, workers)
        except (OSError, BrokenProcessPool) as exc:
            log.warning("token counting workers did not start (%s); counting in this process", exc)
            return None

    def within(self, texts: Sequence[str], cap: int, here: Callable[[list[str], int], list[int]]) -> list[int]:
        """`here(texts, cap)` for every text, the work shared with the workers; None-safe after close."""
        return self.begin(texts, cap).result(here)

    def begin(self, texts: Sequence[str], cap: int) -> "Counting":
        """Every piece of the batch handed to the workers now; `result` collects (and counts here
        the pieces no worker has begun)."""
        texts = list(texts)
        n = min(MAX_PIECES, max(2 * (self.workers + 1), _chars(texts) // PIECE_CHARS), len(texts))
        ranges = _pieces(texts, n)
        self._to_send.update(self._state.learned())
        words, self._to_send = self._to_send, {}
        first, self._pieces = self._pieces + 1, self._pieces + len(ranges)
        try:
            futures = [self._pool.submit(_count_share, first + i, texts[a:b], cap, words if not i else {})
                       for i, (a, b) in enumerate(ranges)]
        except (BrokenProcessPool, RuntimeError, AttributeError) as exc:  # shut down meanwhile (None: closed)
            self._broken(exc)
            futures = []
        return Counting(self, texts, cap, ranges, futures, first)

    def _taken(self, words: dict[str, int]) -> None:
        """A worker's new words: this process's cache, and (with several workers) the others'."""
        self._state.learn(words)
        if self.workers > 1:
            self._to_send.update(words)

    @property
    def open(self) -> bool:
        return self._pool is not None

    def pids(self) -> list[int]:
        """The workers' process ids (for tests and the benchmark's CPU accounting)."""
        return list(getattr(self._pool, "_processes", None) or {})

    def _broken(self, exc: BaseException, kill: bool = False) -> None:
        log.warning("token counting workers stopped (%s); counting in this process from now on", exc)
        if kill:  # a hung worker would never finish its share: shutdown(wait=True) would wait with it
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.close()

    def close(self) -> None:
        """Stop the workers and wait for them (each finishes the share it holds)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class Counting:
    """A batch handed to the workers: `result(here)` its counts, in order."""

    def __init__(self, workers: CountWorkers, texts: list[str], cap: int, ranges, futures, first: int):
        self._workers, self._texts, self._cap, self._ranges, self._futures = workers, texts, cap, ranges, futures
        self._first = first  # the first piece's id

    def result(self, here: Callable[[list[str], int], list[int]]) -> list[int]:
        texts, cap, ranges, futures = self._texts, self._cap, self._ranges, self._futures
        if not futures:  # the pool broke or closed when the batch began
            return here(texts, cap)
        out, counted = [0] * len(texts), [False] * len(ranges)

        def count_here(i: int) -> None:
            a, b = ranges[i]
            out[a:b], counted[i] = here(texts[a:b], cap), True

        try:
            # From the tail, one piece at a time, while no worker has claimed it: the workers
            # meanwhile go on from the head.
            left = len(futures)
            while left and self._workers._claims.take(self._first + left - 1):
                left -= 1
                count_here(left)
            # Every piece waited for, those taken here too (a worker skips them at once): a worker
            # that died or hangs is found in the batch that met it, and no piece stays queued.
            deadline = time.monotonic() + SHARE_DEADLINE_S + SHARE_DEADLINE_S_PER_CHAR * _chars(texts)
            for i, future in enumerate(futures):
                counts, words = future.result(timeout=max(0.0, deadline - time.monotonic()))
                self._workers._taken(words)
                if counts is not None:
                    out[ranges[i][0]:ranges[i][1]], counted[i] = counts, True
        except (BrokenProcessPool, CancelledError, TimeoutError) as exc:  # TimeoutError: the futures' too (3.11)
            hung = isinstance(exc, TimeoutError)
            self._workers._broken(TimeoutError(f"no counts from a worker {SHARE_DEADLINE_S:.0f} s past their share's "
                                               f"deadline ({exc})") if hung else exc, kill=hung)
            for i, future in enumerate(futures):
                if not counted[i] and future.done() and not future.cancelled() and future.exception() is None:
                    counts = future.result()[0]
                    if counts is not None:
                        out[ranges[i][0]:ranges[i][1]], counted[i] = counts, True
        for i in range(len(ranges)):
            if not counted[i]:  # the workers broke, or a piece no process claimed
                count_here(i)
        return out
