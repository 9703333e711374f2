"""The run's manifest and the config hash that decides whether published parts can be reused.

`manifest.json` is written last and names every part with its record count and sha256. Each
published part also gets a small state object (`part-NNNNN.jsonl.state.json`) written right
after it, so a rerun knows which shards are done even when the run never reached its manifest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
INPUT_REJECTS = "input-rejects.jsonl"  # the plan's; merged into rejects.jsonl at the end
FORMAT_VERSION = 1


def config_hash(config: dict) -> str:
    """Stable hash of everything that changes what a part contains."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def diff_config(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


@dataclass(frozen=True)
class PartInfo:
    name: str
    shard: int
    records: int
    sha256: str
    bytes: int
    config_hash: str
    first_line: int
    last_line: int
    rejected: int = 0  # records the server refused; listed in part-NNNNN.jsonl.rejects.jsonl

    def state_name(self) -> str:
        return state_name(self.name)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "PartInfo":
        return cls(**json.loads(data))


def state_name(part: str) -> str:
    return f"{part}.state.json"


def rejects_name(part: str) -> str:
    return f"{part}.rejects.jsonl"


@dataclass
class Manifest:
    run_id: str
    config_hash: str
    config: dict
    model: str
    profile: str
    input_uri: str
    records_in: int
    records_written: int
    records_rejected: int
    parts: list[PartInfo]
    slurm_job_ids: list[str] = field(default_factory=list)
    timings_s: dict = field(default_factory=dict)
    throughput: dict = field(default_factory=dict)
    rejects: str | None = None
    server_restarts: int = 0
    replicas: list[dict] = field(default_factory=list)  # per replica: records, busy fraction, GPU-hours
    format_version: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()
