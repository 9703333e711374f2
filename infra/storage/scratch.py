"""The record ids a run's plan has seen, kept on disk so memory stays flat in the input's size.

The duplicate-id check must remember every id of the input, given or derived. In memory that grows with the
input: a Python `set` of one int per id cost 76 MB per million ids (`make bench`), a packed
hash table 16–24 MB. Here each id's 64-bit digest is the primary key of a table in a
throw-away SQLite file (the standard library's), with a page cache of `cache_mb`: the process
holds the cache, the operating system's page cache holds the rest. A million ids make a 15 MB
file and cost ≈ 2–4 s on this 2-core machine, in the plan only (the generation pass is handed
the duplicate lines the plan found).

Digests are BLAKE2b, not `hash()`: the same id gives the same digest in every process. Two
different ids share a digest with probability about n²/2⁶⁵ (3·10⁻⁸ for a million ids); such a
pair would be reported as a duplicate.
"""

from __future__ import annotations

import sqlite3
import tempfile
from hashlib import blake2b
from pathlib import Path


def digest(record_id: str) -> int:
    """A stable signed 64-bit digest of an id (SQLite's INTEGER range)."""
    data = record_id.encode("utf-8", "surrogatepass")
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "little", signed=True)


def scratch_db(prefix: str, table: str, cache_mb: int = 8,
               directory: str | None = None) -> tuple[tempfile.TemporaryDirectory, sqlite3.Connection]:
    """A throw-away SQLite file holding one table, with a page cache of `cache_mb`; in a transaction."""
    tmp = tempfile.TemporaryDirectory(prefix=prefix, dir=directory)
    db = sqlite3.connect(Path(tmp.name) / "scratch.sqlite", isolation_level=None, check_same_thread=False)
    # A scratch file: no journal, no fsync; one transaction that is never committed to matter.
    for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size=-{cache_mb * 1024}", "temp_store=FILE"):
        db.execute(f"PRAGMA {pragma}")
    db.execute(f"CREATE TABLE {table}")
    db.execute("BEGIN")
    return tmp, db


class IdSet:
    def __init__(self, cache_mb: int = 8, directory: str | None = None) -> None:
        self._dir, self._db = scratch_db("nsdg-ids-", "ids (digest INTEGER PRIMARY KEY)", cache_mb, directory)
        self._cursor = self._db.cursor()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, record_id: str) -> bool:
        """Remember `record_id`; False if it was already there."""
        self._cursor.execute("INSERT OR IGNORE INTO ids VALUES (?)", (digest(record_id),))
        added = self._cursor.rowcount == 1
        self._count += added
        return added

    def close(self) -> None:
        """Drop the file. Idempotent."""
        if self._db is not None:
            self._db.close()
            self._db = None
            self._dir.cleanup()

    def __enter__(self) -> "IdSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
