"""Fault cases: the server crashes, hangs, poisons or slows; the flow is killed; the Slurm job is
cancelled; S3 fails a share of requests; bad input (benchmarks/faults.py runs them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.fault_harness import (TEST_PROFILES, Row, _wait, count_outcomes, environment, local_env,
                                      local_servers, moto_server, read_local_run, recovery_after, run_jobs, slurm_env,
                                      write_prompts)


def _server_dies(tmp: Path, name: str, switch: list[str], **settings: str) -> Row:
    from flows.generate import generate

    marker = tmp / "fault-fired"
    expected = write_prompts(tmp / "in.jsonl", 80)
    env = local_env(tmp, *switch, "--fault-once-marker", str(marker), "--extra-latency", "0.05", **settings)
    with environment(env):
        generate(input_uri=str(tmp / "in.jsonl"), output_uri=str(tmp / "out"), run_id="r", shard_size=10, batch_size=5)
    written, rejected, manifest = read_local_run(tmp / "out" / "r")
    lost, dup = count_outcomes(expected, written, rejected)
    return Row(name, injected=int(marker.exists()), detected=manifest["server_restarts"], lost=lost, duplicated=dup,
               leaked=local_servers(tmp), recovery_s=recovery_after(marker, tmp / "out" / "r"))


def case_server_crash(tmp: Path) -> Row:
    return _server_dies(tmp, "server crashes mid-run (rank 0 killed)", ["--fault-crash-after", "4"])


def case_server_hang(tmp: Path) -> Row:
    return _server_dies(tmp, "server hangs (no reply within read timeout)", ["--fault-hang-after", "4"],
                        NSDG_SERVER__READ_TIMEOUT_S="2")


def _poison(tmp: Path, name: str, switch: str, status: int) -> Row:
    from flows.generate import generate

    poison = {7, 33}
    expected = write_prompts(tmp / "in.jsonl", 60, poison)
    with environment(local_env(tmp, switch, "POISON")):
        generate(input_uri=str(tmp / "in.jsonl"), output_uri=str(tmp / "out"), run_id="r", shard_size=20, batch_size=8)
    written, rejected, _ = read_local_run(tmp / "out" / "r")
    lost, dup = count_outcomes(expected, written, rejected)
    statuses = [json.loads(l)["status"] for l in (tmp / "out" / "r" / "rejects.jsonl").read_text().splitlines()]
    right = sorted(rejected) == sorted(f"f{i:04d}" for i in poison) and statuses == [status] * len(poison)
    return Row(name, injected=len(poison), detected=len(rejected) if right else 0, lost=lost, duplicated=dup,
               leaked=local_servers(tmp), note="bisected; the rest generated")


def case_poison_500(tmp: Path) -> Row:
    return _poison(tmp, "poison prompt: HTTP 500", "--fault-500-on", 500)


def case_poison_rejected(tmp: Path) -> Row:
    return _poison(tmp, "poison prompt: 200 + validation string", "--fault-reject-on", 200)


def case_slow_replies(tmp: Path) -> Row:
    from flows.generate import generate

    expected = write_prompts(tmp / "in.jsonl", 30)
    with environment(local_env(tmp, "--extra-latency", "0.4")):
        generate(input_uri=str(tmp / "in.jsonl"), output_uri=str(tmp / "out"), run_id="r", shard_size=10, batch_size=5)
    written, rejected, manifest = read_local_run(tmp / "out" / "r")
    lost, dup = count_outcomes(expected, written, rejected)
    return Row("slow replies (0.4 s extra per request)", injected=6, detected=6 if manifest["server_restarts"] == 0 else 0,
               lost=lost, duplicated=dup, leaked=local_servers(tmp), note="no restart, nothing retried")


def case_flow_killed(tmp: Path) -> Row:
    """SIGKILL the flow process mid-run (no finally, no hooks), then rerun with the same run_id."""
    from flows.generate import generate

    expected = write_prompts(tmp / "in.jsonl", 80)
    env = {**os.environ, **local_env(tmp, "--extra-latency", "0.1"), "PREFECT_HOME": str(tmp / "prefect")}
    env.pop("PREFECT_API_URL", None)
    run_dir = tmp / "out" / "r"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--input-uri", str(tmp / "in.jsonl"),
                             "--output-uri", str(tmp / "out"), "--run-id", "r", "--shard-size", "10", "--batch-size", "5"],
                            cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "killed-run.log", "wb"),
                            start_new_session=True)
    try:
        _wait(lambda: any(run_dir.glob("part-*.state.json")), 180, "the first part of the run to be killed")
    finally:
        # The whole group: the flow and the temporary Prefect server it started (no API URL set),
        # which would otherwise outlive the test. The local server runs in its own session.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    killed_at = time.time()
    published_before = len(list(run_dir.glob("part-*.state.json")))
    # The orphaned server notices its parent is gone (the local dead-man switch).
    _wait(lambda: local_servers(tmp) == 0, 15, "the orphaned local server to stop")
    with environment(local_env(tmp)):
        generate(input_uri=str(tmp / "in.jsonl"), output_uri=str(tmp / "out"), run_id="r", shard_size=10, batch_size=5)
    written, rejected, _ = read_local_run(run_dir)
    lost, dup = count_outcomes(expected, written, rejected)
    return Row("flow process SIGKILLed mid-shard, rerun", injected=1, detected=int(published_before > 0), lost=lost,
               duplicated=dup, leaked=local_servers(tmp), recovery_s=round(time.time() - killed_at, 1),
               note=f"{published_before} parts kept, the rest generated on rerun")


def case_slurm_job_cancelled(tmp: Path) -> Row:
    """scancel the server's Slurm job from outside mid-run: a new job takes over."""
    from flows.generate import generate
    from infra.slurm.client import SlurmClient
    from tests.ports import free_port

    port = free_port(span=8)
    cmd = [sys.executable, "-m", "infra.local_server", "serve-local", "--engine", "simulated", "--host", "0.0.0.0",
           "--port", "{port}", "--extra-latency", "0.2"]  # each launch gets its own port
    env = slurm_env(tmp, TEST_PROFILES, cmd, port, "00:10:00", 180)
    expected = write_prompts(tmp / "in.jsonl", 100)
    run_dir = tmp / "out" / "r"
    client = SlurmClient()
    cancelled: list[float] = []

    def cancel_first_job() -> None:
        _wait(lambda: any(run_dir.glob("part-*.state.json")), 120, "the first part on Slurm")
        for job in run_jobs(client):
            client.cancel(job.job_id)
            cancelled.append(time.time())

    killer = threading.Thread(target=cancel_first_job, daemon=True)
    killer.start()
    with environment(env):
        generate(input_uri=str(tmp / "in.jsonl"), output_uri=str(tmp / "out"), run_id="r", profile="fault2x8",
                 shard_size=10, batch_size=5)
    killer.join(timeout=10)
    written, rejected, manifest = read_local_run(run_dir)
    lost, dup = count_outcomes(expected, written, rejected)
    leaked = run_jobs(client)
    marker = tmp / "cancelled-at"
    if cancelled:
        marker.write_text("")
        os.utime(marker, (cancelled[0], cancelled[0]))
    return Row("Slurm job cancelled from outside", injected=len(cancelled), detected=manifest["server_restarts"],
               lost=lost, duplicated=dup, leaked=len(leaked), recovery_s=recovery_after(marker, run_dir),
               note=f"jobs {', '.join(manifest['slurm_job_ids'])}")


