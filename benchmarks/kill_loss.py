"""GPU work lost per kill -9 (issue 28, cost 1): `nemotron-sdg run` killed in the middle of a shard,
then rerun with the same run_id; the requests the server generated twice are the work the kill
lost. Counted from the server's own log (every batch request of the shard, the readiness probe
left out, the request in flight at the kill counted once the orphaned server has stopped), so the
figure needs nothing of the product's bookkeeping.

    python -m benchmarks.kill_loss [--before CHECKOUT] [--at 0.25 0.5 0.75] [--json out.json]

`--before` runs the same kills with another checkout's code (its PYTHONPATH) in the same
invocation: e.g. `git worktree add --detach /tmp/base <commit>` for the code before the spill. One
shard of 48 records in batches of 4 (12 requests, 0.2 s each on the simulated engine); the kill
lands once `--at` of them are answered.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO, base_env, prefect_api, wait_for
from benchmarks.faults import local_servers

RECORDS, BATCH = 48, 4
REQUESTS = RECORDS // BATCH
BATCH_REQUEST = re.compile(rf"request \d+: {BATCH} sentences, \d+ tokens generated")


def answered(work: Path) -> int:
    """Batch requests the run's servers answered (the readiness probe is one sentence)."""
    return sum(len(BATCH_REQUEST.findall(p.read_text())) for p in (work / "servers").glob("*/replica-*/server.log"))


def one_kill(tmp: Path, code: Path, api_env: dict[str, str], at: float) -> dict:
    """Kill the run once `at` of its shard's requests are answered; rerun; count what was asked twice."""
    (tmp / "in.jsonl").write_text("".join(json.dumps({"id": f"k{i:03d}", "prompt": f"Tell me about item {i:03d}."})
                                          + "\n" for i in range(RECORDS)))
    env = base_env(PYTHONPATH=str(code), NSDG_LOCAL__ENGINE="simulated", NSDG_WORK_DIR=str(tmp / "work"),
                   NSDG_LOCAL__EXTRA_ARGS=json.dumps(["--extra-latency", "0.2"]), **api_env)
    argv = [sys.executable, "-m", "flows.cli", "run", "--run-id", "k", "--input-uri", str(tmp / "in.jsonl"),
            "--output-uri", str(tmp / "out"), "--shard-size", str(RECORDS), "--batch-size", str(BATCH),
            "--random-seed", "3", "--temperature", "0.8", "--tokens-to-generate", "8", "--prompt-format", "raw"]
    target = max(1, round(at * REQUESTS))
    proc = subprocess.Popen(argv, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "killed.log", "wb"),
                            start_new_session=True)
    try:
        wait_for(lambda: answered(tmp / "work") >= target or proc.poll() is not None, 300, f"{target} requests answered")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    # The orphaned server may still finish the request in flight: GPU work done for the killed run.
    wait_for(lambda: local_servers(tmp) == 0, 30, "the killed run's server to stop")
    before_kill = answered(tmp / "work")
    if (tmp / "out" / "k" / "part-00000.jsonl").exists():
        raise RuntimeError(f"the shard was published before the kill ({before_kill} requests): see {tmp}")
    rerun = subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    if rerun.returncode != 0:
        raise RuntimeError(f"the rerun failed ({rerun.returncode}): {rerun.stderr[-2000:]}")
    asked_again = answered(tmp / "work") - before_kill
    return {"answered_before_kill": before_kill, "asked_on_rerun": asked_again,
            "lost_requests": before_kill + asked_again - REQUESTS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kill_loss", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, help="another checkout, run side by side (the code before a change)")
    ap.add_argument("--at", type=float, nargs="+", default=[0.5], help="kill once this share of the shard is answered")
    ap.add_argument("--json", type=Path, help="write the raw figures here")
    args = ap.parse_args(argv)
    codes = ([("before", args.before.resolve())] if args.before else []) + [("this checkout", REPO)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="nsdg-kill-") as tmp:
        with prefect_api(Path(tmp)) as api:
            for at in args.at:
                for name, code in codes:
                    case = Path(tmp) / f"{name.replace(' ', '-')}-{at}"
                    case.mkdir()
                    rows.append({"code": name, "at": at, **one_kill(case, code, api.env(), at)})
                    print(rows[-1], file=sys.stderr, flush=True)
    print(f"One shard of {RECORDS} records, {REQUESTS} requests of {BATCH}; kill -9 of the run, then the same command.\n")
    print("| code | killed at | requests the killed run's server answered | asked on the rerun | generated twice (lost) | lost, share of the shard |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['code']} | {r['at']:.0%} | {r['answered_before_kill']} | {r['asked_on_rerun']} | "
              f"{r['lost_requests']} | {r['lost_requests'] / REQUESTS:.0%} |")
    if args.json:
        args.json.write_text(json.dumps({"records": RECORDS, "batch": BATCH, "requests": REQUESTS, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
