"""Exact counts of a SentencePiece BPE whose pieces never span a space, word by word, from a
cache of the words seen (the counter that infra/prompting/tokens.py's `SentencePieceFile` uses
for a non-normalizing model), shared with forked workers (infra/prompting/count_workers.py)."""

from __future__ import annotations

import itertools
import os
import re
import threading
from collections.abc import Callable, Sequence

from infra.prompting import count_workers


class WordCounts:
    """Exact counts of a SentencePiece BPE that can never merge across a space, word by word.

    BPE merges only into pieces of the vocabulary; where no piece holds "▁" (an escaped space)
    right after another character than "▁", no merge crosses the start of a run of spaces, and
    merges on either side of it do not interact (whitespace-only pieces, "▁▁▁▁", stay possible).
    So without normalization (spaces escaped, nothing removed, no dummy prefix) a text's count is
    its first word's plus that of each "▁…▁word" that a run of spaces starts, which a cache of the
    words already seen answers: prompts repeat their words, so most are never encoded again
    (realistic English-like prompts: a third of the CPU of encoding them whole). The condition is
    read from the model (`splits_at_spaces`, infra/prompting/tokenizer_files.py); any other model encodes whole texts."""

    CACHED_WORD_CHARS = 64  # longer words are encoded, not kept
    CACHE_WORDS = 200_000  # then the cache starts afresh: memory stays flat
    FEW_TO_ENCODE = 32  # fewer texts than this are encoded one by one (_encode)

    def __init__(self, sp):
        self._sp = sp
        self._cache = _Seen()
        self._firsts: dict[str, int] = {"": 0}  # texts' first words (no space before them): their counts
        self._lock = threading.Lock()  # the counter is shared (token_counter's cache): one batch at a time
        self._bytes, self._tokens = 4, 1  # bytes per token seen so far: how far to read before the bound may do
        self._workers: count_workers.CountWorkers | None | bool = None  # False: never (closed, broken, a worker)
        self._learned: dict[str, int] | None = None  # with workers: the words encoded here since last asked
        self._threads: int | None = None  # encoding threads (None: every usable core's)

    def counts(self, texts: Sequence[str], cap: int | None = None) -> list[int]:
        """Exact counts; with a `cap`, exact above it, and at or below it possibly a bound (see _within).
        A batch with enough text is shared with worker processes (infra/prompting/count_workers.py)."""
        if cap is None:
            texts = [t.replace("\u2581", " ") for t in texts]
            with self._lock:
                return self._counts(texts)
        return self.counts_begun(texts, cap)()

    def counts_begun(self, texts: Sequence[str], cap: int) -> Callable[[], list[int]]:
        """`counts(texts, cap)` begun now: the worker processes (if any) start on the batch, and
        the call returned gives the counts (this process counting what no worker has begun)."""
        # U+2581 in the input is what a space becomes, so it cuts words as a space does.
        texts = [t.replace("\u2581", " ") for t in texts]
        with self._lock:
            workers = self._workers_for(texts)
            begun = workers.begin(texts, cap) if workers is not None else None

        def result() -> list[int]:
            with self._lock:
                if begun is None:
                    return self._within(texts, cap)
                out = begun.result(self._within)
                if self._workers is workers and not workers.open:
                    self._workers = False  # broken: counted here from now on
                return out
        return result

    def _workers_for(self, texts: list[str]) -> "count_workers.CountWorkers | None":
        """The pool, started on the first batch that pays for it; None: count here."""
        if (self._workers is False or len(texts) < 2
                or sum(map(len, texts)) < count_workers.PARALLEL_MIN_CHARS or count_workers.usable_cores() < 2):
            return None
        if self._workers is None:
            if not count_workers.can_fork():
                self._workers = False
                return None
            n = min(count_workers.usable_cores() - 1, count_workers.MAX_WORKERS)
            self._learned, self._threads = {}, 1  # the processes already share the cores out
            self._workers = count_workers.CountWorkers.start(self, n) or False
        return self._workers or None

    def forked(self) -> "WordCounts":
        """This counter as a worker keeps it after the fork: its own lock (the parent's copy was
        held while it forked), and no pool of its own."""
        self._lock, self._workers, self._learned, self._threads = threading.Lock(), False, {}, 1
        return self

    def within_here(self, texts: list[str], cap: int) -> list[int]:
        return self._within(texts, cap)

    def learned(self) -> dict[str, int]:
        """The words this process encoded since last asked (for the other processes' caches)."""
        words, self._learned = self._learned or {}, {} if self._learned is not None else None
        return words

    def learn(self, words: dict[str, int]) -> None:
        """Words another process encoded with the same model: the counts this one would find."""
        self._cache.update(words)
        if len(self._cache) > self.CACHE_WORDS:
            self._cache.clear()

    def close(self) -> None:
        with self._lock:
            workers, self._workers = self._workers, False
        if isinstance(workers, count_workers.CountWorkers):
            workers.close()

    def _within(self, texts: list[str], cap: int) -> list[int]:
        """Each text read from its start only until what is counted plus the rest's UTF-8 bytes
        (the byte bound, which holds for any part of the text) is at most `cap`.

        A cut just before a run of spaces splits the count exactly (no merge crosses it), so a
        text's count is its counted head's plus its rest's, and the rest's bytes bound the latter.
        A text that does not fit is read to its end: above `cap` the count is exact. Each round
        reads the part that, at the bytes per token seen so far, brings the bound down to `cap`;
        a text the guess falls short for goes round again (realistic prompts: about half their
        text read, in one or two rounds, within 1% of the least that proves them)."""
        out = [0] * len(texts)
        rest = list(texts)
        active = list(range(len(texts)))
        while active:
            ratio = max(self._bytes / self._tokens, 1.25)
            heads, cut_at = [], []
            for i in active:
                r = rest[i]
                over = out[i] + utf8_len(r) - cap  # > 0: the bound does not settle it yet
                # Reading n bytes lowers the bound by about n * (1 - 1/ratio): read that much (more
                # would be read for nothing; a text it falls short for takes a second, short round).
                cut = _run_start_from(r, int(over * ratio / (ratio - 1)) + 4)
                heads.append(r[:cut])
                cut_at.append(cut)
            counted = self._counts(heads)
            self._bytes += sum(map(utf8_len, heads))
            self._tokens += sum(counted)
            still = []
            for i, n, cut in zip(active, counted, cut_at):
                out[i] += n
                rest[i] = r = rest[i][cut:]
                if r:
                    bound = out[i] + utf8_len(r)
                    if bound <= cap:
                        out[i] = bound
                    else:
                        still.append(i)
            active = still
        return out

    def _counts(self, texts: Sequence[str]) -> list[int]:
        words = [_words(t) for t in texts]
        cache = self._cache
        sums, unseen = [], []
        for ws in words:  # one pass over the words; those not seen yet counted 0 and noted
            cache.unseen = noted = []
            sums.append(sum(map(cache.__getitem__, itertools.islice(ws, 1, None))))
            unseen.append(noted)
        new = list({w for noted in unseen for w in noted})
        # A text's first word has no space before it: its count is the word's own, kept apart (a
        # head cut at a run of spaces has "" first: 0). Most texts begin with a word seen before.
        firsts = self._firsts
        new_firsts = list({ws[0] for ws in words if ws[0] not in firsts})
        encoded = self._encode(["\u2581" + w for w in new] + new_firsts)
        fresh = dict(zip(new, map(len, encoded)))
        firsts.update(zip(new_firsts, map(len, encoded[len(new):])))
        out = [n + sum(map(fresh.__getitem__, noted)) + firsts[ws[0]] for n, noted, ws in zip(sums, unseen, words)]
        for w in new_firsts:
            if len(w) > self.CACHED_WORD_CHARS:
                del firsts[w]
        kept = {w: n for w, n in fresh.items() if len(w) <= self.CACHED_WORD_CHARS}
        cache.update(kept)
        if self._learned is not None:
            self._learned.update(kept)
        if len(cache) > self.CACHE_WORDS:
            cache.clear()
        if len(firsts) > self.CACHE_WORDS:
            firsts.clear()
            firsts[""] = 0
        return out

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids. A list call costs ~60 us however short (sentencepiece's batch set-up), one
        text ~2 us: a few texts (a worker's small piece, a late round's handful of new words) one by one."""
        if len(texts) < self.FEW_TO_ENCODE:
            return [self._sp.encode(t) for t in texts]
        return self._sp.encode(texts, num_threads=self._threads or threads())


class _Seen(dict):
    """Words' counts; a word not in it counts 0 and is noted in `unseen`, to be encoded after."""

    unseen: list[str]

    def __missing__(self, word: str) -> int:
        self.unseen.append(word)
        return 0


_RUN_START = re.compile("(?<! ) ")  # a space that starts a run of spaces


def _words(text: str) -> list[str]:
    """`text` cut before each run of spaces (the runs' spaces but the first stay with the word)."""
    return text.split(" ") if "  " not in text else _RUN_START.split(text)


def _run_start_from(text: str, at: int) -> int:
    """The first index >= `at` (and > 0) where a run of spaces starts, else len(text)."""
    if at >= len(text):
        return len(text)
    m = _RUN_START.search(text, max(at, 1))  # the look-behind sees text[at - 1]: a run is not cut inside
    return m.start() if m else len(text)


def utf8_len(text: str) -> int:
    """len(text.encode("utf-8")), without encoding ASCII text (CPython knows a string is ASCII)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def threads() -> int:
    """Encoding threads: the CPUs this process may use, at most 8 (a login node is shared)."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
