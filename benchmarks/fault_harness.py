"""What every case of the fault suite (benchmarks/faults.py) runs on: its table row, a flow run under a
set of settings, the prompts it reads, the outcome counted record by record, the processes it leaves."""

from __future__ import annotations

import json
import os
import signal
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

def slurm_env(tmp: Path, profiles: dict, cmd: list[str], port: int, time_limit: str, ready_timeout_s: int,
              **more: str) -> dict[str, str]:
    """The settings of a run on the local Slurm cluster under `profiles`, its server `cmd` run bare (no
    container), its jobs' files and its work dir under `tmp`; `more`: other settings."""
    return {"NSDG_EXTRA_PROFILES": json.dumps(profiles), "NSDG_SLURM__CONTAINER_RUNTIME": "none",
            "NSDG_SLURM__JOB_ROOT": str(tmp / "jobs"), "NSDG_SLURM__TIME_LIMIT": time_limit,
            "NSDG_SERVER__PORT": str(port), "NSDG_SERVER__COMMAND": json.dumps(cmd), "NSDG_WORK_DIR": str(tmp / "work"),
            "NSDG_SERVER__READY_TIMEOUT_S": str(ready_timeout_s), **more}


def run_jobs(client, run_id: str = "r") -> list:
    """The Slurm jobs of run `run_id` still active: a run that finished cleanly leaves none."""
    return [j for j in client.active_jobs() if j.name.startswith("nsdg-") and f"run={run_id} " in (j.comment or "") + " "]


# --- helpers -----------------------------------------------------------------------------------


def _wait(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    from infra.deadline import Deadline, poll_until

    poll_until(lambda: True if predicate() else None, deadline=Deadline(seconds), interval=0.2, what=what)


def stop_between_writes(pid: int, run_dir: Path) -> None:
    """SIGSTOP `pid` at a moment it holds none of `run_dir`'s write locks. Stopped inside a lease
    renewal (a lock file exists only while its write runs), it would keep another run out by the
    lock for good, not by the lease: the case under test is a holder stopped between writes, so
    continue it and stop it again, a few milliseconds later."""
    from infra.deadline import Deadline, poll_until

    def stopped() -> bool:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"

    for _ in range(200):
        os.kill(pid, signal.SIGSTOP)
        poll_until(lambda: stopped() or None, deadline=Deadline(10), interval=0.01, what=f"process {pid} to stop")
        if not any(run_dir.glob(".*.lock")):
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError(f"process {pid} was inside a write of {run_dir} at each of 200 stops")


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
