"""States: the small objects that mark a file done, and the one rule for trusting them.

A part has its state (`part-NNNNN.jsonl.state.json`), a part's judgement its judge state, a shard's
kept and filtered files their verdict. Every state names the sha256 of each file it describes, and
one rule holds for all of them:

- a state is trusted only while every file it describes still has the sha256 it names
  (`describes`, `read_described`): a kill between a file rewritten and its new state leaves the old
  state naming the old bytes, so the step is redone, never the old state believed;
- a rerun removes a state before it rewrites a file the state describes (`invalidate`), so no state
  ever vouches for bytes that are being replaced.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from infra.run.layout import state_name
from infra.run.manifest import PartInfo
from infra.storage import OutputStore


def describes(store: OutputStore, files: Mapping[str, str | None]) -> bool:
    """Does each file (name -> the sha256 its state names) hold those very bytes?"""
    return all(sha and store.sha256(name) == sha for name, sha in files.items())


def read_described(store: OutputStore, name: str, sha256: str | None) -> bytes | None:
    """The file's bytes when they are the ones its state names (hashed as read); else None."""
    data = store.read_bytes(name)
    if data is None or not sha256 or hashlib.sha256(data).hexdigest() != sha256:
        return None
    return data


def invalidate(store: OutputStore, state: str) -> None:
    """Remove a state before the files it describes are rewritten: a kill in between then
    leaves a step to redo, not a state naming bytes that are gone."""
    store.delete(state)


def published_part(store: OutputStore, part: str, chash: str) -> PartInfo | None:
    """The part's state when the part is done under config `chash`: its state readable, and the
    part file holding the bytes the state names. None otherwise (the shard is to generate)."""
    data = store.read_bytes(state_name(part))
    if data is None:
        return None
    try:
        info = PartInfo.from_json(data)
    except (ValueError, TypeError, KeyError):
        return None  # unreadable: redone, as a missing state is
    if info.name != part or info.config_hash != chash or not describes(store, {part: info.sha256}):
        return None
    return info
