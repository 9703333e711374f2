"""The fault suite: every fault we can name, injected into a real run against the real local
stand-ins (the NeMo-compatible server with its fault switches, the local Slurm cluster, moto's S3
server behind a fault proxy), then the output checked record by record.

`make faults` prints the table; tests/test_faults.py (marker `faults`) runs the same cases and
asserts 0 lost, 0 duplicated, 0 leaked for every row.

    python -m benchmarks.faults [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_PROFILES = {"fault2x8": {"backend": "slurm", "nodes": 2, "gpus_per_node": 8, "tensor_parallel": 8, "pipeline_parallel": 2}}


@dataclass
class Row:
    fault: str
    injected: int = 0
    detected: int = 0
    lost: int = 0
    duplicated: int = 0
    leaked: int = 0
    recovery_s: float | None = None
    note: str = ""

    def cells(self) -> list[str]:
        rec = "-" if self.recovery_s is None else f"{self.recovery_s:.1f}"
        return [self.fault, str(self.injected), str(self.detected), str(self.lost), str(self.duplicated),
                str(self.leaked), rec, self.note]


HEADER = ["fault", "times injected", "detected", "records lost", "records duplicated", "jobs leaked", "recovery s", "note"]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


# --- running a flow under a set of settings -----------------------------------------------------


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """The settings are read from the environment at flow start: set them for one run."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_prompts(path: Path, n: int, poison: set[int] = frozenset(), word: str = "POISON") -> list[str]:
    ids = []
    with open(path, "w") as f:
        for i in range(n):
            text = f"Prompt {i}: {'a ' + word + ' pill' if i in poison else 'write one line about the sea'}."
            f.write(json.dumps({"id": f"f{i:04d}", "prompt": text}) + "\n")
            ids.append(f"f{i:04d}")
    return ids


def local_env(tmp: Path, *server_args: str, **settings: str) -> dict[str, str]:
    return {"NSDG_LOCAL__ENGINE": "simulated", "NSDG_WORK_DIR": str(tmp / "work"),
            "NSDG_LOCAL__EXTRA_ARGS": json.dumps(list(server_args)), **settings}


def count_outcomes(expected: list[str], written: list[str], rejected: list[str]) -> tuple[int, int]:
    """(lost, duplicated): every valid input must be written or rejected exactly once."""
    seen = Counter(written) + Counter(rejected)
    lost = sum(1 for i in expected if seen[i] == 0)
    duplicated = sum(n - 1 for n in seen.values() if n > 1) + sum(n for i, n in seen.items() if i not in set(expected))
    return lost, duplicated


def read_local_run(run_dir: Path) -> tuple[list[str], list[str], dict]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    written = [json.loads(line)["id"] for p in manifest["parts"] for line in (run_dir / p["name"]).read_text().splitlines()]
    rejects = run_dir / "rejects.jsonl"
    rejected = [json.loads(line)["id"] for line in rejects.read_text().splitlines()] if rejects.exists() else []
    return written, rejected, manifest


def local_servers(tmp: Path) -> int:
    """serve-local processes still alive that belong to this case (their work dir is under tmp)."""
    import psutil

    alive = 0
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "serve-local" in cmd and str(tmp) in cmd:
            alive += 1
    return alive


def recovery_after(marker: Path, run_dir: Path) -> float | None:
    """Seconds from the fault (its marker's mtime) to the first part published after it."""
    if not marker.exists():
        return None
    t = marker.stat().st_mtime
    after = [p.stat().st_mtime for p in run_dir.glob("part-*.state.json") if p.stat().st_mtime >= t]
    return round(min(after) - t, 2) if after else None


# --- the cases ---------------------------------------------------------------------------------


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
    env = {"NSDG_EXTRA_PROFILES": json.dumps(TEST_PROFILES), "NSDG_SLURM__CONTAINER_RUNTIME": "none",
           "NSDG_SLURM__JOB_ROOT": str(tmp / "jobs"), "NSDG_SLURM__TIME_LIMIT": "00:10:00",
           "NSDG_SERVER__PORT": str(port), "NSDG_SERVER__COMMAND": json.dumps(cmd), "NSDG_WORK_DIR": str(tmp / "work"),
           "NSDG_SERVER__READY_TIMEOUT_S": "180"}
    expected = write_prompts(tmp / "in.jsonl", 100)
    run_dir = tmp / "out" / "r"
    client = SlurmClient()
    cancelled: list[float] = []

    def cancel_first_job() -> None:
        _wait(lambda: any(run_dir.glob("part-*.state.json")), 120, "the first part on Slurm")
        for job in client.active_jobs():
            if job.name.startswith("nsdg-") and "run=r " in (job.comment or "") + " ":
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
    leaked = [j for j in client.active_jobs() if j.name.startswith("nsdg-") and "run=r " in (j.comment or "") + " "]
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


