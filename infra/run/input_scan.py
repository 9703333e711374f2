"""What the plan's read of the input found, kept in the run directory so that a rerun on the very
same input does not read it again (issue 28: the re-scan was most of a re-filter's time).

The plan reads every line of the input: hashes it (its sha256 is in the config hash), renders and
counts each prompt, and finds the unusable lines and duplicate ids. After such a full scan, once
the run has accepted its config, the plan writes `input-scan.json`: what it found (records,
unusable lines, duplicate lines, format, sha256), the pin of what it read
(infra/storage/input_pin.py), and the hash of its key: the run's fingerprint and what else
decides a line's fate. A later plan takes those findings instead of reading the input only when
every one of these holds, and otherwise scans in full and writes the file afresh:

- the key is the one this plan's parameters give (another template, counter, context length,
  prompt field, `on_bad_input`, ... is another key);
- the input, looked at without reading it (a stat; an S3 HEAD), is the object the scan read
  (`InputPin.same_object`): locally the same device, inode, size, mtime and ctime, on S3 the same
  VersionId or, unversioned, the same ETag and size;
- locally, the file's mtime and ctime are older than the scan's last check of it by more than
  `RACY_NS`: a write of the same size inside the same timestamp tick as the scan would keep every
  field, so a file changed that close to its scan is read again (git's "racily clean" rule);
- with unusable lines, `input-rejects.jsonl` still holds the bytes the scan wrote.

The generation pass reads the input against the same pin as before (`LocalInput.verify`, S3
GETs pinned by version or ETag), so a change after this check still stops the run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass

from infra.prompting.dataset import BadLine, Format
from infra.run.layout import INPUT_REJECTS, INPUT_SCAN
from infra.run.manifest import config_hash
from infra.storage.input_pin import InputPin
from infra.storage.jsonl import read_state

log = logging.getLogger(__name__)
SCAN_VERSION = 1  # raise when what the scan decides about a line changes, so no older finding is reused
# File timestamps move in ticks of the kernel's coarse clock (a few ms); seconds leave room for a
# network file system whose clock is a little off this host's.
RACY_NS = 2_000_000_000


@dataclass
class Scan:
    records: int
    bad: int
    shown: list[BadLine]
    input_sha256: str
    format: Format
    duplicate_lines: frozenset[int]
    pin: InputPin
    checked_at_ns: int | None = None  # wall clock just before the scan's last check of the input
    reused: bool = False  # found in input-scan.json: the input was not read


def key_hash(fingerprint: dict, cfg) -> str:
    """What a scan's findings depend on: the run's fingerprint (the input's sha256 included) and the
    parameters outside it that decide a line's fate."""
    return config_hash({"version": SCAN_VERSION, "fingerprint": fingerprint, "on_bad_input": cfg.on_bad_input,
                        "prompt_chars": cfg.recipe.max_prompt_chars, "prompt_field": cfg.input_prompt_field})


def record(store, scan: Scan, key: str) -> None:
    """Keep a full scan's findings, after the run accepted its config and wrote its rejects."""
    state = {"key": key, "pin": dataclasses.asdict(scan.pin), "checked_at_ns": scan.checked_at_ns,
             "records": scan.records, "bad": scan.bad, "input_sha256": scan.input_sha256, "format": scan.format,
             "duplicate_lines": sorted(scan.duplicate_lines),
             "rejects_sha256": store.sha256(INPUT_REJECTS) if scan.bad else None}
    store.write_bytes(INPUT_SCAN, json.dumps(state).encode())


def recorded(store, key_of, look) -> Scan | None:
    """The last full scan's findings when they hold for this input and these parameters (the
    module's rules), else None. `key_of(input_sha256, format)`: this plan's key; `look()`: the
    input's pin now, read from its metadata alone."""
    state = read_state(store, INPUT_SCAN)
    try:
        pin = InputPin(**state["pin"])
        scan = Scan(int(state["records"]), int(state["bad"]), [], state["input_sha256"], state["format"],
                    frozenset(int(n) for n in state["duplicate_lines"]), pin, state["checked_at_ns"], reused=True)
    except (KeyError, TypeError, ValueError):
        return None  # none yet, or unreadable: scanned in full
    if pin.sha256 != scan.input_sha256 or state.get("key") != key_of(scan.input_sha256, scan.format):
        return None
    now = look()
    if not pin.same_object(now):
        log.info("input %s changed since the run's last scan of it: read in full", pin.uri)
        return None
    if not (pin.etag or pin.version_id) and not _settled(pin, scan.checked_at_ns):
        return None
    if scan.bad and store.sha256(INPUT_REJECTS) != state.get("rejects_sha256"):
        return None
    return scan


def _settled(pin: InputPin, checked_at_ns: int | None) -> bool:
    """Was the file last changed long enough before the scan's last check that a later write could
    not have left its mtime and ctime as they were?"""
    if checked_at_ns is None or pin.mtime_ns is None or pin.ctime_ns is None:
        return False
    return max(pin.mtime_ns, pin.ctime_ns) < checked_at_ns - RACY_NS