def case_s3_outage(tmp: Path) -> Row:
    """S3 answers 500/503/SlowDown or drops the connection for 30% of requests."""
    import boto3

    from flows.generate import generate
    from tests.fixtures_s3 import FaultProxy

    expected = write_prompts(tmp / "in.jsonl", 60)
    with moto_server() as endpoint, FaultProxy(endpoint, fault_rate=0.3, seed=7) as proxy:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="faults")
        env = {**local_env(tmp), "NSDG_S3__ENDPOINT_URL": proxy.url, "NSDG_S3__ADDRESSING_STYLE": "path"}
        with environment(env):
            generate(input_uri=str(tmp / "in.jsonl"), output_uri="s3://faults/runs", run_id="r", shard_size=10, batch_size=5)
        manifest = json.loads(s3.get_object(Bucket="faults", Key="runs/r/manifest.json")["Body"].read())
        written = [json.loads(line)["id"] for p in manifest["parts"]
                   for line in s3.get_object(Bucket="faults", Key=f"runs/r/{p['name']}")["Body"].read().decode().splitlines()]
        injected = proxy.injected
        open_uploads = len(s3.list_multipart_uploads(Bucket="faults").get("Uploads", []))  # billed, never listed
    lost, dup = count_outcomes(expected, written, [])
    return Row("S3 outage (30% of requests fail)", injected=injected, detected=injected, lost=lost, duplicated=dup,
               leaked=local_servers(tmp) + open_uploads, note="botocore retries + upload re-tries; leaked counts open multipart uploads")


