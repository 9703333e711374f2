"""Fault cases of a run's state: stale part states, a lost lease, a retired client's queue, rollover
thrash (review 2: D1, D4, D7; benchmarks/faults.py runs them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.fault_harness import (Row, _wait, count_outcomes, environment, local_env, local_servers,
                                      read_local_run, recovery_after, run_jobs, slurm_env, stop_between_writes,
                                      write_prompts)


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _kept_ids(run_dir: Path) -> list[str]:
    return [json.loads(line)["id"] for p in sorted(run_dir.glob("kept-*.jsonl")) for line in p.read_text().splitlines()]


def case_stale_state(tmp: Path) -> Row:
    """A finished, curated run; then what a kill between a file rewritten and its new state leaves:
    a part whose bytes its state no longer names, a kept file rewritten under its verdict (a killed
    rerun with stricter filters, D1). The same rerun must trust neither state: the part is generated
    again, the shard curated again, and every kept row and manifest sha256 is the clean run's."""
    from flows.generate import generate

    expected = write_prompts(tmp / "in.jsonl", 40)
    run_dir = tmp / "out" / "r"
    params = dict(input_uri=str(tmp / "in.jsonl"), output_uri=str(tmp / "out"), run_id="r", shard_size=10, batch_size=5,
                  sampling={"greedy": True, "tokens_to_generate": 12}, filters={"min_completion_tokens": 6})
    server = local_env(tmp, "--sim-finish-fraction", "0.5")  # half the rows end early: the filter drops some
    with environment(server):
        generate(**params)
    clean_kept = _kept_ids(run_dir)
    part, kept = run_dir / "part-00001.jsonl", run_dir / "kept-00002.jsonl"
    part.write_text("".join(part.read_text().splitlines(keepends=True)[:3]))  # its state names 10 rows
    kept.write_text("")  # its verdict names the first filters' rows
    with environment(server):
        generate(**params)
    written, rejected, manifest = read_local_run(run_dir)
    lost, dup = count_outcomes(expected, written, rejected)
    kept_now = _kept_ids(run_dir)
    kept_lost, kept_dup = count_outcomes(clean_kept, kept_now, [])
    described = [*manifest["parts"], *manifest["curation"]["kept_parts"]]
    wrong_sha = sum(1 for f in described if f["sha256"] != _sha(run_dir / f["name"]))
    redone = int(len(part.read_text().splitlines()) == 10) + int(bool(kept.read_text()))
    return Row("stale state: a part and a kept file rewritten under their states, rerun", injected=2, detected=redone,
               lost=lost + kept_lost + wrong_sha, duplicated=dup + kept_dup, leaked=local_servers(tmp),
               note=f"both redone; {len(kept_now)} of 40 kept as in the clean run; {wrong_sha} manifest sha256 wrong")


def case_lease_lost(tmp: Path) -> Row:
    """The holder (a CLI run) is stopped (SIGSTOP) after its first part until its lease expires; a
    second run takes the lease and finishes the run. Continued, the first must write nothing more
    (D4: it regenerated 8 shards over the new holder's parts and rewrote its manifest), release its
    server and exit 1 with LeaseLost. `duplicated` counts files it changed after the loss."""
    from prefect.settings import PREFECT_API_URL

    from flows.generate import generate
    from infra.run.lease import LeaseRecord
    from infra.run.layout import LEASE_NAME

    expected = write_prompts(tmp / "in.jsonl", 60)
    run_dir = tmp / "out" / "r"
    env = {**os.environ, **local_env(tmp, "--extra-latency", "0.1"), "NSDG_WORK_DIR": str(tmp / "work-a"),
           "NSDG_RUN_LEASE_TTL_S": "3", "NSDG_SERVER__MAX_IN_FLIGHT": "1", "PREFECT_HOME": str(tmp / "prefect"),
           "PREFECT_API_URL": str(PREFECT_API_URL.value())}  # the suite's own API: no temporary server
    holder = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--input-uri", str(tmp / "in.jsonl"),
                               "--output-uri", str(tmp / "out"), "--run-id", "r", "--shard-size", "10", "--batch-size", "5"],
                              cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "holder.log", "wb"),
                              start_new_session=True)
    try:
        _wait(lambda: (run_dir / "part-00000.jsonl.state.json").exists() or holder.poll() is not None, 180,
              "the holder's first part")
        stop_between_writes(holder.pid, run_dir)
        stopped_at = time.time()
        _wait(lambda: LeaseRecord.from_json((run_dir / LEASE_NAME).read_bytes()).expires_at < time.time(), 30,
              "the stopped holder's lease to expire")
        with environment(local_env(tmp)):
            generate(input_uri=str(tmp / "in.jsonl"), output_uri=str(tmp / "out"), run_id="r", shard_size=10, batch_size=5)
        finished_at = time.time()
        files = {p.name: p.read_bytes() for p in run_dir.iterdir()}
        os.kill(holder.pid, signal.SIGCONT)
        holder.wait(timeout=120)
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait(timeout=30)
    after = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    changed = sum(1 for name in files.keys() | after.keys() if files.get(name) != after.get(name))
    written, rejected, _ = read_local_run(run_dir)
    lost, dup = count_outcomes(expected, written, rejected)
    lines = (tmp / "holder.log").read_text(errors="replace").strip().splitlines()
    failed = holder.returncode == 1 and bool(lines) and lines[-1].startswith("nemotron-sdg run: LeaseLost:")
    _wait(lambda: local_servers(tmp) == 0, 15, "the lost holder's local server to stop")
    return Row("run lease lost (holder stopped past its TTL), another run finished it", injected=1, detected=int(failed),
               lost=lost, duplicated=dup + changed, leaked=local_servers(tmp), recovery_s=round(finished_at - stopped_at, 1),
               note=f"the old holder exits {holder.returncode} (LeaseLost), {changed} files written after the loss")


