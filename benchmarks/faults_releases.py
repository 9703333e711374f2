"""Fault cases of releases, the Prefect API and attached replicas: a slow Slurm release, the API down,
an attached replica lost, a probe answered 500, a throttled server (F3, F4, F5 of the reliability
review; benchmarks/faults.py runs them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.fault_harness import (REPO, Row, _wait, count_outcomes, environment, local_env, local_servers,
                                      read_local_run, run_jobs, slurm_env, write_prompts)


def case_slurm_slow_release(tmp: Path) -> Row:
    """Two one-node replicas whose servers need 10 s to exit after SIGTERM: each cancelled job
    stays COMPLETING until the cluster's KillWait (5 s here). The finished run keeps its manifest."""
    from flows.generate import generate
    from infra.slurm.client import SlurmClient
    from tests.ports import free_port

    serve = (f"{sys.executable} -m infra.local_server serve-local --engine simulated --host 0.0.0.0 --port {{port}} "
             "--extra-latency 0.1")
    cmd = ["bash", "-c", f"trap 'sleep 10; exit 0' TERM; {serve} & wait $!; wait"]
    profiles = {"fault1x8": {"backend": "slurm", "nodes": 1, "gpus_per_node": 8, "tensor_parallel": 8, "pipeline_parallel": 1}}
    env = slurm_env(tmp, profiles, cmd, free_port(span=8), "00:05:00", 120)
    expected = write_prompts(tmp / "in.jsonl", 40)
    with environment(env):
        generate(input_uri=str(tmp / "in.jsonl"), output_uri=str(tmp / "out"), run_id="r", profile="fault1x8",
                 shard_size=10, batch_size=5, replicas=2)
    written, rejected, manifest = read_local_run(tmp / "out" / "r")
    lost, dup = count_outcomes(expected, written, rejected)
    leaked = run_jobs(SlurmClient())
    released = sum(1 for r in manifest["replicas"] if "release_error" not in r)
    return Row(f"Slurm release slower than 5 s (jobs COMPLETING until KillWait; {len(manifest['slurm_job_ids'])} jobs)", injected=1,
               detected=released, lost=lost, duplicated=dup, leaked=len(leaked),
               recovery_s=manifest["timings_s"].get("release"), note="manifest published; recovery = time in release")


def case_api_outage(tmp: Path) -> Row:
    """The Prefect API server is SIGKILLed after the first part (a restart or upgrade during a
    nightly run): generation goes on, the manifest is published."""
    from tests.fixtures_prefect import start_server, tail_of
    from tests.ports import free_port

    from infra.system.process import stop_process_group

    expected = write_prompts(tmp / "in.jsonl", 100)
    server = start_server(tmp / "prefect", free_port())
    run_dir = tmp / "out" / "r"
    log_path = tmp / "flow.log"
    env = {**server.env(), **local_env(tmp, "--extra-latency", "0.1"),  # its URL and password
           "PREFECT_LOGGING_EXTRA_LOGGERS": "flows,infra", "PYTHONPATH": str(REPO)}
    if flush := os.environ.get("NSDG_ARTIFACTS_FLUSH_S"):  # the test's shorter wait for the last UI updates
        env["NSDG_ARTIFACTS_FLUSH_S"] = flush
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--input-uri", str(tmp / "in.jsonl"),
                             "--output-uri", str(tmp / "out"), "--run-id", "r", "--shard-size", "10", "--batch-size", "5"],
                            cwd=tmp, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait(lambda: any(run_dir.glob("part-*.state.json")) or proc.poll() is not None, 180, "the first part")
        os.killpg(server.proc.pid, signal.SIGKILL)
        killed_at = time.time()
        _wait(lambda: (run_dir / "manifest.json").exists() or proc.poll() is not None, 240, "the run to finish")
    finally:
        stop_process_group(server.proc, grace=1.0)
        if not (run_dir / "manifest.json").exists():
            raise RuntimeError(f"no manifest after the API outage; flow log:\n{tail_of(log_path, 30)}")
        stop_process_group(proc, grace=5.0)  # its last state report waits on an API that is gone
    written, rejected, _ = read_local_run(run_dir)
    lost, dup = count_outcomes(expected, written, rejected)
    noticed = "Prefect API unreachable" in log_path.read_text(errors="replace")
    return Row("Prefect API down from the first part on", injected=1, detected=int(noticed), lost=lost, duplicated=dup,
               leaked=local_servers(tmp), recovery_s=round((run_dir / "manifest.json").stat().st_mtime - killed_at, 1),
               note="UI updates dropped, generation never paused; recovery = kill to manifest")