# --- the run's identity: tokenizer, input, S3 uploads (issue 12: F1, F2, F8) ------------------


def _outcomes(run_dir: Path, ids: list[str]) -> tuple[list[str], list[str]]:
    """(written, rejected) ids; an input reject names its line, not its id."""
    written = [json.loads(line)["id"] for p in sorted(run_dir.glob("part-*.jsonl")) for line in p.read_text().splitlines()]
    rejects = run_dir / "rejects.jsonl"
    rows = [json.loads(line) for line in rejects.read_text().splitlines()] if rejects.exists() else []
    return written, [r.get("id") or ids[r["line"] - 1] for r in rows]


def case_tokenizer_changed(tmp: Path) -> Row:
    """A run under the byte estimate loses its server; the resume sets NSDG_MODEL__TOKENIZER,
    which changes which prompts fit: refused, naming token_counter; resumed as started, it finishes."""
    from flows.generate import generate

    long = "Describe, in one sentence, the long history of the lighthouse keepers who watched over the northern sea."
    ids = [f"t{i:02d}" for i in range(12)]
    with open(tmp / "in.jsonl", "w") as f:
        for i, rid in enumerate(ids):
            f.write(json.dumps({"id": rid, "prompt": long if i == 1 else f"Prompt {i}: the sea."}) + "\n")
    params = dict(input_uri=str(tmp / "in.jsonl"), output_uri=str(tmp / "out"), run_id="r", shard_size=3, batch_size=3,
                  on_bad_input="skip", sampling={"tokens_to_generate": 8}, max_server_restarts=0)
    tight = {"NSDG_MODEL__CONTEXT_LENGTH": "64", "NSDG_SERVER__MAX_IN_FLIGHT": "1"}
    # The Makefile's NSDG_LOCAL__MODEL_DIR is relative to the checkout, and this case runs elsewhere.
    tokenizer = (REPO / os.environ.get("NSDG_LOCAL__MODEL_DIR", ".cache/tiny-model") / "tokenizer.json").resolve()
    refused = 0
    with environment(local_env(tmp, "--fault-crash-after", "2", **tight)):
        try:
            generate(**params)  # the probe, shard 0, then the server is gone
        except Exception:
            pass
    with environment(local_env(tmp, **tight, NSDG_MODEL__TOKENIZER=str(tokenizer))):
        try:
            generate(**params)
        except Exception as exc:
            refused = int("token_counter" in str(exc))
    with environment(local_env(tmp, **tight)):
        generate(**params)
    written, rejected = _outcomes(tmp / "out" / "r", ids)
    lost, dup = count_outcomes(ids, written, rejected)
    return Row("resume under another tokenizer", injected=1, detected=refused, lost=lost, duplicated=dup,
               leaked=local_servers(tmp), note="refused (token_counter differs); resumed as started")


def case_input_changed(tmp: Path) -> Row:
    """The input is rewritten in place while the run reads it; restored, the rerun finishes."""
    from flows.generate import generate
    from infra.errors import InputChanged

    src, run_dir = tmp / "in.jsonl", tmp / "out" / "r"
    ids = write_prompts(src, 300)
    v1 = src.read_bytes()

    def rewrite() -> None:
        _wait(lambda: (run_dir / "part-00001.jsonl.state.json").exists(), 120, "the second part")
        write_prompts(src, 300, poison=set(range(300)), word="CHANGED")  # same ids, other prompts

    changer = threading.Thread(target=rewrite, daemon=True)
    changer.start()
    params = dict(input_uri=str(src), output_uri=str(tmp / "out"), run_id="r", shard_size=20, batch_size=10)
    detected = 0
    with environment(local_env(tmp, "--extra-latency", "0.05")):
        try:
            generate(**params)
        except InputChanged:
            detected = 1
    changer.join(timeout=10)
    mixed = sum("CHANGED" in json.loads(line)["prompt"] for p in run_dir.glob("part-*.jsonl") for line in p.read_text().splitlines())
    src.write_bytes(v1)
    with environment(local_env(tmp)):
        generate(**params)
    written, rejected = _outcomes(run_dir, ids)
    lost, dup = count_outcomes(ids, written, rejected)
    return Row("input rewritten mid-run, then restored", injected=1, detected=detected, lost=lost, duplicated=dup + mixed,
               leaked=local_servers(tmp), note="InputChanged; nothing of the new input published; rerun finishes")


