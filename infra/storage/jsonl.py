"""JSON-lines objects of a run directory: a part (or any JSONL file) written atomically and
published with its sha256, and rows and state objects read back.

A part is written to a temp file in the store's staging directory, synced, then handed to the
store, which renames (local) or uploads (S3) it under its name: a half-written file never has a
part's name, so it is never mistaken for one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from json.encoder import c_make_encoder, encode_basestring
from pathlib import Path

from infra.storage import OutputStore
from infra.run.layout import TEMP_SUFFIX, temp_prefix


def _line_encoder():
    """JSONEncoder(ensure_ascii=False).encode, less its per-call Python: each call of `encode` makes a
    new C encoder (and a float formatter) before it encodes anything (~1.5 µs of a part row's ~7 µs,
    issue 28). One C encoder, made once with the same arguments, writes the same bytes; without a
    markers dict it keeps no state between calls, so threads share it, and an object that contains
    itself (which no row does) raises RecursionError rather than ValueError."""
    if c_make_encoder is None:  # an interpreter without the C accelerator
        return json.JSONEncoder(ensure_ascii=False).encode
    plain = json.JSONEncoder(ensure_ascii=False)
    one_shot = c_make_encoder(None, plain.default, encode_basestring, None, plain.key_separator,
                              plain.item_separator, plain.sort_keys, plain.skipkeys, plain.allow_nan)
    return lambda obj: "".join(one_shot(obj, 0))


_encode = _line_encoder()


def json_line(obj: object) -> bytes:
    """`obj` as one line of a JSONL file this product writes: non-ASCII kept as it is, UTF-8, "\n" ended."""
    return (_encode(obj) + "\n").encode("utf-8")


def write_lines(lines: Iterable[dict | bytes], staging: Path, name: str) -> tuple[Path, str, int, int]:
    """Write JSON lines to a temp file in `staging`; return (path, sha256, lines, bytes). A bytes item is a
    line already encoded, its newline included (a part's own line, copied).
    A half-written file never has the part's name, so it is never mistaken for a part."""
    staging.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=staging, prefix=temp_prefix(name), suffix=TEMP_SUFFIX)
    os.fchmod(fd, 0o666 & ~_umask())  # the published file's mode: mkstemp's 0600 would hide it from the team
    sha, count, size = hashlib.sha256(), 0, 0
    try:
        with os.fdopen(fd, "wb") as f:
            for obj in lines:
                data = obj if isinstance(obj, bytes) else json_line(obj)
                f.write(data)
                sha.update(data)
                count, size = count + 1, size + len(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp), sha.hexdigest(), count, size


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would race other threads)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o077  # unknown: stay private, as mkstemp would


def publish(store: OutputStore, name: str, lines: Iterable[dict | bytes]) -> tuple[str, int, int]:
    """`lines` as the JSONL object `name` of the store; returns (sha256, lines, bytes)."""
    path, sha, count, size = write_lines(lines, store.staging_dir(), name)
    try:
        store.publish_file(name, path, sha)
    finally:
        path.unlink(missing_ok=True)
    return sha, count, size


def read_rows(data: bytes | None) -> list[dict]:
    """A JSONL object's rows (blank lines skipped); [] for a missing one (None)."""
    return [json.loads(line) for line in (data or b"").splitlines() if line.strip()]


def read_state(store: OutputStore, name: str) -> dict:
    """A stage's state object; {} when missing or unreadable (the stage is then redone)."""
    data = store.read_bytes(name)
    try:
        state = json.loads(data) if data is not None else {}
    except ValueError:
        return {}
    return state if isinstance(state, dict) else {}
