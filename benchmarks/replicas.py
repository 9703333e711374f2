"""Replica scaling (issue 8): records/s of the real `generate` flow with K = 1, 2, 4 simulated
server replicas (local backend, one server process each, ≈0.4 s per batch), and the seconds each
replica stayed allocated after its last shard ended (released as soon as the queue is empty).

    python -m benchmarks.replicas --out benchmarks/results.md --append
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import in_process_api, section_main
from benchmarks.faults import environment

RECORDS, BATCH, SHARD, LATENCY = 2048, 16, 16, 0.4
TARGETS = {2: 1.9, 4: 3.7}


def run_once(tmp: Path, k: int, records: int = RECORDS) -> dict:
    from flows.generate import generate

    src = tmp / "in.jsonl"
    if not src.exists():
        src.write_text("".join(json.dumps({"prompt": f"replica benchmark prompt {i}"}) + "\n" for i in range(records)))
    env = {"NSDG_LOCAL__ENGINE": "simulated", "NSDG_WORK_DIR": str(tmp / "work"),
           "NSDG_LOCAL__EXTRA_ARGS": json.dumps(["--extra-latency", str(LATENCY)])}
    with environment(env):
        result = generate(input_uri=str(src), output_uri=str(tmp / "out"), run_id=f"k{k}-{time.time_ns()}",
                          shard_size=SHARD, batch_size=BATCH, replicas=k,
                          sampling={"tokens_to_generate": 8, "greedy": True})
    manifest = json.loads(Path(result["manifest"]).read_text())
    gen_s = manifest["timings_s"]["generation"]
    idle = [r["idle_after_last_shard_s"] for r in manifest["replicas"] if r["idle_after_last_shard_s"] is not None]
    return {"k": k, "records_per_s": records / gen_s, "generation_s": gen_s, "idle_max_s": max(idle),
            "busy": [r["busy_fraction"] for r in manifest["replicas"]], "records": [r["records"] for r in manifest["replicas"]]}


def measure(repeats: int = 2, records: int = RECORDS, api_url: str | None = None) -> list[dict]:
    rows = []
    with in_process_api(api_url), tempfile.TemporaryDirectory(prefix="nsdg-replicas-") as tmp:
        for k in (1, 2, 4):
            runs = [run_once(Path(tmp), k, records) for _ in range(repeats)]
            rows.append({"k": k, "records": records, "records_per_s": statistics.median(r["records_per_s"] for r in runs),
                         "idle_max_s": max(r["idle_max_s"] for r in runs), "runs": runs})
    return rows


def markdown(rows: list[dict]) -> str:
    base = rows[0]["records_per_s"]
    lines = [
        "", "## Replicas (`benchmarks/replicas.py`)", "",
        f"The real `generate` flow, local backend, K simulated servers (one process each, `--extra-latency {LATENCY}` s "
        f"per request), {rows[0].get('records', RECORDS)} records, batches of {BATCH}, shards of {SHARD}, 2 requests in flight per replica; "
        "records/s over the generation phase (first replica ready → last shard done), median of 2 runs; idle = seconds a "
        "replica stayed allocated after its own last shard ended (max over replicas and runs).", "",
        "| replicas | records/s | speed-up vs K = 1 | target | idle after queue empty (max) | target |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        k, speed = row["k"], row["records_per_s"] / base
        target = TARGETS.get(k)
        met = "" if target is None else f"≥ ×{target}: {'met' if speed >= target else '**missed**'}"
        idle_met = "met" if row["idle_max_s"] <= 5 else "**missed**"
        lines.append(f"| {k} | {row['records_per_s']:.1f} | ×{speed:.2f} | {met} | {row['idle_max_s']:.2f} s | ≤ 5 s: {idle_met} |")
    lines += [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return section_main("benchmarks.replicas", __doc__, lambda: markdown(measure()), argv)


if __name__ == "__main__":
    sys.exit(main())