def case_s3_multipart(tmp: Path) -> Row:
    """An upload a killed flow left open, then a run with multipart parts under 30% S3 faults:
    the plan aborts the stale upload, failed attempts abort theirs, none stays open."""
    import boto3

    from flows.generate import generate
    from tests.fixtures_s3 import FaultProxy

    ids = [f"m{i:02d}" for i in range(12)]
    with open(tmp / "in.jsonl", "w") as f:  # 6 records of ~1 MB a part: multipart at a 5 MiB threshold
        for rid in ids:
            f.write(json.dumps({"id": rid, "prompt": f"Prompt {rid}: the sea.", "pad": "x" * 900_000}) + "\n")
    with moto_server() as endpoint, FaultProxy(endpoint, fault_rate=0.3, seed=11) as proxy:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="faults-multipart")  # moto's state is per process: not the S3 outage's bucket
        stale = s3.create_multipart_upload(Bucket="faults-multipart", Key="runs/r/part-00000.jsonl")
        s3.upload_part(Bucket="faults-multipart", Key="runs/r/part-00000.jsonl", UploadId=stale["UploadId"], PartNumber=1, Body=b"x" * (5 << 20))
        env = {**local_env(tmp), "NSDG_S3__ENDPOINT_URL": proxy.url, "NSDG_S3__ADDRESSING_STYLE": "path",
               "NSDG_S3__MULTIPART_THRESHOLD_MB": "5"}
        with environment(env):
            generate(input_uri=str(tmp / "in.jsonl"), output_uri="s3://faults-multipart/runs", run_id="r", shard_size=6, batch_size=6)
        manifest = json.loads(s3.get_object(Bucket="faults-multipart", Key="runs/r/manifest.json")["Body"].read())
        written = [json.loads(line)["id"] for p in manifest["parts"]
                   for line in s3.get_object(Bucket="faults-multipart", Key=f"runs/r/{p['name']}")["Body"].read().decode().splitlines()]
        uploads = s3.list_multipart_uploads(Bucket="faults-multipart").get("Uploads", [])
    lost, dup = count_outcomes(ids, written, [])
    return Row("S3 multipart upload left open, then 30% faults", injected=1 + proxy.injected,
               detected=int(all(u["UploadId"] != stale["UploadId"] for u in uploads)), lost=lost, duplicated=dup,
               leaked=local_servers(tmp) + len(uploads), note="leaked counts open multipart uploads")


CASES.update({
    "tokenizer_changed": case_tokenizer_changed,
    "input_changed": case_input_changed,
    "s3_multipart": case_s3_multipart,
})

# --- releases, the Prefect API, attached replicas (F3, F4, F5 of the reliability review) ----------


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
    env = {"NSDG_EXTRA_PROFILES": json.dumps(profiles), "NSDG_SLURM__CONTAINER_RUNTIME": "none",
           "NSDG_SLURM__JOB_ROOT": str(tmp / "jobs"), "NSDG_SLURM__TIME_LIMIT": "00:05:00",
           "NSDG_SERVER__PORT": str(free_port(span=8)), "NSDG_SERVER__COMMAND": json.dumps(cmd),
           "NSDG_WORK_DIR": str(tmp / "work"), "NSDG_SERVER__READY_TIMEOUT_S": "120"}
    expected = write_prompts(tmp / "in.jsonl", 40)
    with environment(env):
        generate(input_uri=str(tmp / "in.jsonl"), output_uri=str(tmp / "out"), run_id="r", profile="fault1x8",
                 shard_size=10, batch_size=5, replicas=2)
    written, rejected, manifest = read_local_run(tmp / "out" / "r")
    lost, dup = count_outcomes(expected, written, rejected)
    leaked = [j for j in SlurmClient().active_jobs() if j.name.startswith("nsdg-") and "run=r " in (j.comment or "") + " "]
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


