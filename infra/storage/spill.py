"""A shard's finished requests, kept on local disk until its part is published, so that a kill
costs the requests in flight and not the whole shard (issue 28).

A spill is one JSON-lines file in the store's staging directory (`layout.spill_name`): the run
directory for a local output, `{work}/staging/{bucket}/[_{prefix}.{hash}/]{run_id}/` for S3. Its first line is a
header naming what the results belong to (the config hash, the part's location, the shard's
records); every later line is one finished request's results, by their position in the shard,
appended with one write. A written line outlives a kill of the process (it is in the kernel's page
cache); it is synced to the disk at most `SYNC_EVERY_S` after it is written (and when the try
ends), so a crash of the host loses at most that last second's requests, which are asked again.
One fsync per request cost the openai-completions flow over half its rate (one request per record:
10 k fsyncs at 10 k records, each a few ms, in the thread that collects the shard's results).

Read back by the next try (a task retry, or a resume after kill -9):

- a header that is not this try's (another config, another output location, another shard
  make-up) means the file is discarded whole: never a result generated under other parameters;
  its `plan` alone (the batch plan's settings, not in the config hash) is not compared here:
  `spill.plan` is the spill's, and the caller decides (infra/prompting/plan_identity.py);
- a last line without its newline, or one that does not parse, is a request torn by the kill: it
  and anything after it are cut off, and that request is asked again;
- the positions of the lines kept are the results not asked again;
- a try's first line also names who made it: the jobs it ran on (its Slurm job ids, when it has any)
  and its invocation and replica (`by`), so a part finished by a later job, or by a later invocation
  of the run, still names every job and invocation that made its rows (`spill.kept_jobs`, `spill.kept_by`).

A try holds an flock on its spill: a second writer (another try of the same shard still running,
or another run whose staging path is the same) finds it held and keeps no spill rather than mix
its lines in. The spill is removed once its part is published (and any left over when the run's
last part is in, `discard_spills`). Pure file I/O: what a result is, the caller's codec says.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from infra.run.layout import SPILLS, spill_name
from infra.storage.jsonl import json_line

log = logging.getLogger(__name__)
SYNC_EVERY_S = 1.0  # the most a host crash loses of a shard's finished requests (a kill -9 loses none)
# The run's lease is checked before a try's first append and then at most this often: a check reads
# the lease object (~35 µs of CPU and a few syscalls per request, a tenth of nemo-generate's per-request
# cost on a fast server). Lines kept in that second by a try whose run lost its lease are results of this
# shard under this header, which its flock keeps from anyone else meanwhile; the part itself is never
# published by it (every store write checks the lease: infra/run/lease.py FencedStore).
FENCE_EVERY_S = 1.0


class Spill:
    """`with Spill.open(staging, part, header) as spill:` the results an earlier try kept
    (`spill.kept`: position -> the JSON it appended), and `spill.append(...)` for this try's."""

    def __init__(self, path: Path, fd: int, kept: dict[int, object], fence: Callable[[], None] | None = None,
                 header: dict | None = None, plan: object = None, jobs: tuple[str, ...] = (),
                 kept_by: tuple[dict, ...] = (), by: dict | None = None):
        self.path, self._fd, self.kept = path, fd, kept
        # The tries whose results are kept, first first, as a part's state names them (`kept_from`: each one's
        # invocation, replica, Slurm job_ids and count of results); this try's jobs and maker go on its first line.
        self.kept_by, self._jobs, self._by, self._named = kept_by, tuple(jobs), by, False
        self._header, self.plan = header, plan  # plan: the header's "plan" as the spill holds it
        self._fence = fence  # the run's lease check: a try that lost its run writes nothing more here either
        self._lock = threading.Lock()  # appends are whole lines, whichever thread reports a request
        self._synced, self._unsynced = time.monotonic(), False
        self._fenced: float | None = None  # when the fence last passed (None: before the first append)

    @property
    def kept_jobs(self) -> tuple[str, ...]:
        """The Slurm jobs of the tries whose results are kept, first first."""
        return tuple(dict.fromkeys(j for t in self.kept_by for j in t["job_ids"]))

    @classmethod
    def open(cls, staging: Path, part: str, header: dict, fence: Callable[[], None] | None = None,
             jobs: tuple[str, ...] | list[str] = (), by: dict | None = None) -> "Spill":
        """`jobs` and `by` name this try on its first line: its Slurm jobs, and its maker (the
        invocation and replica, as a part's state names them)."""
        path = Path(staging) / spill_name(part)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        if not _lock(fd):
            log.warning("%s is held by another writer (another try of this shard, or a run with the same staging "
                        "directory): this try keeps no spill, so a kill now loses its whole shard", path)
            return cls(path, -1, {}, fence, header, header.get("plan"), jobs, by=by)
        try:
            kept, good_end, plan, kept_by = _read(fd, header, path)
            if good_end == 0:  # new, or another try's header: start over with this one
                _start(fd, header)
            else:
                os.ftruncate(fd, good_end)  # a torn tail goes: the next line starts on a line of its own
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, kept, fence, header, plan, jobs, kept_by, by)

    def restart(self) -> None:
        """Its results dropped and its header this try's (the shard is generated again from nothing)."""
        with self._lock:
            self.kept, self.plan, self.kept_by, self._named = {}, self._header.get("plan"), (), False
            if self._fd >= 0:
                _start(self._fd, self._header)

    def append(self, results: list[tuple[int, object]]) -> None:
        """One finished request's results, by position, durable once this returns."""
        if not results:
            return
        with self._lock:
            if self._fd < 0:
                return  # closed: a try that already ended keeps nothing more
            if self._fence is not None and (self._fenced is None or time.monotonic() - self._fenced >= FENCE_EVERY_S):
                self._fence()  # LeaseLost: another run owns the shard now (its part, and this file's fate)
                self._fenced = time.monotonic()
            line = {"results": [[p, r] for p, r in results]}
            if not self._named:  # this try's first line: who made the results from here on ({}: not known)
                if self._jobs:
                    line["jobs"] = list(self._jobs)
                line["by"], self._named = self._by or {}, True
            try:
                _write_line(self._fd, os.lseek(self._fd, 0, os.SEEK_END), line)
                self._unsynced = True
                if time.monotonic() - self._synced >= SYNC_EVERY_S:
                    self._sync()
            except OSError as exc:  # a full disk: the shard goes on, its spill stops here (a cut line is a torn tail)
                log.warning("%s: cannot keep a request's results (%s); this try keeps no more of them, so a kill "
                            "from now on loses the requests after it", self.path, exc)
                os.close(self._fd)
                self._fd = -1

    def _sync(self) -> None:
        os.fsync(self._fd)
        self._synced, self._unsynced = time.monotonic(), False

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                try:
                    if self._unsynced:  # a try that ends unpublished leaves its next try every line durable
                        self._sync()
                except OSError as exc:
                    log.warning("%s: cannot sync its last requests (%s); a host crash now may lose them", self.path, exc)
                os.close(self._fd)
                self._fd = -1

    def remove(self) -> None:
        """The part is published: nothing here is needed again."""
        with self._lock:
            if self._fd >= 0:
                self.path.unlink(missing_ok=True)  # while the flock is held: never another writer's file
                self._unsynced = False  # nothing left to keep
        self.close()

    def __enter__(self) -> "Spill":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_line(fd: int, at: int, obj: object) -> None:
    data = json_line(obj)
    written = os.pwrite(fd, data, at)
    while written < len(data):  # a short write (a signal, a full disk's last block): the rest, or an OSError
        written += os.pwrite(fd, data[written:], at + written)