def _attach_pair(tmp: Path, name: str, bad: list[str], **settings: str) -> Row:
    from flows.generate import generate
    from tests.localserver import running_server

    expected = write_prompts(tmp / "in.jsonl", 100)
    with running_server(tmp, "--engine", "simulated", "--extra-latency", "0.05") as (good, _), \
         running_server(tmp, "--engine", "simulated", "--extra-latency", "0.05", *bad) as (sick, _):
        env = {"NSDG_SERVER__URLS": json.dumps([good, sick]), "NSDG_WORK_DIR": str(tmp / "work"), **settings}
        with environment(env):
            generate(input_uri=str(tmp / "in.jsonl"), output_uri=str(tmp / "out"), run_id="r", profile="attach",
                     shard_size=10, batch_size=5)
    written, rejected, manifest = read_local_run(tmp / "out" / "r")
    lost, dup = count_outcomes(expected, written, rejected)
    idle = sum(1 for r in manifest["replicas"] if r["busy_fraction"] is None)
    return Row(name, injected=1, detected=manifest["server_restarts"] + idle, lost=lost, duplicated=dup,
               leaked=local_servers(tmp), note=f"{manifest['server_restarts']} re-attach, {idle} never ready; the other replica finished")


def case_attach_replica_lost(tmp: Path) -> Row:
    return _attach_pair(tmp, "attached replica hangs (2 URLs)", ["--fault-hang-after", "3"],
                        NSDG_SERVER__READ_TIMEOUT_S="3", NSDG_SERVER__READY_TIMEOUT_S="20")


def case_probe_500(tmp: Path) -> Row:
    return _attach_pair(tmp, "readiness probe answered HTTP 500 (2 URLs)", ["--fault-500-on", "Hello"])


def case_throttled(tmp: Path) -> Row:
    """OpenAI path, every 4th completion answered busy (429, then 503, alternately): each such request
    is retried alone with backoff and fewer in flight, and no replica counts as lost (review 2, D8:
    one busy answer failed the whole shard, and the retries released a healthy server)."""
    from flows.generate import generate

    expected = write_prompts(tmp / "in.jsonl", 60)
    env = local_env(tmp, "--fault-throttle-every", "4", NSDG_SERVER__API="openai-completions")
    with environment(env):
        generate(input_uri=str(tmp / "in.jsonl"), output_uri=str(tmp / "out"), run_id="r", shard_size=20, batch_size=8)
    written, rejected, manifest = read_local_run(tmp / "out" / "r")
    lost, dup = count_outcomes(expected, written, rejected)
    logs = [log.read_text() for log in (tmp / "work").glob("servers/*/replica-*/server.log")]
    busy = sum(text.count('" 429 ') + text.count('" 503 ') for text in logs)
    return Row("OpenAI path: server busy (429/503 on every 4th request)", injected=busy,
               detected=busy if manifest["server_restarts"] == 0 and len(logs) == 1 else 0, lost=lost, duplicated=dup,
               leaked=local_servers(tmp), note="retried per request; the replica kept")


CASES: dict[str, Callable[[Path], Row]] = {
    "throttled": case_throttled,
    "slurm_slow_release": case_slurm_slow_release,
    "api_outage": case_api_outage,
    "attach_replica_lost": case_attach_replica_lost,
    "probe_500": case_probe_500,
}
SLURM_CASES = {"slurm_slow_release"}
