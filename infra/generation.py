"""One shard: batches of prompts through the server, records written to a part file, the part
published atomically with its checksum and a state object that marks the shard done."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from infra.dataset import RESERVED_FIELDS, Record, Shard
from infra.errors import ServerLost, TransientServerError
from infra.manifest import PartInfo
from infra.nemo_client import GeneratedText, NemoClient
from infra.sampling import SamplingParams
from infra.storage import OutputStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardJob:
    """Everything a shard needs besides its records; shared by every shard of a run."""

    run_id: str
    model: str
    config_hash: str
    sampling: SamplingParams
    batch_size: int


@dataclass(frozen=True)
class ShardResult:
    part: PartInfo
    generated_tokens: int
    seconds: float
    upload_seconds: float


def batches(records: list[Record], size: int) -> Iterator[list[Record]]:
    for i in range(0, len(records), size):
        yield records[i:i + size]


def output_record(rec: Record, gen: GeneratedText, job: ShardJob, shard: int) -> dict:
    # The input's own fields pass through; ours win a name clash and theirs keep an input_ prefix.
    passthrough = {(f"input_{k}" if k in RESERVED_FIELDS else k): v for k, v in rec.fields.items()}
    return {
        **passthrough,
        "id": rec.id,
        "prompt": rec.prompt,
        "completion": gen.completion.text,
        "generation": {
            "model": job.model,
            "run_id": job.run_id,
            "shard": shard,
            "input_line": rec.line,
            "finish_reason": gen.completion.finish_reason,
            "prompt_match": gen.completion.prompt_match,
            "generated_tokens": gen.generated_tokens,
        },
    }


def generate_records(client: NemoClient, shard: Shard, job: ShardJob) -> Iterator[tuple[dict, int]]:
    for batch in batches(shard.records, job.batch_size):
        results = client.generate([r.prompt for r in batch], job.sampling)
        for rec, gen in zip(batch, results):
            yield output_record(rec, gen, job, shard.index), gen.generated_tokens


def write_part(lines: Iterator[tuple[dict, int]], staging: Path, name: str) -> tuple[Path, str, int, int, int]:
    """Write records to a temp file in `staging`; return (path, sha256, records, bytes, tokens).
    A half-written file never has the part's name, so it is never mistaken for a part."""
    staging.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=staging, prefix=f".{name}.", suffix=".tmp")
    sha, count, size, tokens = hashlib.sha256(), 0, 0, 0
    try:
        with os.fdopen(fd, "wb") as f:
            for obj, n_tokens in lines:
                data = (json.dumps(obj, ensure_ascii=False) + "\n").encode()
                f.write(data)
                sha.update(data)
                count, size, tokens = count + 1, size + len(data), tokens + n_tokens
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp), sha.hexdigest(), count, size, tokens


def run_shard(client: NemoClient, shard: Shard, job: ShardJob, store: OutputStore,
              dead_reason: Callable[[], str | None] = lambda: None) -> ShardResult:
    """`dead_reason` tells a dead server from a hiccup: a transient error from a server whose
    process or job is gone becomes ServerLost, which no retry can fix."""
    started = time.monotonic()
    try:
        path, sha, count, size, tokens = write_part(generate_records(client, shard, job), store.staging_dir(), shard.name)
    except TransientServerError as exc:
        if (reason := dead_reason()) is not None:
            raise ServerLost(f"shard {shard.index}: the server is gone: {reason}") from exc
        raise
    generated = time.monotonic()
    try:
        store.publish_file(shard.name, path, sha)
    finally:
        path.unlink(missing_ok=True)
    part = PartInfo(shard.name, shard.index, count, sha, size, job.config_hash,
                    shard.records[0].line, shard.records[-1].line)
    store.write_bytes(part.state_name(), part.to_json())  # after the part: state implies the part
    done = time.monotonic()
    log.info("shard %d: %d records, %d tokens, published %s", shard.index, count, tokens, store.uri(shard.name))
    return ShardResult(part, tokens, done - started, done - generated)