CASES.update({
    "throttled": case_throttled,
    "slurm_slow_release": case_slurm_slow_release,
    "api_outage": case_api_outage,
    "attach_replica_lost": case_attach_replica_lost,
    "probe_500": case_probe_500,
})
SLURM_CASES.add("slurm_slow_release")


# --- stale states, a lost lease, a retired client's queue, rollover thrash (review 2: D1, D4, D7) --


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
        os.kill(holder.pid, signal.SIGSTOP)
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
    env = {"NSDG_EXTRA_PROFILES": json.dumps(profiles), "NSDG_SLURM__CONTAINER_RUNTIME": "none",
           "NSDG_SLURM__JOB_ROOT": str(tmp / "jobs"), "NSDG_SLURM__TIME_LIMIT": "1", "NSDG_SLURM__EXCLUSIVE": "false",
           "NSDG_SLURM__MEM": "", "NSDG_SLURM__WARN_SIGNAL_S": "60", "NSDG_SLURM__MAX_ROLLOVERS": "10",
           "NSDG_SERVER__PORT": str(free_port(span=24)), "NSDG_SERVER__COMMAND": json.dumps(cmd),
           "NSDG_WORK_DIR": str(tmp / "work"), "NSDG_SERVER__READY_TIMEOUT_S": "300"}
    expected = write_prompts(tmp / "in.jsonl", 420)
    with environment(env):
        generate(input_uri=str(tmp / "in.jsonl"), output_uri=str(tmp / "out"), run_id="r", profile="roll1x1",
                 shard_size=20, batch_size=10, max_server_restarts=0)
    written, rejected, manifest = read_local_run(tmp / "out" / "r")
    lost, dup = count_outcomes(expected, written, rejected)
    leaked = [j for j in SlurmClient().active_jobs() if j.name.startswith("nsdg-") and "run=r " in (j.comment or "") + " "]
    roll = manifest["rollovers"]
    idle = sum(1 for r in manifest["replicas"] if not r.get("records"))
    return Row("Slurm: rollover lead longer than the 1-minute limit (thrash)", injected=1,
               detected=roll["count"] if roll["count"] and manifest["server_restarts"] == 0 else 0, lost=lost,
               duplicated=dup, leaked=len(leaked),
               note=f"{roll['count']} rollovers ({roll['late']} late), {len(manifest['slurm_job_ids'])} jobs "
                    f"({idle} served nothing), largest gap {roll['largest_gap_s']} s")


CASES.update({
    "stale_state": case_stale_state,
    "lease_lost": case_lease_lost,
    "openai_queue_requeued": case_openai_queue_requeued,
    "slurm_rollover_thrash": case_slurm_rollover_thrash,
})
SLURM_CASES.add("slurm_rollover_thrash")
BENCH_ONLY = {"slurm_rollover_thrash"}  # minutes of 1-minute jobs: `make faults` only; its test is test_slurm_rollover.py


# --- helpers -----------------------------------------------------------------------------------


def _wait(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    from infra.deadline import Deadline, poll_until

    poll_until(lambda: True if predicate() else None, deadline=Deadline(seconds), interval=0.2, what=what)


@contextmanager
def moto_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    with environment({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}):
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(CASES), help="run only these cases")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    rows = []
    with prefect_test_harness(server_startup_timeout=90), tempfile.TemporaryDirectory(prefix="nsdg-faults-") as tmp:
        for name in args.only or list(CASES):
            case_dir = Path(tmp) / name
            case_dir.mkdir()
            print(f"running {name} …", file=sys.stderr, flush=True)
            try:
                rows.append(CASES[name](case_dir))
            except Exception as exc:  # a case that cannot finish is a failed row, not a crash of the suite
                rows.append(Row(name, lost=-1, note=f"FAILED: {type(exc).__name__}: {str(exc)[:200]}"))
    print(table(rows))
    bad = [r for r in rows if (r.lost, r.duplicated, r.leaked) != (0, 0, 0)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
