"""Runs longer than a Slurm time limit (issue 18), on the local Slurm cluster: one replica, a
1-minute limit (Slurm's smallest), a run spanning about 4 limits, side by side:

- restart:  today's behaviour before planned rollover (`NSDG_SLURM__MAX_ROLLOVERS=0`): a job that
            reaches its limit is a lost server, replaced within `max_server_restarts` (set high
            enough to finish);
- rollover: planned rollover (the default): a successor job ahead of each end.

Reported: wall time, GPU-hours held (each job from its start to its release: a pending job holds
no GPU), GPU-hours idle (held but not generating), idle per limit crossed (beyond the first job's
load, which both pay), and the largest gap in generation (no shard running anywhere). Target:
idle per rollover ≤ load time + 10 s. One-GPU jobs, non-exclusive (the old job and its successor
share the nodes); the simulated engine with a load delay of LOAD_S.

    python -m benchmarks.rollover --out benchmarks/results.md --append
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import PY, free_port, in_process_api, section_main
from benchmarks.faults import environment
from benchmarks.slurm import our_jobs, slurm_up

PROFILE = {"roll1x1": {"backend": "slurm", "nodes": 1, "gpus_per_node": 1, "tensor_parallel": 1, "pipeline_parallel": 1}}
LOAD_S, LATENCY, BATCH, SHARD = 10.0, 0.5, 10, 20  # one shard: two requests, about 1 s
RECORDS = 3600  # about 180 s of generation: with ~45 s of work per 1-minute job, 4 limits
GPUS = 1


def scenario_env(tmp: Path, name: str) -> dict[str, str]:
    server = [PY, "-m", "infra.local_server", "serve-local", "--engine", "simulated", "--host", "0.0.0.0",
              "--port", "{port}", "--load-delay", str(LOAD_S), "--extra-latency", str(LATENCY)]
    return {
        "NSDG_EXTRA_PROFILES": json.dumps(PROFILE), "NSDG_SLURM__CONTAINER_RUNTIME": "none",
        "NSDG_SLURM__JOB_ROOT": str(tmp / "jobs"), "NSDG_SLURM__TIME_LIMIT": "1", "NSDG_SLURM__EXCLUSIVE": "false",
        "NSDG_SLURM__MEM": "", "NSDG_SLURM__ENV": json.dumps({"PYTHONPATH": str(Path(__file__).resolve().parents[1])}),
        "NSDG_SERVER__PORT": str(free_port(span=32)), "NSDG_SERVER__READY_TIMEOUT_S": "300",
        "NSDG_SERVER__COMMAND": json.dumps(server), "NSDG_WORK_DIR": str(tmp / "work"),
        "NSDG_SLURM__ROLLOVER_MARGIN_S": "5", "NSDG_SLURM__WARN_SIGNAL_S": "60",
        "NSDG_SLURM__MAX_ROLLOVERS": "0" if name == "restart" else "50",
    }


def largest_gap(parts: list[dict]) -> float:
    """The longest time no shard ran anywhere, between the first shard's start and the last's end."""
    spans = sorted((p["started_at"], p["finished_at"]) for p in parts if p.get("started_at"))
    gap, end = 0.0, spans[0][1]
    for a, b in spans[1:]:
        gap, end = max(gap, a - end), max(end, b)
    return gap


def run_once(tmp: Path, name: str) -> dict:
    from flows.generate import generate

    src = tmp / "in.jsonl"
    if not src.exists():
        src.write_text("".join(json.dumps({"prompt": f"rollover benchmark prompt {i}"}) + "\n" for i in range(RECORDS)))
    run_id = f"{name}-{time.time_ns()}"
    with environment(scenario_env(tmp, name)):
        t0 = time.time()
        result = generate(input_uri=str(src), output_uri=str(tmp / "out"), run_id=run_id, profile="roll1x1",
                          shard_size=SHARD, batch_size=BATCH, max_server_restarts=0 if name == "rollover" else 20,
                          sampling={"tokens_to_generate": 8, "greedy": True})
        wall = time.time() - t0
    manifest = json.loads(Path(result["manifest"]).read_text())
    reps = manifest["replicas"]
    held = sum(r["allocated_s"] for r in reps)
    idle = sum(max(0.0, r["allocated_s"] - r["busy_s"]) for r in reps)
    crossings = len(reps) - 1
    first_startup = reps[0]["load_s"] or 0.0  # the first job's load, which both paths pay once
    roll = manifest.get("rollovers") or {}
    return {"scenario": name, "wall_s": wall, "jobs": len(manifest["slurm_job_ids"]), "crossings": crossings,
            "restarts": manifest["server_restarts"], "rollovers": roll.get("count", 0), "late": roll.get("late", 0),
            "gpu_hours_held": GPUS * held / 3600, "gpu_hours_idle": GPUS * idle / 3600,
            "idle_per_crossing_s": (idle - first_startup) / crossings if crossings else None,
            "largest_gap_s": largest_gap([p for p in manifest["parts"]]), "left_in_squeue": sorted(our_jobs(run_id)),
            "records": manifest["records_written"]}


def measure(api_url: str | None = None) -> list[dict]:
    with in_process_api(api_url), tempfile.TemporaryDirectory(prefix="nsdg-rollover-") as tmp:
        return [run_once(Path(tmp), name) for name in ("restart", "rollover")]


def markdown(rows: list[dict]) -> str:
    target = LOAD_S + 10.0
    lines = [
        "", "## Runs longer than the time limit (`benchmarks/rollover.py`)", "",
        f"The real `generate` flow on the local Slurm cluster, one replica of one GPU, `--time=1` (a minute; Slurm "
        f"enforces it on a ~30 s timer), the simulated engine with a {LOAD_S:.0f} s load and {LATENCY} s per request, "
        f"{RECORDS} records in shards of {SHARD} (about 1 s each): a run spanning about 4 limits. `restart` is the "
        "behaviour before planned rollover (`NSDG_SLURM__MAX_ROLLOVERS=0`: each limit is a lost server, replaced "
        "within `max_server_restarts=20`); `rollover` is the default (`max_server_restarts=0`). Held = each job from "
        "its start to its release (a pending job holds no GPU); idle = held but not generating; idle per limit = (idle − the first job's load) / "
        "limits crossed; gap = the longest time no shard ran.", "",
        "| scenario | wall | jobs | restarts | rollovers (late: successor not ready by the old job's end) | GPU-h held | GPU-h idle | idle per limit | target | "
        "largest gap | left in squeue | records |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per = r["idle_per_crossing_s"]
        met = "" if r["scenario"] != "rollover" or per is None else \
            f"≤ {target:.0f} s: {'met' if per <= target else '**missed**'}"
        lines.append(f"| {r['scenario']} | {r['wall_s']:.0f} s | {r['jobs']} | {r['restarts']} | {r['rollovers']} "
                     f"({r['late']}) | {r['gpu_hours_held']:.4f} | {r['gpu_hours_idle']:.4f} | "
                     f"{'—' if per is None else f'{per:.1f} s'} | {met} | {r['largest_gap_s']:.1f} s | "
                     f"{len(r['left_in_squeue'])} | {r['records']} |")
    lines += ["", "Other jobs on the cluster lengthen queue waits and so the restart row's gaps.", ""]
    return "\n".join(lines)


def section() -> str | None:
    if not slurm_up():
        print("rollover benchmark: no Slurm controller answers (make slurm-up); skipped", file=sys.stderr)
        return None
    rows = measure()
    print(json.dumps(rows, indent=1), file=sys.stderr)
    return markdown(rows)


def main(argv: list[str] | None = None) -> int:
    return section_main("benchmarks.rollover", __doc__, section, argv)


if __name__ == "__main__":
    sys.exit(main())
