"""Server busy fraction and records/s: the real `generate` flow vs a seed-style client.

Both drive the same NeMo-compatible server (simulated engine, one request at a time behind
its lock, `--stats-file` recording each generation's start and end). Busy fraction = the
sum of (end - start) ÷ (last reply's end - first request's start), from the stats file; the
flow's 1-token readiness probe is left out (it comes before generation starts).

- ours: `flows.generate.generate` in a child process, `attach` profile pointed at the server
  (allocation is the only step attach skips), batch_size 32 (pinned: the flow's default is now 128) and max_in_flight 2, a
  small shard_size so the run crosses several shard boundaries (the worst case for gaps).
- seed: call_server.py's loop: one prompt per `requests.put(..., data=json.dumps(data))`, no
  session, sequential, same sampling parameters.

Cost model: the simulated engine with PLANNING_340B_TP8_PP2's shape (prefill 2e-4 s/token,
decode step 0.05 s, batch slope 0.004), tokens_to_generate 88, scaled ×0.1 for the short
case (≈0.5 s per batch of 32) and ×1 for the long case (≈5 s per batch of 32).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from benchmarks.common import BusyWindow, Cost, PrefectAPI, busy_window, local_server, median, run_flow, write_prompts

TOKENS = 88
PLANNING = Cost(prefill_s_per_token=2e-4, decode_step_s=0.05, decode_batch_slope=0.004)


def scaled(cost: Cost, factor: float) -> Cost:
    return Cost(cost.prefill_s_per_token * factor, cost.decode_step_s * factor, cost.decode_batch_slope, cost.finish_fraction)


@dataclass(frozen=True)
class Case:
    name: str
    cost: Cost
    ours_records: int
    ours_shard_size: int
    seed_requests: int
    repeats: int


def seed_style(url: str, prompts: list[str]) -> list[str]:
    """call_server.py, one prompt per request, in order (its sampling fields, our values)."""
    headers = {"Content-Type": "application/json"}
    out = []
    for prompt in prompts:
        data = {"sentences": [prompt], "tokens_to_generate": TOKENS, "temperature": 1.0, "add_BOS": False,
                "top_k": 0, "top_p": 1.0, "greedy": True, "all_probs": False, "repetition_penalty": 1.0,
                "min_tokens_to_generate": 0, "end_strings": ["<|endoftext|>"]}
        resp = requests.put(f"{url}/generate", data=json.dumps(data), headers=headers)
        out.append(resp.json()["sentences"][0][len(prompt):])
    return out


def prompt(i: int) -> str:
    return f"Prompt number {i}: write one sentence about data."


def run_ours(workdir: Path, api: PrefectAPI, case: Case, rep: int) -> tuple[BusyWindow, dict]:
    tag = f"busy-{case.name}-ours-{rep}"
    src = write_prompts(workdir / f"{tag}.jsonl", case.ours_records, prompt=prompt)
    with local_server(workdir, tag, case.cost) as srv:
        run = run_flow(workdir, api, {
            "input_uri": str(src), "output_uri": str(workdir / "out"), "run_id": tag, "profile": "attach",
            "sampling": {"tokens_to_generate": TOKENS, "greedy": True}, "shard_size": case.ours_shard_size,
            "batch_size": 32,  # the seed comparison's figure since issue 7 (the flow's default is now 128)
        }, settings_env={"NSDG_SERVER__URL": srv.url, "NSDG_WORK_DIR": str(workdir / ".nsdg")}, tag=tag)
        if not run.ok:
            raise RuntimeError(f"{tag} failed: {run.error}")
        window = busy_window(srv.stats())
    manifest = json.loads(Path(run.result["manifest"]).read_text())
    return window, manifest


def run_seed(workdir: Path, case: Case, rep: int) -> BusyWindow:
    tag = f"busy-{case.name}-seed-{rep}"
    with local_server(workdir, tag, case.cost) as srv:
        seed_style(srv.url, [prompt(i) for i in range(case.seed_requests)])
        return busy_window(srv.stats(), drop_probe=False)


def run(workdir: Path, api: PrefectAPI, cases: list[Case], log) -> dict:
    out = {}
    for case in cases:
        ours, seeds, manifests = [], [], []
        for rep in range(case.repeats):
            t = time.monotonic()
            w, m = run_ours(workdir, api, case, rep)
            ours.append(w)
            manifests.append(m)
            log(f"busy {case.name} ours #{rep}: busy {w.fraction:.4f}, {w.rows_per_s:.1f} rec/s, {w.requests} requests, "
                f"largest gap {w.largest_gap_s * 1000:.1f} ms ({time.monotonic() - t:.0f} s)")
            t = time.monotonic()
            s = run_seed(workdir, case, rep)
            seeds.append(s)
            log(f"busy {case.name} seed #{rep}: busy {s.fraction:.4f}, {s.rows_per_s:.2f} rec/s, {s.requests} requests "
                f"({time.monotonic() - t:.0f} s)")
        ratios = [o.rows_per_s / s.rows_per_s for o, s in zip(ours, seeds)]
        out[case.name] = {
            "cost": case.cost.__dict__, "tokens_to_generate": TOKENS,
            "batch_latency_s": median([o.busy_s / o.requests for o in ours]),
            "seed_request_latency_s": median([s.busy_s / s.requests for s in seeds]),
            "ours_busy": [o.fraction for o in ours], "seed_busy": [s.fraction for s in seeds],
            "ours_busy_median": median([o.fraction for o in ours]), "seed_busy_median": median([s.fraction for s in seeds]),
            "ours_rps": [o.rows_per_s for o in ours], "seed_rps": [s.rows_per_s for s in seeds],
            "ours_rps_median": median([o.rows_per_s for o in ours]), "seed_rps_median": median([s.rows_per_s for s in seeds]),
            "ratio_per_run": ratios, "ratio_median": median(ratios),
            "ours_largest_gap_ms": max(o.largest_gap_s for o in ours) * 1000,
            "ours_requests": ours[0].requests, "seed_requests": seeds[0].requests,
            "ours_records": case.ours_records, "ours_shard_size": case.ours_shard_size, "repeats": case.repeats,
            "flow_generation_s": [m["timings_s"].get("generation") for m in manifests],
            "flow_records_per_s": [m["throughput"].get("records_per_s") for m in manifests],
        }
    return out