BAD_INPUTS: dict[str, tuple[bytes | None, dict]] = {
    "invalid JSON": (b'{"prompt": "ok"}\n{"prompt": \n', {}),
    "missing prompt": (b'{"text": "x"}\n', {}),
    "empty prompt": (b'{"prompt": ""}\n', {}),
    "non-string prompt": (b'{"prompt": 42}\n', {}),
    "undecodable bytes": (b'{"prompt": "\xff\xfe"}\n', {}),
    "10 MB line": (b'{"prompt": "' + b"x" * (10 << 20) + b'"}\n', {}),
    "duplicate ids": (b'{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', {}),
    "empty file": (b"", {}),
    "missing file": (None, {}),
    "temperature=0 without greedy": (b'{"prompt": "a"}\n', {"sampling": {"temperature": 0}}),
    "top_p outside [0, 1]": (b'{"prompt": "a"}\n', {"sampling": {"top_p": 1.5}}),
    "tokens_to_generate <= 0": (b'{"prompt": "a"}\n', {"sampling": {"tokens_to_generate": 0}}),
    "tokens_to_generate >= context": (b'{"prompt": "a"}\n', {"sampling": {"tokens_to_generate": 4096}}),
    "batch_size > 128": (b'{"prompt": "a"}\n', {"batch_size": 129}),
    "random_seed >= 2^24": (b'{"prompt": "a"}\n', {"sampling": {"random_seed": 1 << 24}}),
    "hostile run_id": (b'{"prompt": "a"}\n', {"run_id": "../../etc"}),
    "unknown profile": (b'{"prompt": "a"}\n', {"profile": "h100x99"}),
    "missing bucket": (b'{"prompt": "a"}\n', {"output_uri": "s3://no-such-bucket-nsdg/x"}),
}


def case_bad_input(tmp: Path) -> Row:
    """Each kind of bad input fails before any server starts, and nothing is written."""
    from flows.generate import generate

    detected, started = 0, 0
    with moto_server() as endpoint, environment({**local_env(tmp), "NSDG_S3__ENDPOINT_URL": endpoint}):
        for i, (kind, (data, params)) in enumerate(BAD_INPUTS.items()):
            src = tmp / f"bad-{i}.jsonl"
            if data is not None:
                src.write_bytes(data)
            try:
                generate(**{"input_uri": str(src), "output_uri": str(tmp / "out"), "run_id": f"bad-{i}", **params})
            except Exception:
                detected += 1
            started += local_servers(tmp) + int((tmp / "work" / "servers").exists())
    return Row(f"bad input ({len(BAD_INPUTS)} kinds)", injected=len(BAD_INPUTS), detected=detected, leaked=started,
               note="each fails in the plan: no server started")


CASES: dict[str, Callable[[Path], Row]] = {
    "server_crash": case_server_crash,
    "server_hang": case_server_hang,
    "poison_500": case_poison_500,
    "poison_rejected": case_poison_rejected,
    "slow_replies": case_slow_replies,
    "flow_killed": case_flow_killed,
    "slurm_job_cancelled": case_slurm_job_cancelled,
    "s3_outage": case_s3_outage,
    "bad_input": case_bad_input,
}
SLURM_CASES = {"slurm_job_cancelled"}

