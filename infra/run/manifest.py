"""The run's manifest and the config hash that decides whether published parts can be reused.

`manifest.json` is written last and names every part with its record count and sha256. Each
published part also gets a small state object (`part-NNNNN.jsonl.state.json`) written right
after it, so a rerun knows which shards are done even when the run never reached its manifest.
The state also holds the shard's own facts (tokens generated, seconds, the replica, Slurm job
and flow run that made it), so the manifest of a run finished over several invocations is
built from all of them, not from the last invocation alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, fields

from infra.run.layout import INPUT_REJECTS, MANIFEST, REJECTS, rejects_name, state_name
from infra.storage import OutputStore

FORMAT_VERSION = 1


def config_hash(config: dict) -> str:
    """Stable hash of everything that changes what a part contains."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def diff_config(old: dict, new: dict, prefix: str = "") -> list[str]:
    """One line per differing field; a field both sides hold as an object is compared field by
    field, so the line names what changed inside it (`served_model.path: … -> …`)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_config(a, b, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


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
    # The shard's own facts; None (or empty) in states written before they were kept.
    generated_tokens: int | None = None
    seconds: float | None = None  # from its first request to its part published
    started_at: float | None = None  # wall clock
    finished_at: float | None = None
    replica: int | None = None
    job_ids: list[str] = field(default_factory=list)  # the replica's Slurm job(s)
    invocation: str | None = None  # the flow run that made it
    prompt_match: dict[str, int] = field(default_factory=dict)  # records by how their echo was stripped
    # The earlier tries whose results, kept in the shard's spill (a kill, a lost server, a task retry), are
    # rows of this part, first first: each one's invocation, replica, Slurm jobs and results (rows or rejects).
    kept_from: list[dict] = field(default_factory=list)

    def state_name(self) -> str:
        return state_name(self.name)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_dict(cls, data: dict) -> "PartInfo":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, data: bytes) -> "PartInfo":
        return cls.from_dict(json.loads(data))


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
    # Planned successor jobs (time limits): count, late, overlap GPU-hours, largest gap, one entry each.
    rollovers: dict = field(default_factory=dict)
    token_counter: str | None = None  # what counted the prompts (its identity is in `config`)
    prompt_match: dict[str, int] = field(default_factory=dict)  # written records by prompt_match, all parts
    # The judge/filter stage (infra.recipes.curate): records kept, dropped per reason, the kept parts.
    curation: dict | None = None
    # `model` is the served model's label; this is what answered (infra/engines/served_model.py) and the name sent.
    served_model: dict | None = None
    requested_model: str | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        raw = json.loads(data)
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in raw.items() if k in known}, "parts": [PartInfo.from_dict(p) for p in raw["parts"]]})


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def run_job_ids(earlier: Manifest | None, parts: list[PartInfo], now: list[str]) -> list[str]:
    """Every Slurm job of the run: the earlier manifest's, then the parts' and this invocation's, first
    submitted first. Part order is not submission order (shards in flight finish in any order, a part
    resumed on a replacement job names both), and Slurm numbers its jobs in submission order."""
    later = _unique([*(j for p in parts for j in p.job_ids), *now])
    return _unique([*(earlier.slurm_job_ids if earlier else []), *sorted(later, key=_submitted)])


def _submitted(job_id: str) -> float:
    """A Slurm job id's number ("1868", an array task's "1868_3", a het job's "1868+0"); ids of no
    number keep their order after those."""
    digits = re.match(r"\d+", job_id)
    return int(digits.group()) if digits else math.inf


def run_replicas(earlier: Manifest | None, parts: list[PartInfo], now: list[dict], invocation: str) -> list[dict]:
    """One entry per replica of every invocation: the earlier manifest's, then replicas known only
    from the parts they made (an invocation that never reached its manifest: no busy fraction or
    GPU-hours, which only the invocation itself measured), then this invocation's."""
    before = list(earlier.replicas) if earlier else []
    current = [{**r, "invocation": invocation} for r in now]
    known = {(e.get("invocation"), e.get("replica")) for e in before + current}
    made: dict[tuple, list[PartInfo]] = {}
    for p in parts:
        if p.invocation is not None and (p.invocation, p.replica) not in known:
            made.setdefault((p.invocation, p.replica), []).append(p)
    recovered = [{"invocation": inv, "replica": rep, "job_ids": _unique(j for p in ps for j in p.job_ids),
                  "records": sum(p.records for p in ps), "shards": len(ps),
                  "busy_fraction": None, "gpu_hours": None, "held_s": None, "idle_after_last_shard_s": None}
                 for (inv, rep), ps in made.items()]
    return before + recovered + current


def prompt_matches(parts: list[PartInfo]) -> dict[str, int]:
    """Written records by how the prompt was found in the reply (exact, heuristic), over every part."""
    total: Counter[str] = Counter()
    for part in parts:
        total.update(part.prompt_match)
    return dict(sorted(total.items()))


def generated_tokens(parts: list[PartInfo]) -> int:
    """Tokens generated for the run's parts (a part from before states kept them counts 0)."""
    return sum(p.generated_tokens or 0 for p in parts)


def merge_rejects(store: OutputStore, parts: list[PartInfo], input_rejected: int) -> int:
    """rejects.jsonl = the plan's input rejects + every part's server rejects. Returns how many
    records the server refused."""
    refused = sum(p.rejected for p in parts)
    if refused or input_rejected:
        chunks = [store.read_bytes(INPUT_REJECTS) or b""] if input_rejected else []
        chunks += [store.read_bytes(rejects_name(p.name)) or b"" for p in parts if p.rejected]
        store.write_bytes(REJECTS, b"".join(chunks))
    return refused


def earlier_manifest(store: OutputStore, chash: str) -> Manifest | None:
    """The manifest an earlier invocation of this run published under the same config, if any."""
    data = store.read_bytes(MANIFEST)
    if data is None:
        return None
    try:
        manifest = Manifest.from_json(data)
    except (ValueError, KeyError, TypeError):  # unreadable: rebuilt from the states
        return None
    return manifest if manifest.config_hash == chash else None