def case_openai_queue_requeued(tmp: Path) -> Row:
    """OpenAI path, one request in flight per replica and two shard tasks: each shard is one batch,
    so the second shard's requests all wait in the replica's client pool behind the first's. The
    server stops answering; the first shard's hung request makes the replica lost and its client
    closed: the second shard's queued requests must fail as ServerLost and the shard be requeued
    (D7: they were cancelled, CancelledError, and the run failed with restarts left)."""
    from flows.generate import generate

    marker = tmp / "fault-fired"
    expected = write_prompts(tmp / "in.jsonl", 40)
    env = local_env(tmp, "--fault-hang-after", "2", "--fault-once-marker", str(marker), "--extra-latency", "0.05",
                    NSDG_SERVER__API="openai-completions", NSDG_SERVER__MAX_IN_FLIGHT="1", NSDG_SERVER__READ_TIMEOUT_S="2")
    with environment(env):
        generate(input_uri=str(tmp / "in.jsonl"), output_uri=str(tmp / "out"), run_id="r", shard_size=10, batch_size=10)
    written, rejected, manifest = read_local_run(tmp / "out" / "r")
    lost, dup = count_outcomes(expected, written, rejected)
    return Row("OpenAI path: replica hangs with a shard's requests queued in its client's pool", injected=int(marker.exists()),
               detected=manifest["server_restarts"], lost=lost, duplicated=dup, leaked=local_servers(tmp),
               recovery_s=recovery_after(marker, tmp / "out" / "r"), note="queued requests failed as lost; shards requeued")


def case_slurm_rollover_thrash(tmp: Path) -> Row:
    """Review 2's thrash: 1-minute Slurm limits, the default 60 s margin (a lead longer than a job's
    whole limit), a 2 s batch, max_server_restarts 0. It made 50 rollovers in 4 minutes for 20 of
    420 records, then ServerLost. Each job must serve until its own end is near: every record, a
    few rollovers (capped at 10 here, so a regression fails the row instead of spinning 50 jobs).
    Bench-only (`make faults`): minutes of wall time; tests/test_slurm_rollover.py has the test."""
    from flows.generate import generate
    from infra.slurm.client import SlurmClient
    from tests.ports import free_port

    cmd = [sys.executable, "-m", "infra.local_server", "serve-local", "--engine", "simulated", "--host", "0.0.0.0",
           "--port", "{port}", "--load-delay", "3", "--extra-latency", "2"]  # a batch of 10 takes 2 s
    profiles = {"roll1x1": {"backend": "slurm", "nodes": 1, "gpus_per_node": 1, "tensor_parallel": 1, "pipeline_parallel": 1}}
    env = slurm_env(tmp, profiles, cmd, free_port(span=24), "1", 300, NSDG_SLURM__EXCLUSIVE="false", NSDG_SLURM__MEM="",
                    NSDG_SLURM__WARN_SIGNAL_S="60", NSDG_SLURM__MAX_ROLLOVERS="10")
    expected = write_prompts(tmp / "in.jsonl", 420)
    with environment(env):
        generate(input_uri=str(tmp / "in.jsonl"), output_uri=str(tmp / "out"), run_id="r", profile="roll1x1",
                 shard_size=20, batch_size=10, max_server_restarts=0)
    written, rejected, manifest = read_local_run(tmp / "out" / "r")
    lost, dup = count_outcomes(expected, written, rejected)
    leaked = run_jobs(SlurmClient())
    roll = manifest["rollovers"]
    idle = sum(1 for r in manifest["replicas"] if not r.get("records"))
    return Row("Slurm: rollover lead longer than the 1-minute limit (thrash)", injected=1,
               detected=roll["count"] if roll["count"] and manifest["server_restarts"] == 0 else 0, lost=lost,
               duplicated=dup, leaked=len(leaked),
               note=f"{roll['count']} rollovers ({roll['late']} late), {len(manifest['slurm_job_ids'])} jobs "
                    f"({idle} served nothing), largest gap {roll['largest_gap_s']} s")


CASES: dict[str, Callable[[Path], Row]] = {
    "stale_state": case_stale_state,
    "lease_lost": case_lease_lost,
    "openai_queue_requeued": case_openai_queue_requeued,
    "slurm_rollover_thrash": case_slurm_rollover_thrash,
}
SLURM_CASES = {"slurm_rollover_thrash"}
BENCH_ONLY = {"slurm_rollover_thrash"}  # minutes of 1-minute jobs: `make faults` only; its test is test_slurm_rollover.py