def _start(fd: int, header: dict) -> None:
    os.ftruncate(fd, 0)
    _write_line(fd, 0, header)
    os.fsync(fd)


def _read(fd: int, header: dict, path: Path) -> tuple[dict[int, object], int, object, tuple[dict, ...]]:
    """(position -> result kept, the byte length of the lines to keep, the spill's plan, the tries that
    made the kept results: each one's invocation and replica (None where its lines do not say), Slurm
    `job_ids` and `results`, the count of its results kept); 0 when the header, its plan aside, is not `header` (the file is to start over)."""
    size, chunks = os.fstat(fd).st_size, []
    while (got := sum(map(len, chunks))) < size:  # one pread returns at most ~2 GiB
        chunk = os.pread(fd, size - got, got)
        if not chunk:
            break
        chunks.append(chunk)
    data = b"".join(chunks)
    size = len(data)
    lines = data.split(b"\n")
    try:
        found = json.loads(lines[0]) if len(lines) > 1 else None
    except ValueError:
        found = None
    if not isinstance(found, dict) or {**found, "plan": None} != {**header, "plan": None}:
        if data:
            log.info("discarding %s: it was written for %s, and this try is %s", path, _brief(found), _brief(header))
        return {}, 0, header.get("plan"), ()
    kept: dict[int, object] = {}
    tries: list[dict] = []
    end = len(lines[0]) + 1
    for line in lines[1:-1]:  # the last item follows the last newline: empty, or a torn line
        try:
            entry = json.loads(line)
            parsed = {int(p): r for p, r in entry["results"]}
            named = [str(j) for j in entry.get("jobs", ())]
            by = entry["by"] if isinstance(entry.get("by"), dict) else {}
            maker = {"invocation": by.get("invocation"), "replica": by.get("replica")}
        except (ValueError, KeyError, TypeError, AttributeError):
            break  # torn (or damaged): this request and any after it are asked again
        if "by" in entry or named or not tries:  # a try's first line (or lines written before a try's first line named it)
            tries.append({**maker, "job_ids": named, "results": 0})
        kept.update(parsed)
        tries[-1]["results"] += len(parsed)
        end += len(line) + 1
    if end < size:
        log.info("%s: %d byte(s) of a request cut off by the kill ignored; that request is asked again", path, size - end)
    return kept, end, found.get("plan"), tuple(tries)


def _brief(header: object) -> str:
    if not isinstance(header, dict):
        return "an unreadable header"
    return f"config {header.get('config_hash')} at {header.get('part')}"


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def discard_spill(staging: Path, part: str) -> None:
    """The part is published already (by an earlier try, killed before it removed its spill)."""
    _discard(Path(staging) / spill_name(part))


def discard_spills(staging: Path) -> None:
    """Every part of the run is in: no spill is of use any more (one held by a writer is left to it)."""
    for path in Path(staging).glob(SPILLS):
        _discard(path)


def _discard(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if _lock(fd):
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)
