"""Worker processes that count word by word beside the caller.

Word-by-word counting (`_WordCounts` in infra/prompting/tokens.py) is `str.split` and a dict
look-up per word: Python work that holds the GIL, so threads cannot spread it. Forked processes
can: each starts with a copy of the caller's word cache and the loaded model (nothing to load,
nothing pickled but the texts and their counts) and keeps its own cache from then on. A batch's
texts are dealt round-robin: every worker takes a share, the caller counts one itself.

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
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
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


def _adopt(state, parent: int) -> None:
    """A worker's start: take the forked counter as its own, and exit when the parent is gone."""
    global _WORKER_STATE
    _WORKER_STATE = state.forked()
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


def _count_share(texts: list[str], cap: int) -> list[int]:
    return _WORKER_STATE.within_here(texts, cap)


def _chars(texts: Sequence[str]) -> int:
    return sum(map(len, texts))


class CountWorkers:
    """A forked pool of `workers` processes for one counter; `state` must offer `forked()` (the
    copy a worker keeps) and `within_here(texts, cap)` (the serial count)."""

    def __init__(self, state, workers: int):
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("fork"),
            initializer=_adopt, initargs=(state, os.getpid()))
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
        k = self.workers + 1
        shares = [list(texts[i::k]) for i in range(k)]
        try:
            futures = [self._pool.submit(_count_share, share, cap) for share in shares[1:]]
        except (BrokenProcessPool, RuntimeError) as exc:  # RuntimeError: shut down meanwhile
            self._broken(exc)
            return here(list(texts), cap)
        mine = here(shares[0], cap)
        deadline = time.monotonic() + SHARE_DEADLINE_S + SHARE_DEADLINE_S_PER_CHAR * max(map(_chars, shares[1:]))
        try:
            theirs = [f.result(timeout=max(0.0, deadline - time.monotonic())) for f in futures]
        except (BrokenProcessPool, FutureTimeout) as exc:
            self._broken(exc if not isinstance(exc, FutureTimeout) else
                         TimeoutError(f"no counts from a worker {SHARE_DEADLINE_S:.0f} s past their share's deadline"),
                         kill=isinstance(exc, FutureTimeout))
            theirs = [here(share, cap) for share in shares[1:]]
        out = [0] * len(texts)
        for i, counts in enumerate([mine] + theirs):
            out[i::k] = counts
        return out

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
